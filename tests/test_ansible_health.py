"""ansible/health.yml run for real against this machine (a local connection): it is not a
Raspberry Pi and runs no dllama service, so the table says "not a Raspberry Pi" and the play
fails on the one real fault, the service that is not running. The play runs twice: over Mitogen
(what ansible.cfg picks when the controller has it) and with Mitogen hidden, where the same
strategy falls back to Ansible's own."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module", params=["mitogen", "without mitogen"])
def health_run(request, tmp_path_factory):
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
    if request.param == "without mitogen":
        hide = tmp_path_factory.mktemp("no-mitogen")
        (hide / "ansible_mitogen.py").write_text('raise ImportError("hidden by the test")\n')
        env["PYTHONPATH"] = os.pathsep.join([str(hide), env.get("PYTHONPATH", "")])
    proc = subprocess.run([str(playbook), "-vvv", "-i", str(inventory), "ansible/health.yml",
                           "-e", "ansible_become=false"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    # Ansible's own local connection logs a shell command per task; Mitogen runs none.
    plain = "ESTABLISH LOCAL CONNECTION" in proc.stdout
    assert plain == (request.param == "without mitogen"), proc.stdout[-3000:]
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
