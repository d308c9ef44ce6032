"""ansible/teardown.yml: nothing the appliance installed is left on the node it ran on, and the node
still answers at its address.

The e2e harness tears one node down and names it in DLLAMA_INFRA_TORN_DOWN; without it (the checks
of provisioned nodes) every test here is skipped.
"""

import os

import pytest
from infra_hosts import INVENTORY

TORN_DOWN = os.environ.get("DLLAMA_INFRA_TORN_DOWN", "")
if not (INVENTORY and TORN_DOWN):
    # the whole module: an empty list of hosts would still give conftest.py items without a host
    pytest.skip("no torn-down node: the e2e harness names it in DLLAMA_INFRA_TORN_DOWN", allow_module_level=True)
testinfra_hosts = [f"ansible://{TORN_DOWN}?ansible_inventory={INVENTORY}"]

# What site.yml puts on a node (roles/*/defaults, the units' templates, roles/network/vars).
UNITS = ["dllama-worker", "dllama-api", "dllama-cpu-governor", "dllama-firewall"]
PATHS = ["/opt/dllama", "/etc/dllama", "/var/cache/dllama", "/var/lib/dllama", "/etc/sysctl.d/90-dllama.conf",
         "/etc/default/cpu_governor", "/etc/udev/rules.d/70-dllama-mtu.rules", "/usr/local/sbin/dllama-network-revert",
         "/var/lib/dllama-network"]
# The /etc blocks the network role writes, by their markers (roles/network/tasks).
BLOCKS = {"/etc/hosts": "dllama-cluster nodes", "/etc/cloud/templates/hosts.debian.tmpl": "dllama-cluster nodes",
          "/etc/dhcpcd.conf": "dllama-cluster interface"}


@pytest.mark.parametrize("unit", UNITS)
def test_unit_is_unknown_to_systemd(host, unit):
    assert host.check_output(f"systemctl show --property=LoadState --value {unit}.service") == "not-found"


@pytest.mark.parametrize("unit", UNITS)
def test_unit_file_is_gone(host, unit):
    assert not host.file(f"/etc/systemd/system/{unit}.service").exists


@pytest.mark.parametrize("path", PATHS)
def test_path_is_gone(host, path):
    assert not host.file(path).exists


def test_model_and_tokenizer_are_gone_with_their_checksums(host, node):
    for path in (node["model_path"], node["tokenizer_path"]):
        for gone in (path, f"{path}.sha256"):
            assert not host.file(gone).exists, gone


def test_dllama_user_is_gone(host):
    assert not host.user("dllama").exists


def test_dllama_group_is_gone(host):
    assert not host.group("dllama").exists


def test_nftables_table_is_gone(host):
    if not host.exists("nft"):
        pytest.skip("no nft on this node: no table either")
    assert host.run("nft list table inet dllama").rc != 0


def test_nothing_listens_on_the_worker_or_api_port(host):
    assert not host.socket("tcp://9999").is_listening
    assert not host.socket("tcp://8080").is_listening


@pytest.mark.parametrize("path", sorted(BLOCKS))
def test_etc_file_has_no_cluster_block(host, path):
    file = host.file(path)
    if not file.exists:
        pytest.skip(f"no {path} on this node")
    assert BLOCKS[path] not in file.content_string


def test_networkmanager_has_no_cluster_profile(host):
    if not host.service("NetworkManager").is_running:
        pytest.skip("NetworkManager does not run on this node")
    assert "dllama-cluster" not in host.check_output("nmcli --get-values NAME connection show").splitlines()


def test_node_still_answers_at_its_address(host, node):
    # the connection this check runs over is the controller's to the inventory's address
    assert node["address"] in host.interface(node["interface"]).addresses
