"""The Ansible command-line tools installed next to this Python, run from the repository root with
its ansible.cfg as an operator runs them: shared by the tests that run playbooks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def tool(name):
    """The path of an Ansible tool beside sys.executable; the calling test is skipped without it."""
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed next to {sys.executable} (make deps installs it)")
    return str(path)


def run(*argv, timeout=300, **env):
    """argv in the repository root with the tools on PATH and ansible.cfg; env adds variables."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "NO_COLOR": "1", "ANSIBLE_NOCOLOR": "1", **env}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
