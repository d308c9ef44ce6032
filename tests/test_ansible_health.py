"""ansible/health.yml run for real against this machine (a local connection): it is not a
Raspberry Pi and runs no dllama service, so the table says "not a Raspberry Pi" and the play
fails on the one real fault, the service that is not running."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def health_run(tmp_path_factory):
    playbook = BIN / "ansible-playbook"
    if not playbook.exists():
        pytest.skip(f"ansible-playbook is not installed next to {sys.executable} (make deps)")
    inventory = tmp_path_factory.mktemp("health") / "hosts.yml"
    inventory.write_text(
        "cluster:\n  children:\n    workers:\n      hosts:\n        here:\n"
        "          ansible_connection: local\n"
        f"          ansible_python_interpreter: {sys.executable}\n"
        "          dllama_interface: lo\n"
        "    root:\n      hosts: {}\n")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_BECOME": "false"}
    proc = subprocess.run([str(playbook), "-i", str(inventory), "ansible/health.yml",
                           "-e", "ansible_become=false"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return proc


def test_the_table_says_not_a_raspberry_pi(health_run):
    out = health_run.stdout
    table = out.split("Print the cluster table", 1)[1]
    assert "not a Raspberry Pi" in table, out
    # The loopback interface's MTU is read for real.
    row = next(line for line in table.splitlines() if line.strip().startswith("here "))
    assert "65536" in row, row


def test_a_service_that_is_not_running_fails_the_play(health_run):
    assert health_run.returncode != 0, health_run.stdout
    # "inactive" where systemd runs; "unknown (...)" with systemctl's complaint where it does not.
    assert "Fail on a real fault" in health_run.stdout, health_run.stdout
    assert "msg: dllama-worker is " in health_run.stdout, health_run.stdout
