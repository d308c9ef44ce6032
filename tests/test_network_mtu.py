"""The network role's MTU change on a live link (roles/network/vars/main.yml network__set_mtu_now),
run by Ansible in a network namespace of this test's own, against a veth and against a NIC that,
like a Raspberry Pi 5's (macb), refuses a new MTU while its link is up."""

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytest.importorskip("ansible")

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                                reason="needs root and iproute2 (network namespaces)")

# A NIC driver that answers EBUSY to a new MTU while the link is up, as macb does; every other
# `ip` command goes to the real one.
BUSY_WHILE_UP = """#!/bin/sh
case " $* " in
  *" mtu "*)
    if {ip} link show dev "$4" | head -n1 | grep -q '[<,]UP[,>]'; then
      echo "RTNETLINK answers: Device or resource busy" >&2
      exit 2
    fi ;;
esac
exec {ip} "$@"
"""

PLAY = """---
- name: Set the MTU as the network role does
  hosts: localhost
  connection: local
  gather_facts: false
  vars_files: [{vars}]
  vars:
    network_interface: v0
    network_mtu: {mtu}
  tasks:
    - name: Set the MTU now
      ansible.builtin.shell: "{{{{ network__set_mtu_now }}}}"
      changed_when: true
"""


@pytest.fixture()
def netns():
    name = f"dllama-mtu-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        ip = ["ip", "-n", name]
        subprocess.run(ip + ["link", "add", "v0", "type", "veth", "peer", "name", "v1"], check=True)
        subprocess.run(ip + ["link", "set", "v0", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def link(netns):
    out = subprocess.run(["ip", "-n", netns, "-o", "link", "show", "dev", "v0"], capture_output=True,
                         text=True, check=True).stdout
    flags = out.split("<", 1)[1].split(">", 1)[0].split(",")
    return int(out.split(" mtu ", 1)[1].split()[0]), "UP" in flags


def set_mtu(tmp_path, netns, mtu, busy_while_up):
    path = os.environ.get("PATH", "")
    if busy_while_up:
        fake = tmp_path / "bin"
        fake.mkdir()
        (fake / "ip").write_text(BUSY_WHILE_UP.format(ip=shutil.which("ip")))
        (fake / "ip").chmod(0o755)
        path = f"{fake}{os.pathsep}{path}"
    play = tmp_path / "play.yml"
    play.write_text(PLAY.format(vars=ROOT / "roles" / "network" / "vars" / "main.yml", mtu=mtu))
    env = dict(os.environ, PATH=path, ANSIBLE_LOCAL_TEMP=str(tmp_path / "tmp"), ANSIBLE_NOCOLOR="1")
    # The module runs with this Python (the machine's python3 may lack what Ansible needs).
    return subprocess.run(["ip", "netns", "exec", netns, BIN / "ansible-playbook", "-i", "localhost,",
                           "-e", f"ansible_python_interpreter={sys.executable}", play],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("busy_while_up", [False, True], ids=["live", "refused-while-up"])
def test_mtu_lands_and_the_link_stays_up(tmp_path, netns, busy_while_up):
    run = set_mtu(tmp_path, netns, 9000, busy_while_up)
    assert run.returncode == 0, run.stdout + run.stderr
    assert link(netns) == (9000, True)


def test_an_mtu_the_nic_refuses_fails_and_leaves_the_link_up(tmp_path, netns):
    run = set_mtu(tmp_path, netns, 70000, busy_while_up=True)
    assert run.returncode != 0
    assert "greater than device maximum" in run.stdout + run.stderr
    assert link(netns) == (1500, True)
