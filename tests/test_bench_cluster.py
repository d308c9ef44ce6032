"""make bench-cluster's emulated Pi network (tests/bench_cluster.py): two namespaces on a bridge,
links at MTU 9000 shaped to 1 Gbit/s, a TCP transfer between the nodes' addresses, and nothing
left behind once closed (also when making it fails half way)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from bench_cluster import PiNetwork

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None,
    reason="needs root and iproute2 (ip, tc)")


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


# node 1 listens, node 0 sends 4 MB in 64 KB writes (segments up to the MTU), node 1 counts them
SERVER = """
import socket, sys
s = socket.create_server((sys.argv[1], 7777)); print("listening", flush=True)
c, _ = s.accept(); n = 0
while (b := c.recv(1 << 16)): n += len(b)
print(n)
"""
CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], 7777), timeout=10)
for _ in range(64): c.sendall(bytes(1 << 16))
c.close()
"""


def test_two_nodes_talk_over_shaped_jumbo_links_and_leave_nothing() -> None:
    net = PiNetwork(2, "1gbit", 0.05, 9000)
    try:
        for k in range(2):
            link = subprocess.run(["ip", "-n", net.names[k], "link", "show", "eth0"], capture_output=True,
                                  text=True, check=True).stdout
            assert "mtu 9000" in link and "UP" in link, link
            qdisc = subprocess.run(net.exec(k, "tc", "qdisc", "show", "dev", "eth0"), capture_output=True, text=True,
                                   check=True).stdout
            assert ("netem" in qdisc or "tbf" in qdisc) and "1Gbit" in qdisc, qdisc
        server = subprocess.Popen(net.exec(1, sys.executable, "-c", SERVER, net.address(1)), stdout=subprocess.PIPE,
                                  text=True)
        try:
            assert server.stdout.readline().strip() == "listening"
            subprocess.run(net.exec(0, sys.executable, "-c", CLIENT, net.address(1)), check=True, timeout=60)
            out, _ = server.communicate(timeout=60)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
        assert int(out) == 64 << 16
    finally:
        net.close()
    assert net.prefix not in _namespaces()


def test_a_network_that_fails_half_way_is_removed() -> None:
    with pytest.raises(RuntimeError, match="mtu greater than device maximum"):
        PiNetwork(2, "1gbit", 0.05, 1 << 20)  # the first link refuses it, after two namespaces exist
    assert f"dlb{os.getpid()}" not in _namespaces()
