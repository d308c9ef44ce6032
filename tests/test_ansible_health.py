"""ansible/health.yml run for real against this machine (a local connection): it is not a
Raspberry Pi and runs no dllama service, so the table says "not a Raspberry Pi" and the play
fails on the one real fault, the service that is not running. The play runs twice: over Mitogen
(what ansible.cfg picks when the controller has it) and with Mitogen hidden, where the same
strategy falls back to Ansible's own."""

import os
import sys

import pytest
from ansible_cli import run, tool


@pytest.fixture(scope="module", params=["mitogen", "without mitogen"])
def health_run(request, tmp_path_factory):
    playbook = tool("ansible-playbook")
    inventory = tmp_path_factory.mktemp("health") / "hosts.yml"
    inventory.write_text(
        "cluster:\n  children:\n    workers:\n      hosts:\n        here:\n"
        "          ansible_connection: local\n"
        f"          ansible_python_interpreter: {sys.executable}\n"
        "          dllama_interface: lo\n"
        "    root:\n      hosts: {}\n")
    env = {"ANSIBLE_BECOME": "false"}
    if request.param == "without mitogen":
        hide = tmp_path_factory.mktemp("no-mitogen")
        (hide / "ansible_mitogen.py").write_text('raise ImportError("hidden by the test")\n')
        env["PYTHONPATH"] = os.pathsep.join([str(hide), os.environ.get("PYTHONPATH", "")])
    proc = run(playbook, "-vvv", "-i", str(inventory), "ansible/health.yml", "-e", "ansible_become=false", **env)
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
