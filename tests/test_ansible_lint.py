"""The appliance's playbooks pass ansible-lint's production profile and Ansible's syntax check."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PLAYBOOKS = ["site.yml", "ansible/health.yml", "ansible/preflight.yml"]


def tool(name):
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed next to {sys.executable} (make deps installs it)")
    return str(path)


def run(*argv, timeout=300):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "NO_COLOR": "1", "ANSIBLE_NOCOLOR": "1"}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_playbooks_pass_the_syntax_check():
    result = run(tool("ansible-playbook"), "--syntax-check", *PLAYBOOKS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ansible_lint_production_profile_passes():
    result = run(tool("ansible-lint"), "--offline", "--profile", "production", "--nocolor",
                 *PLAYBOOKS, "ansible/requirements.yml", "roles")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Profile 'production' was required, and it passed" in result.stdout + result.stderr


def test_example_inventory_parses_into_the_cluster_groups():
    result = run(tool("ansible-inventory"), "--graph", "cluster")
    assert result.returncode == 0, result.stdout + result.stderr
    graph = result.stdout
    for line in ("@root:", "@workers:", "pi-root", "pi-worker1", "pi-worker3", "pi-worker4"):
        assert line in graph
