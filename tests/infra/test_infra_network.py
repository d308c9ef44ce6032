"""network role: the cluster interface, its profile, /etc/hosts, jumbo frames end to end."""

import pytest
from infra_hosts import hosts

testinfra_hosts = hosts("cluster")


def test_cluster_interface_has_its_static_address(host, node):
    addresses = host.interface(node["interface"]).addresses
    assert node["address"] in addresses


def test_cluster_interface_mtu_is_9000(host, node):
    mtu = host.file(f"/sys/class/net/{node['interface']}/mtu").content_string.strip()
    assert int(mtu) == node["mtu"] == 9000


@pytest.fixture(scope="module")
def stack(host):
    """The network stack that owns the node's addresses, as the network role detects it."""
    if host.service("NetworkManager").is_running:
        return "networkmanager"
    if host.service("dhcpcd").is_running:
        return "dhcpcd"
    pytest.fail("neither NetworkManager nor dhcpcd runs")


@pytest.fixture()
def networkmanager(stack):
    if stack != "networkmanager":
        pytest.skip(f"{stack} owns this node's addresses, not NetworkManager")


@pytest.fixture()
def dhcpcd(stack):
    if stack != "dhcpcd":
        pytest.skip(f"{stack} owns this node's addresses, not dhcpcd")


@pytest.mark.usefixtures("networkmanager")
def test_cluster_profile_is_the_active_connection(host, node):
    active = host.check_output(f"nmcli --get-values GENERAL.CONNECTION device show {node['interface']}")
    assert active.strip() == "dllama-cluster"


@pytest.mark.usefixtures("networkmanager")
def test_cluster_profile_is_static_with_mtu_9000_and_autoconnect(host, node):
    profile = host.check_output(
        "nmcli --get-values ipv4.method,ipv4.addresses,802-3-ethernet.mtu,connection.autoconnect"
        " connection show dllama-cluster").splitlines()
    assert profile == ["manual", f"{node['address']}/{node['prefix']}", "9000", "yes"]


@pytest.mark.usefixtures("dhcpcd")
def test_dhcpcd_conf_gives_the_cluster_interface_its_static_address(host, node):
    text = host.file("/etc/dhcpcd.conf").content_string
    block = text.split("# BEGIN dllama-cluster interface (ansible)\n", 1)[1].split(
        "# END dllama-cluster interface (ansible)", 1)[0]
    assert block.splitlines() == [f"interface {node['interface']}",
                                  f"static ip_address={node['address']}/{node['prefix']}"], block


def test_udev_sets_mtu_9000_on_the_cluster_interface_at_boot(host, node):
    # on every stack: a Pi 5's NIC takes a new MTU only while its link is down
    rule = host.file("/etc/udev/rules.d/70-dllama-mtu.rules").content_string
    assert f'KERNEL=="{node["interface"]}"' in rule, rule
    assert f"ip link set dev {node['interface']} mtu 9000" in rule, rule


def test_every_cluster_node_is_named_in_etc_hosts(host, cluster):
    lines = {tuple(line.split()) for line in host.file("/etc/hosts").content_string.splitlines()}
    for other in cluster.values():
        assert (other["address"], other["name"]) in lines


def test_jumbo_frames_reach_every_other_node(host, node, cluster):
    for other in cluster.values():
        if other["name"] != node["name"]:
            host.run_expect([0], f"ping -c 2 -W 3 -M do -s 8972 {other['address']}")


@pytest.mark.parametrize("size", [8972])
def test_oversized_frames_are_not_fragmented_silently(host, node, cluster, size):
    # one byte over the MTU must fail locally ("message too long"), proving DF is honoured
    other = next(o for o in cluster.values() if o["name"] != node["name"])
    result = host.run(f"ping -c 1 -W 2 -M do -s {size + 1} {other['address']}")
    assert result.rc != 0
