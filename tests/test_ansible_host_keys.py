"""ansible.cfg's host key rule, StrictHostKeyChecking=accept-new, against a real sshd on loopback
(this machine's, started for the test on a free port): a board seen for the first time is trusted
and remembered, a known board whose key changed is refused; over Mitogen (the strategies'
default, whose ssh knows only yes or no: ansible/strategy_plugins) as over Ansible's own ssh."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ansible_cli import run, tool

SSHD = "/usr/sbin/sshd"


def keygen(path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


@pytest.fixture()
def board(tmp_path):
    """A loopback sshd root logs in to with a key; .rekey() gives it a new host key."""
    if not os.path.exists(SSHD) or not shutil.which("ssh-keygen") or os.geteuid() != 0:
        pytest.skip("needs root and sshd (Debian package openssh-server) on this machine")
    keygen(tmp_path / "hostkey")
    keygen(tmp_path / "client")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {tmp_path / 'hostkey'}\n"
        f"AuthorizedKeysFile {tmp_path / 'client.pub'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        f"PidFile {tmp_path / 'sshd.pid'}\n")
    os.makedirs("/run/sshd", exist_ok=True)
    inventory = {"cluster": {"hosts": {"board": {
        "ansible_host": "127.0.0.1", "ansible_port": port, "ansible_user": "root",
        "ansible_ssh_private_key_file": str(tmp_path / "client"), "ansible_python_interpreter": sys.executable,
        "ansible_ssh_common_args": f"-o UserKnownHostsFile={tmp_path / 'known_hosts'}"}}}}
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory))
    (tmp_path / "ping.yml").write_text(yaml.safe_dump([{"name": "Reach the board", "hosts": "cluster",
                                                        "gather_facts": False,
                                                        "tasks": [{"ansible.builtin.ping": None}]}]))
    procs = []

    def start():
        procs.append(subprocess.Popen([SSHD, "-D", "-f", str(tmp_path / "sshd_config"), "-E", str(tmp_path / "log")]))
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            assert time.monotonic() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.1)

    def stop():
        # the sessions first (the listener's children), then the listener
        sshd = procs[-1]
        children = Path(f"/proc/{sshd.pid}/task/{sshd.pid}/children")
        for pid in (children.read_text().split() if children.exists() else []):
            try:
                os.kill(int(pid), signal.SIGTERM)
            except ProcessLookupError:
                pass
        sshd.terminate()
        sshd.wait()

    def rekey():
        stop()
        for old in tmp_path.glob("hostkey*"):
            old.unlink()
        keygen(tmp_path / "hostkey")
        start()

    def reach(strategy):
        # a control socket of its own per run: a connection kept from the run before (ControlPersist)
        # would skip the host key check
        control = tmp_path / f"cp{len(list(tmp_path.glob('cp*')))}"
        control.mkdir()
        proc = run(tool("ansible-playbook"), "-i", str(tmp_path / "hosts.yml"), str(tmp_path / "ping.yml"),
                   ANSIBLE_STRATEGY=strategy, ANSIBLE_SSH_CONTROL_PATH_DIR=str(control))
        return proc.returncode == 0

    start()
    board = type("Board", (), {"reach": staticmethod(reach), "rekey": staticmethod(rekey),
                               "known_hosts": tmp_path / "known_hosts"})
    yield board
    stop()


@pytest.mark.parametrize("strategy", ["dllama_linear", "dllama_free", "linear"])
def test_a_new_board_is_trusted_and_a_changed_key_refused(board, strategy):
    assert board.reach(strategy)
    assert "ssh-ed25519" in board.known_hosts.read_text()
    assert board.reach(strategy)
    board.rekey()
    assert not board.reach(strategy)
