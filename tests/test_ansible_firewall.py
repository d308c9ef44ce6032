"""The firewall role as site.yml runs it, with --check --diff on this machine over a local
connection (a worker w1 and a root r1): nothing here is changed, the table it would write is the
one the template renders for that node, and without nft the run stops naming the package."""

import json
import sys
from pathlib import Path

import pytest
import yaml
from ansible_cli import run, tool

HAS_NFT = Path("/usr/sbin/nft").exists()
WRITE = "firewall : Write the dllama table, checked by nft first"
UNIT = "firewall : Install the unit that loads the table at boot"


def check_run(tmp, **cluster_vars):
    """{host: {task name: [results]}} of site.yml --check --diff --tags firewall on w1 and r1."""
    inventory = {"cluster": {
        "children": {"workers": {"hosts": {"w1": {"dllama_address": "10.9.0.1"}}},
                     "root": {"hosts": {"r1": {"dllama_address": "10.9.0.2"}}}},
        "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                 "ansible_become": False, "dllama_prefix": 24,
                 # the model role's arguments are checked even where --tags skips it
                 "dllama_model_path": "/var/lib/dllama/models/m.m", "dllama_tokenizer_path": "/var/lib/dllama/tok",
                 **cluster_vars},
    }}
    (tmp / "hosts.yml").write_text(yaml.safe_dump(inventory))
    proc = run(tool("ansible-playbook"), "-i", str(tmp / "hosts.yml"), "site.yml", "--check", "--diff",
               "--tags", "firewall", "--skip-tags", "preflight",
               ANSIBLE_STDOUT_CALLBACK="ansible.posix.json", ANSIBLE_CALLBACKS_ENABLED="ansible.posix.json")
    results = {"w1": {}, "r1": {}}
    for play in json.loads(proc.stdout)["plays"]:
        for task in play["tasks"]:
            for host, result in task["hosts"].items():
                results[host].setdefault(task["task"]["name"], []).append(result)
    return proc.returncode, results


@pytest.fixture(scope="module")
def enabled(tmp_path_factory):
    if Path("/etc/systemd/system/dllama-firewall.service").exists():
        pytest.skip("dllama-firewall is installed on this machine: its files would not be new here")
    return check_run(tmp_path_factory.mktemp("firewall"))


def after(results, host, task):
    (result,) = [r for r in results[host][task] if not r.get("skipped")]
    diff = result["diff"][0] if isinstance(result["diff"], list) else result["diff"]
    return result, diff["after"]


@pytest.mark.skipif(not HAS_NFT, reason="no nft here: see test_without_nft_the_run_stops_naming_the_package")
@pytest.mark.parametrize("host", ["w1", "r1"])
def test_a_fresh_node_would_get_the_table_and_its_unit(enabled, host):
    rc, results = enabled
    assert rc == 0
    written, table = after(results, host, WRITE)
    assert written["changed"] and written["invocation"]["dest"] == "/etc/dllama/firewall.nft"
    assert "table inet dllama\ndelete table inet dllama\n" in table
    unit, text = after(results, host, UNIT)
    assert unit["changed"] and "ExecStart=/usr/sbin/nft --file /etc/dllama/firewall.nft" in text
    # under --check a unit not installed yet is neither started nor reloaded
    (reload_handler,) = results[host]["firewall : reload dllama-firewall"]
    assert reload_handler["skipped"]


@pytest.mark.skipif(not HAS_NFT, reason="no nft here")
def test_each_node_guards_its_own_ports(enabled):
    _, results = enabled
    _, worker = after(results, "w1", WRITE)
    _, root = after(results, "r1", WRITE)
    assert "tcp dport 9999 ip saddr @peers accept" in worker and "tcp dport 8080" not in worker
    assert "elements = { 10.9.0.1, 10.9.0.2 }" in worker
    # this machine's own ephemeral range, on the worker's cluster address
    first, last = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    assert f"ip daddr 10.9.0.1 tcp dport {first}-{last} " in worker
    assert "tcp dport 8080 ip saddr @api_clients accept" in root and "tcp dport 9999" not in root
    assert "elements = { 10.9.0.2/24 }" in root


@pytest.mark.skipif(HAS_NFT, reason="nft is installed here")
def test_without_nft_the_run_stops_naming_the_package(enabled):
    rc, results = enabled
    assert rc != 0
    for host in ("w1", "r1"):
        (stop,) = results[host]["firewall : Stop when nft is missing"]
        assert stop["failed"] and "nftables" in stop["msg"] and "dllama_firewall: false" in stop["msg"]


def test_turned_off_it_warns_and_writes_nothing(tmp_path):
    rc, results = check_run(tmp_path, dllama_firewall=False)
    assert rc == 0
    for host in ("w1", "r1"):
        (warning,) = results[host]["firewall : Warn that the cluster's ports stay open"]
        assert "ports are open" in warning["msg"]
        assert all(r.get("skipped") for r in results[host][WRITE])
