"""firewall role, worker_host and the API key (issue 15): seen from a stranger, a network namespace
of its own on the cluster's bridge at an address of the cluster subnet that no node has, the
worker port and a mesh port are unreachable and the API refuses a request without the key; from
the root, a peer, the same ports answer (so the table, not an absent listener, is what refuses).
Run by the e2e harness (tests/vm/run_e2e.py) inside its namespace, as root: it adds the
stranger's namespace and removes it afterwards."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import testinfra
from infra_hosts import INVENTORY, hosts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vm"))
from cluster import BRIDGE, HOST_ADDRESS, MTU, PREFIX  # noqa: E402

testinfra_hosts = hosts("cluster")

STRANGER = "dllama-e2e-stranger"
STRANGER_ADDRESS = HOST_ADDRESS.rsplit(".", 1)[0] + ".200"
WORKER_PORT, API_PORT = 9999, 8080  # the roles' defaults, which the e2e inventory keeps
CONNECT_TIMEOUT_S = 3

# Connects to HOST PORT and says "open", or "closed: why" (a dropped connection times out).
PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("open")
except OSError as e:
    print(f"closed: {e}")
"""

# An HTTP request to the API; prints the status.
REQUEST = """
import sys, urllib.error, urllib.request
headers = {"Authorization": "Bearer " + sys.argv[2]} if len(sys.argv) > 2 else {}
try:
    print(urllib.request.urlopen(urllib.request.Request(sys.argv[1], headers=headers), timeout=30).status)
except urllib.error.HTTPError as e:
    print(e.code)
"""

# A listener bound as the worker's mesh listener binds (its cluster address, a port the kernel
# picks from its ephemeral range), under a transient unit; writes its port to a file.
MESH_LISTENER = """
import socket, sys
listener = socket.create_server((sys.argv[1], 0))
open("/run/dllama-e2e-mesh-probe.port", "w").write(str(listener.getsockname()[1]))
while True:
    listener.accept()[0].close()
"""


@pytest.fixture(scope="module")
def stranger():
    """The stranger's namespace, one veth on the cluster's bridge; runs argv in it."""
    ip = ["ip", "-n", STRANGER]
    subprocess.run(["ip", "netns", "del", STRANGER], check=False, capture_output=True)  # a run that died
    subprocess.run(["ip", "netns", "add", STRANGER], check=True)
    try:
        for argv in (["ip", "link", "add", "stranger0", "mtu", str(MTU), "type", "veth",
                      "peer", "name", "eth0", "mtu", str(MTU), "netns", STRANGER],
                     ["ip", "link", "set", "stranger0", "master", BRIDGE, "up"],
                     ip + ["link", "set", "lo", "up"],
                     ip + ["addr", "add", f"{STRANGER_ADDRESS}/{PREFIX}", "dev", "eth0"],
                     ip + ["link", "set", "eth0", "up"]):
            subprocess.run(argv, check=True)
        yield lambda *argv: subprocess.run(["ip", "netns", "exec", STRANGER, *map(str, argv)], check=True,
                                           capture_output=True, text=True, timeout=60).stdout.strip()
    finally:
        subprocess.run(["ip", "netns", "del", STRANGER], check=False)  # the veth pair goes with it


@pytest.fixture()
def worker(node):
    if "workers" not in node["groups"]:
        pytest.skip(f"{node['name']} runs no worker")


@pytest.fixture()
def root(node):
    if "root" not in node["groups"]:
        pytest.skip(f"{node['name']} runs no API")


@pytest.fixture(scope="module")
def root_host():
    return testinfra.get_hosts([f"ansible://root?ansible_inventory={INVENTORY}"])[0]


def probe_from_stranger(stranger, address, port):
    return stranger(sys.executable, "-c", PROBE, address, port, CONNECT_TIMEOUT_S)


def probe_from(host, address, port):
    return host.check_output("python3 -c %s %s %s %s", PROBE, address, str(port), str(CONNECT_TIMEOUT_S))


@pytest.fixture()
def mesh_port(host, node, worker):
    """A port of the kernel's ephemeral range on the node's cluster address, listening."""
    host.run("rm -f /run/dllama-e2e-mesh-probe.port")
    host.run_expect([0], "systemd-run --collect --unit=dllama-e2e-mesh-probe -p RuntimeMaxSec=300 "
                         "/usr/bin/python3 -c %s %s", MESH_LISTENER, node["address"])
    try:
        deadline = time.monotonic() + 30
        while not host.file("/run/dllama-e2e-mesh-probe.port").exists:
            assert time.monotonic() < deadline, "the probe listener did not start"
            time.sleep(0.5)
        yield int(host.file("/run/dllama-e2e-mesh-probe.port").content_string)
    finally:
        host.run("systemctl stop dllama-e2e-mesh-probe")


def test_the_stranger_is_no_cluster_peer(cluster):
    assert STRANGER_ADDRESS not in {n["address"] for n in cluster.values()}


def test_firewall_service_is_active_and_enabled(host):
    service = host.service("dllama-firewall")
    assert service.is_running and service.is_enabled


def test_firewall_table_is_loaded(host):
    assert host.run_expect([0], "nft list table inet dllama")


def test_worker_listens_on_its_cluster_address_only(host, node, worker):
    assert host.socket(f"tcp://{node['address']}:{WORKER_PORT}").is_listening
    assert not host.socket(f"tcp://0.0.0.0:{WORKER_PORT}").is_listening


def test_worker_port_is_unreachable_from_a_stranger(host, node, worker, stranger):
    assert probe_from_stranger(stranger, node["address"], WORKER_PORT).startswith("closed")


def test_worker_port_answers_the_root(host, node, worker, root_host):
    assert probe_from(root_host, node["address"], WORKER_PORT) == "open"


def test_mesh_port_is_unreachable_from_a_stranger(host, node, mesh_port, stranger):
    assert probe_from_stranger(stranger, node["address"], mesh_port).startswith("closed")


def test_mesh_port_answers_the_root(host, node, mesh_port, root_host):
    assert probe_from(root_host, node["address"], mesh_port) == "open"


def test_api_refuses_a_stranger_without_the_key(host, node, root, stranger):
    # dllama_api_allow is the cluster subnet by default: the stranger reaches the port, not the model
    assert stranger(sys.executable, "-c", REQUEST, f"http://{node['address']}:{API_PORT}/v1/models") == "401"


def test_api_serves_a_stranger_with_the_key(host, node, root, stranger):
    key = (Path(INVENTORY).parent / "secrets" / "api.key").read_text().strip()
    assert stranger(sys.executable, "-c", REQUEST, f"http://{node['address']}:{API_PORT}/v1/models", key) == "200"


def test_api_key_on_the_controller_is_readable_by_its_owner_only():
    assert (Path(INVENTORY).parent / "secrets" / "api.key").stat().st_mode & 0o777 == 0o600
