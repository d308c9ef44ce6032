"""network role: after site.yml, the way back from the address switch is installed and idle, and
what teardown.yml needs to give the board its own setup back is remembered."""

import pytest
from infra_hosts import hosts

testinfra_hosts = hosts("cluster")

REVERT_SCRIPT = "/usr/local/sbin/dllama-network-revert"
PREVIOUS_CONNECTION = "/var/lib/dllama-network/previous-connection"


@pytest.fixture()
def networkmanager(host):
    if not host.service("NetworkManager").is_running:
        pytest.skip("NetworkManager does not own this node's addresses")


@pytest.fixture()
def dhcpcd(host):
    if not host.service("dhcpcd").is_running:
        pytest.skip("dhcpcd does not own this node's addresses")


def test_revert_script_is_installed_for_root(host):
    script = host.file(REVERT_SCRIPT)
    assert script.user == "root" and script.mode == 0o755
    assert host.run(f"sh -n {REVERT_SCRIPT}").rc == 0


def test_no_way_back_is_pending_after_the_switch(host):
    # the play stopped the timer once it reached the node at its cluster address
    assert host.run("systemctl is-active dllama-network-revert.timer").stdout.strip() == "inactive"


@pytest.mark.usefixtures("networkmanager")
def test_the_profile_the_board_used_before_is_remembered(host):
    uuid = host.file(PREVIOUS_CONNECTION).content_string.strip()
    name = host.check_output(f"nmcli --get-values connection.id connection show uuid {uuid}")
    assert name and name != "dllama-cluster"


@pytest.mark.usefixtures("dhcpcd")
def test_no_copy_of_dhcpcd_conf_is_left_from_the_switch(host):
    assert host.run("ls /etc/dhcpcd.conf.*~").rc != 0
