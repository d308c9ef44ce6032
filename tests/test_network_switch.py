"""The network role's way back from an address switch (roles/network/tasks/switch.yml), offline:
the revert script the timer runs (templates/dllama-network-revert.j2), rendered as the role renders
it and run for real where that touches nothing of this machine's network, and the host_vars lines
the role writes for the next run and teardown.yml removes, written by ansible-playbook into a
temporary inventory. The switch itself runs on the e2e VMs (tests/vm/run_e2e.py)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ansible_cli import run, tool
from test_ansible_templates import render

ROOT = Path(__file__).resolve().parent.parent
ROLE = ROOT / "roles" / "network"
INVENTORY = str(ROOT / "inventory" / "hosts.yml")


def load(path):
    with path.open() as f:
        return yaml.safe_load(f) or {}


# -- the revert script ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def revert_script(tmp_path_factory):
    """The script as the role installs it on pi-root of the example inventory, with dhcpcd.conf
    in a directory of this test's own."""
    work = tmp_path_factory.mktemp("revert")
    text = render(INVENTORY, "dllama-network-revert.j2", "pi-root", "network",
                  network__dhcpcd_conf=str(work / "dhcpcd.conf"))
    path = work / "dllama-network-revert"
    path.write_text(text)
    path.chmod(0o755)
    return path


def run_revert(script, *args, tools=()):
    """The script under sh with nothing on PATH but `tools` (linked from this machine): no
    nmcli or systemctl, so it can change nothing but the files it is given."""
    bin_dir = script.parent / "bin"
    shutil.rmtree(bin_dir, ignore_errors=True)
    bin_dir.mkdir()
    for name in tools:
        (bin_dir / name).symlink_to(shutil.which(name))
    return subprocess.run(["/bin/sh", str(script), *args], capture_output=True, text=True, timeout=30,
                          env={"PATH": str(bin_dir)})


def test_revert_script_is_posix_sh_for_the_profile_and_interface_of_the_node(revert_script):
    text = revert_script.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert "profile=dllama-cluster\n" in text and "interface=eth0\n" in text
    result = subprocess.run(["/bin/sh", "-n", str(revert_script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("args", [
    [], ["bogus"], ["networkmanager"], ["networkmanager", "UUID", "ipv4.method"],
    ["networkmanager", "UUID", "delete", "ipv4.method"], ["dhcpcd"], ["dhcpcd", "/nonexistent/dhcpcd.conf"],
])
def test_revert_script_refuses_wrong_arguments_before_doing_anything(revert_script, args):
    result = run_revert(revert_script, *args)
    assert result.returncode == 2
    assert result.stdout == ""  # no step was tried
    assert result.stderr.startswith("usage: ")


def test_revert_script_deletes_a_new_cluster_profile_then_brings_the_previous_one_up(revert_script):
    result = run_revert(revert_script, "networkmanager", "4c1e0f36-prev", "delete")
    assert result.stdout.splitlines() == [
        "nmcli connection delete id dllama-cluster",
        "nmcli connection up uuid 4c1e0f36-prev ifname eth0",
    ]
    assert result.returncode == 127  # nmcli is not here: every step was tried, the failure kept


def test_revert_script_gives_the_cluster_profile_its_settings_back_before_bringing_it_up(revert_script):
    result = run_revert(revert_script, "networkmanager", "9a7b-cluster", "ipv4.addresses", "10.0.0.2/24",
                        "ipv4.gateway", "", "802-3-ethernet.mtu", "9000")
    assert result.stdout.splitlines() == [
        "nmcli connection modify id dllama-cluster ipv4.addresses 10.0.0.2/24 ipv4.gateway  802-3-ethernet.mtu 9000",
        "nmcli connection up uuid 9a7b-cluster ifname eth0",
    ]


def test_revert_script_disconnects_an_interface_that_had_no_connection(revert_script):
    result = run_revert(revert_script, "networkmanager", "-", "delete")
    assert result.stdout.splitlines()[-1] == "nmcli device disconnect eth0"


def test_revert_script_puts_the_saved_dhcpcd_conf_back_and_restarts_dhcpcd(revert_script):
    conf, saved = revert_script.parent / "dhcpcd.conf", revert_script.parent / "dhcpcd.conf.1234~"
    conf.write_text("interface eth0\nstatic ip_address=10.0.5.2/24\n")
    saved.write_text("hostname\n")
    result = run_revert(revert_script, "dhcpcd", str(saved), tools=["mv"])
    assert conf.read_text() == "hostname\n" and not saved.exists()
    assert result.stdout.splitlines() == [f"mv -f {saved} {conf}", "systemctl restart dhcpcd.service"]
    assert result.returncode == 127  # no systemctl here


# -- the switch's shape -----------------------------------------------------------------------

def scoped(items, conditions=()):
    """Every task, blocks flattened, with the `when` conditions it runs under."""
    for item in items or []:
        when = item.get("when", [])
        scope = conditions + tuple(when if isinstance(when, list) else [when])
        yield item, scope
        for key in ("block", "rescue", "always"):
            yield from scoped(item.get(key), scope)


def test_the_way_back_is_armed_before_the_change_and_stopped_only_once_the_node_answers():
    (switch,) = load(ROLE / "tasks" / "switch.yml")
    order = [task["name"] for task in switch["block"]]
    arm, apply, wait, stop = (order.index(name) for name in (
        "Arm the way back (the node returns to the setup of now unless the play stops the timer)",
        "Apply the change, detached from this ssh session", "Wait for the node to answer",
        "Stop the way back (the controller reaches the node in its new setup)"))
    assert arm < apply < wait < stop == len(order) - 1
    assert switch["block"][apply]["poll"] == 0
    assert switch["rescue"][-1]["ansible.builtin.fail"]


def test_every_switch_says_what_to_apply_where_to_reach_the_node_and_how_to_go_back():
    callers = [(task, scope) for path in sorted((ROLE / "tasks").glob("*.yml")) for task, scope in scoped(load(path))
               if task.get("ansible.builtin.include_tasks") == "switch.yml"]
    assert len(callers) == 4  # NetworkManager and dhcpcd, each in main and teardown
    for task, scope in callers:
        assert set(task["vars"]) == {"network__switch_to", "network__switch_command", "network__revert_argv"}
        assert "not ansible_check_mode" in scope  # --check changes nothing, so it switches nothing


def test_a_failed_switch_gives_the_cluster_profile_back_every_setting_the_role_sets():
    # nmcli module option -> the NetworkManager setting it writes (the ones that decide where the
    # node answers, and at boot which profile wins)
    written = {"ifname": "connection.interface-name", "method4": "ipv4.method", "ip4": "ipv4.addresses",
               "gw4": "ipv4.gateway", "dns4": "ipv4.dns", "mtu": "802-3-ethernet.mtu",
               "autoconnect": "connection.autoconnect", "autoconnect_priority": "connection.autoconnect-priority"}
    (profile,) = [t["community.general.nmcli"] for t in load(ROLE / "tasks" / "networkmanager.yml")
                  if "community.general.nmcli" in t]
    assert set(profile) - {"conn_name", "type", "state"} == set(written)
    assert load(ROLE / "vars" / "main.yml")["network__profile_settings"] == list(written.values())


def test_the_play_gives_up_on_a_new_address_before_the_node_goes_back():
    defaults = load(ROLE / "defaults" / "main.yml")
    assert defaults["network_revert_after"] >= defaults["network_wait_timeout"] + 30
    assert defaults["network_revert_after"] <= 120  # a failed switch is undone within ~2 minutes


# -- host_vars: where the next run reads the node's address -----------------------------------

PLAY = """---
- name: Run the network role's {tasks_from} for every node
  hosts: cluster
  gather_facts: false
  tasks:
    - name: Run {tasks_from}
      ansible.builtin.include_role:
        name: network
        tasks_from: {tasks_from}
      vars:
        network__previous_address: "10.0.0.7"
"""


@pytest.fixture()
def inventory(tmp_path):
    """An inventory of one board that answers at 10.0.0.7 today and is to move to 10.0.5.2;
    every task runs on this machine (the role's host_vars tasks are the controller's anyway)."""
    path = tmp_path / "inventory" / "hosts.yml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"cluster": {
        "hosts": {"pi-root": {"ansible_host": "10.0.0.7", "dllama_address": "10.0.5.2"}},
        "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}}}))
    return path


def play(inventory, tasks_from):
    playbook = inventory.parent.parent / f"{tasks_from}.yml"
    playbook.write_text(PLAY.format(tasks_from=tasks_from))
    # Ansible's own linear strategy: Mitogen (ansible.cfg) pays off over ssh, not for one local task.
    result = run(tool("ansible-playbook"), "-i", str(inventory), str(playbook), timeout=120,
                 ANSIBLE_ROLES_PATH=str(ROOT / "roles"), ANSIBLE_STRATEGY="linear")
    return result, result.stdout + result.stderr


def recap_changed(output):
    (line,) = [line for line in output.splitlines() if line.startswith("pi-root") and "changed=" in line]
    return int(line.split("changed=")[1].split()[0])


def host_vars(inventory):
    result = run(tool("ansible-inventory"), "-i", str(inventory), "--host", "pi-root")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_new_address_is_written_where_the_next_run_reads_it_once(inventory):
    result, output = play(inventory, "persist_address")
    assert result.returncode == 0, output
    written = inventory.parent / "host_vars" / "pi-root.yml"
    assert written.read_text() == (
        "# BEGIN dllama-cluster address (the network role writes it)\n"
        'ansible_host: "10.0.5.2"\n'
        'dllama_previous_address: "10.0.0.7"\n'
        "# END dllama-cluster address (the network role writes it)\n")
    # host_vars outrank the inventory file's own ansible_host
    found = host_vars(inventory)
    assert (found["ansible_host"], found["dllama_previous_address"]) == ("10.0.5.2", "10.0.0.7")
    result, output = play(inventory, "persist_address")
    assert result.returncode == 0 and recap_changed(output) == 0, output


def test_an_address_that_cannot_be_written_stops_the_run_saying_what_to_set(inventory):
    (inventory.parent / "host_vars").write_text("")  # a file where the directory should be
    result, output = play(inventory, "persist_address")
    assert result.returncode != 0
    assert "pi-root answers at 10.0.5.2 now, but" in output
    assert "set `ansible_host: 10.0.5.2` for pi-root in the inventory" in output
    assert "`dllama_previous_address: 10.0.0.7`" in output


def test_teardown_removes_the_lines_it_wrote_and_keeps_the_operators(inventory):
    assert play(inventory, "persist_address")[0].returncode == 0
    written = inventory.parent / "host_vars" / "pi-root.yml"
    written.write_text("dllama_nthreads: 2\n" + written.read_text())
    result, output = play(inventory, "forget_address")
    assert result.returncode == 0, output
    assert written.read_text() == "dllama_nthreads: 2\n"
    assert host_vars(inventory)["ansible_host"] == "10.0.0.7"


def test_teardown_removes_a_host_vars_file_it_alone_wrote_then_changes_nothing(inventory):
    assert play(inventory, "persist_address")[0].returncode == 0
    result, output = play(inventory, "forget_address")
    assert result.returncode == 0, output
    assert not (inventory.parent / "host_vars" / "pi-root.yml").exists()
    result, output = play(inventory, "forget_address")
    assert result.returncode == 0 and recap_changed(output) == 0, output
