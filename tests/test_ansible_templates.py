"""The files the appliance writes on a node, rendered by Ansible's own templating from the example
inventory (inventory/hosts.yml) and the roles' defaults, as `ansible-playbook site.yml` would."""

import base64
import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ansible")

ROOT = Path(__file__).resolve().parent.parent
UNITS = Path(__file__).with_name("ansible_units")
# Ansible patches interpreter internals when imported (sys.intern among them), which breaks
# torch in the same process: the rendering runs in a child process of its own.
RENDER = Path(__file__).with_name("ansible_render.py")


@pytest.fixture(scope="module")
def inventory():
    return str(ROOT / "inventory" / "hosts.yml")


@functools.lru_cache(maxsize=None)
def _render(inventory_path, template, host, role, extra_json):
    request = {"inventory": inventory_path, "template": template, "host": host, "role": role,
               "extra": json.loads(extra_json)}
    run = subprocess.run([sys.executable, str(RENDER)], input=json.dumps(request), capture_output=True, text=True,
                         check=False, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout


# What the service role reads from a node into a unit's environment (the fingerprints of what it
# runs, roles/service/vars/main.yml): a fresh node's, where no file is there yet...
FRESH_NODE = {"dllama-worker.service.j2": {"DLLAMA_ENGINE": "none"},
              "dllama-api.service.j2": {"DLLAMA_ENGINE": "none", "DLLAMA_MODEL": "none", "DLLAMA_TOKENIZER": "none"}}
# ...and a provisioned node's (the engine role's record, the model role's checksum files, their
# words on one line), for the example units.
ENGINE = "aarch64-cp313.tar sha256:" + "1f" * 32
EXAMPLE_NODE = {"dllama-worker.service.j2": {"DLLAMA_ENGINE": ENGINE},
                "dllama-api.service.j2": {"DLLAMA_ENGINE": ENGINE, "DLLAMA_MODEL": "2e" * 32 + " qwen3_30b_a3b_q40.m",
                                          "DLLAMA_TOKENIZER": "3d" * 32 + " tokenizer.json " + "4c" * 32
                                          + " tokenizer_config.json"}}
# The firewall role's read of the node's ephemeral port range (slurp: base64 of the /proc file).
PORT_RANGE = {"content": base64.b64encode(b"32768\t60999\n").decode()}


def render(inventory, template, host, role, **extra):
    """Role defaults < inventory < role vars < extra, like a play running `role` on `host`; a
    service unit on a fresh node unless extra has service__environment."""
    if template in FRESH_NODE:
        extra.setdefault("service__environment", FRESH_NODE[template])
    return _render(inventory, template, host, role, json.dumps(extra, sort_keys=True))


def directives(unit):
    """`Key=value` lines of a systemd unit, with backslash continuations joined."""
    joined = unit.replace("\\\n", " ")
    found = {}
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(" ".join(value.split()))
    return found


def one(unit, key):
    values = directives(unit)[key]
    assert len(values) == 1, f"{key} appears {len(values)} times"
    return values[0]


# -- the example inventory ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def facts(inventory):
    run = subprocess.run([sys.executable, str(RENDER)], input=json.dumps({"inventory": inventory, "mode": "inventory"}),
                         capture_output=True, text=True, check=False, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_example_inventory_has_one_root_and_three_workers_under_cluster(facts):
    groups = facts["groups"]
    assert groups["root"] == ["pi-root"]
    assert sorted(groups["workers"]) == ["pi-worker1", "pi-worker3", "pi-worker4"]
    assert sorted(groups["cluster"]) == sorted(groups["root"] + groups["workers"])


def test_example_inventory_addresses_and_cluster_settings(facts):
    hosts = {h: facts["hosts"][h] for h in ("pi-root", "pi-worker1", "pi-worker3", "pi-worker4")}
    assert {h: v["ansible_host"] for h, v in hosts.items()} == {
        "pi-root": "10.0.0.2", "pi-worker1": "10.0.0.1", "pi-worker3": "10.0.0.3", "pi-worker4": "10.0.0.4",
    }
    root = hosts["pi-root"]
    assert root["dllama_interface"] == "eth0"
    assert root["dllama_mtu"] == 9000
    assert root["dllama_nthreads"] == 4
    assert root["dllama_gateway"] and root["dllama_dns"]
    assert root["dllama_model_path"].endswith(".m")
    assert root["dllama_tokenizer_path"]


# -- dllama-worker.service ---------------------------------------------------------------------

def test_worker_unit_runs_dllama_worker_with_the_known_flags(inventory):
    unit = render(inventory, "dllama-worker.service.j2", "pi-worker3", "worker")
    assert one(unit, "ExecStart") == (
        "/opt/dllama/bin/dllama worker --port 9999 --nthreads 4 --host 10.0.0.3"
        " --cluster-key-file /etc/dllama/cluster.key --cache-dir /var/cache/dllama"
    )


def test_worker_and_its_mesh_listener_listen_on_the_cluster_address_only(inventory):
    # --host is where the worker listens and where its mesh listener binds (dllama/cluster/worker.py)
    moved = render(inventory, "dllama-worker.service.j2", "pi-worker3", "worker", dllama_address="10.0.9.3")
    assert "--host 10.0.9.3 " in one(moved, "ExecStart")
    everywhere = render(inventory, "dllama-worker.service.j2", "pi-worker3", "worker", worker_host="")
    assert "--host" not in one(everywhere, "ExecStart")


def test_worker_unit_restarts_always_as_the_dedicated_user(inventory):
    unit = render(inventory, "dllama-worker.service.j2", "pi-worker1", "worker")
    assert one(unit, "Restart") == "always"
    assert one(unit, "User") == "dllama"
    assert one(unit, "Group") == "dllama"
    assert one(unit, "StartLimitIntervalSec") == "0"
    assert int(one(unit, "RestartSec")) <= 5
    assert one(unit, "WantedBy") == "multi-user.target"


def test_worker_unit_takes_threads_port_and_extra_flags_from_variables(inventory):
    unit = render(inventory, "dllama-worker.service.j2", "pi-worker1", "worker",
                  worker_nthreads=3, worker_port=9000, worker_host="", worker_extra_args=["--debug"],
                  worker_cache_dir="/srv/slices")
    assert one(unit, "ExecStart") == (
        "/opt/dllama/bin/dllama worker --port 9000 --nthreads 3 --debug"
        " --cluster-key-file /etc/dllama/cluster.key --cache-dir /srv/slices"
    )


# -- dllama-api.service ------------------------------------------------------------------------

def test_api_unit_runs_dllama_api_against_every_worker(inventory):
    unit = render(inventory, "dllama-api.service.j2", "pi-root", "api")
    assert one(unit, "ExecStart") == (
        "/opt/dllama/bin/dllama-api"
        " --model /var/lib/dllama/models/qwen3_30b_a3b_q40.m"
        " --tokenizer /var/lib/dllama/models/qwen3_30b_a3b_tokenizer"
        " --buffer-float-type q80 --nthreads 4 --max-seq-len 4096 --parallel 4 --kv-cache-type f32"
        " --workers 10.0.0.1:9999 10.0.0.3:9999 10.0.0.4:9999"
        " --api-key-file /etc/dllama/api.key --port 8080 --cluster-key-file /etc/dllama/cluster.key"
    )


def test_api_unit_restarts_always_as_the_dedicated_user(inventory):
    unit = render(inventory, "dllama-api.service.j2", "pi-root", "api")
    assert one(unit, "Restart") == "always"
    assert one(unit, "User") == "dllama"
    assert one(unit, "StartLimitIntervalSec") == "0"


def test_api_unit_needs_a_client_key_unless_it_is_set_empty(inventory):
    generated = render(inventory, "dllama-api.service.j2", "pi-root", "api")
    own = render(inventory, "dllama-api.service.j2", "pi-root", "api", api_key="s3cret")
    assert "--api-key-file /etc/dllama/api.key" in one(generated, "ExecStart")
    assert "--api-key-file /etc/dllama/api.key" in one(own, "ExecStart")
    assert "s3cret" not in own
    for no_key in ({"api_key": ""}, {"dllama_api_key": ""}):
        assert "--api-key-file" not in one(render(inventory, "dllama-api.service.j2", "pi-root", "api", **no_key),
                                           "ExecStart")


def test_api_unit_takes_explicit_workers_and_a_worker_cluster_address(inventory):
    explicit = render(inventory, "dllama-api.service.j2", "pi-root", "api", api_workers=["a:1", "b:2"])
    assert "--workers a:1 b:2 --api-key-file" in one(explicit, "ExecStart")


def test_api_unit_without_workers_runs_the_root_alone(inventory):
    unit = render(inventory, "dllama-api.service.j2", "pi-root", "api", api_workers_group="nonexistent")
    assert "--workers" not in one(unit, "ExecStart")


# -- both services -----------------------------------------------------------------------------

@pytest.mark.parametrize("template,host,role", [("dllama-worker.service.j2", "pi-worker1", "worker"),
                                                ("dllama-api.service.j2", "pi-root", "api")])
def test_a_service_is_stopped_and_restarted_past_its_memory_limit(inventory, template, host, role):
    unit = render(inventory, template, host, role)
    assert one(unit, "MemoryMax") == "90%"
    assert one(unit, "OOMPolicy") == "stop"
    assert one(render(inventory, template, host, role, dllama_memory_max="6G"), "MemoryMax") == "6G"
    assert one(render(inventory, template, host, role, **{f"{role}_memory_max": "3500M"}), "MemoryMax") == "3500M"


@pytest.mark.parametrize("template,host,role", [("dllama-worker.service.j2", "pi-worker1", "worker"),
                                                ("dllama-api.service.j2", "pi-root", "api")])
def test_a_unit_carries_the_fingerprints_of_what_its_service_runs(inventory, template, host, role):
    # a new engine, model or tokenizer changes the unit, and a changed unit restarts the service
    odd = {"DLLAMA_ENGINE": 'x86_64-cp311.tar sha256:ab "q" 50% \\'}
    unit = render(inventory, template, host, role, service__environment={**EXAMPLE_NODE[template], **odd})
    lines = [line for line in unit.splitlines() if line.startswith("Environment=\"DLLAMA_")]
    assert [line.split("=", 2)[1].strip('"') for line in lines] == sorted(EXAMPLE_NODE[template])
    # quoted for systemd: a space, a quote, a backslash and a specifier's % stay what they are
    assert 'Environment="DLLAMA_ENGINE=x86_64-cp311.tar sha256:ab \\"q\\" 50%% \\\\"' in lines


# -- both units, byte for byte as the references -------------------------------------------------
# Reference units (tests/ansible_units, see every-knob.yml): a change to what a unit holds changes
# what every provisioned node runs (and restarts it), so it shows here first.

@pytest.mark.parametrize("unit,host,role", [("dllama-worker", "pi-worker3", "worker"), ("dllama-api", "pi-root", "api")])
@pytest.mark.parametrize("case", ["example", "every-knob"])
def test_unit_renders_exactly_as_its_reference(inventory, unit, host, role, case):
    template = f"{unit}.service.j2"
    knobs = (yaml.safe_load((UNITS / "every-knob.yml").read_text())[role] if case == "every-knob"
             else {"service__environment": EXAMPLE_NODE[template]})
    expected = (UNITS / f"{unit}.{case}.service").read_text()
    assert render(inventory, template, host, role, **knobs) == expected


# -- firewall ----------------------------------------------------------------------------------

def firewall(inventory, host, **extra):
    return render(inventory, "dllama-firewall.nft.j2", host, "firewall", firewall__port_range=PORT_RANGE, **extra)


def rules(table):
    """The rule lines of the table's input chain, whitespace collapsed."""
    chain = table.split("chain input {", 1)[1]
    return [" ".join(line.split()) for line in chain.splitlines()
            if line.strip() and not line.strip().startswith(("#", "type ", "}"))]


def test_firewall_file_replaces_its_own_table_in_one_transaction(inventory):
    statements = [line for line in firewall(inventory, "pi-worker3").splitlines() if line and not line.startswith("#")]
    assert statements[:3] == ["table inet dllama", "delete table inet dllama", "table inet dllama {"]
    assert "type filter hook input priority filter; policy accept;" in firewall(inventory, "pi-worker3")


def test_firewall_admits_the_worker_and_mesh_ports_from_cluster_peers_only(inventory):
    table = firewall(inventory, "pi-worker3")
    assert "elements = { 10.0.0.1, 10.0.0.2, 10.0.0.3, 10.0.0.4 }" in table
    assert rules(table) == [
        'iif "lo" accept',
        "tcp dport 9999 ip saddr @peers accept",
        "tcp dport 9999 drop",
        # the mesh listener's port: the kernel's ephemeral range, on the cluster address
        "ip daddr 10.0.0.3 tcp dport 32768-60999 tcp flags & (syn | ack) == syn ip saddr != @peers drop",
    ]


def test_firewall_admits_the_api_port_from_the_cluster_subnet_by_default(inventory):
    table = firewall(inventory, "pi-root")
    assert rules(table) == ['iif "lo" accept', "tcp dport 8080 ip saddr @api_clients accept", "tcp dport 8080 drop"]
    assert "elements = { 10.0.0.2/24 }" in table  # nft keeps the network, 10.0.0.0/24


def test_firewall_admits_the_api_port_from_dllama_api_allow(inventory):
    table = firewall(inventory, "pi-root", dllama_api_allow=["192.168.1.0/24", "10.9.9.9"], api_port=8443)
    assert "elements = { 192.168.1.0/24, 10.9.9.9 }" in table
    assert "tcp dport 8443 ip saddr @api_clients accept" in rules(table)
    alone = firewall(inventory, "pi-root", dllama_api_allow=[])
    assert "set api_clients {" in alone and "elements" not in alone.split("set api_clients {", 1)[1].split("}")[0]


@pytest.mark.parametrize("host", ["pi-worker3", "pi-root"])
def test_firewall_file_is_valid_nft(inventory, host, tmp_path):
    # nft itself checks the file (in a network namespace of its own: nothing here is touched)
    nft, unshare = shutil.which("nft"), shutil.which("unshare")
    if not nft or not unshare:
        pytest.skip("nft (Debian package nftables) or unshare is not installed here")
    path = tmp_path / "firewall.nft"
    path.write_text(firewall(inventory, host))
    check = subprocess.run([unshare, "--net", "--map-root-user", nft, "--check", "--file", str(path)],
                           capture_output=True, text=True, check=False)
    if check.returncode != 0 and "unshare" in check.stderr:
        pytest.skip(f"no network namespace of our own here: {check.stderr.strip()}")
    assert check.returncode == 0, check.stderr


def test_firewall_unit_loads_the_table_at_boot_and_deletes_it_on_stop(inventory):
    unit = render(inventory, "dllama-firewall.service.j2", "pi-worker1", "firewall")
    assert one(unit, "Type") == "oneshot" and one(unit, "RemainAfterExit") == "yes"
    assert one(unit, "ExecStart") == one(unit, "ExecReload") == "/usr/sbin/nft --file /etc/dllama/firewall.nft"
    assert one(unit, "ExecStop") == "-/usr/sbin/nft delete table inet dllama"
    assert "network-pre.target" in one(unit, "Before") and one(unit, "After") == "nftables.service"
    assert one(unit, "WantedBy") == "sysinit.target"


# -- tuning ------------------------------------------------------------------------------------

def test_governor_unit_sets_performance_on_every_cpu_at_boot(inventory):
    unit = render(inventory, "dllama-cpu-governor.service.j2", "pi-worker1", "tuning")
    assert one(unit, "Type") == "oneshot"
    assert one(unit, "RemainAfterExit") == "yes"
    assert one(unit, "ConditionPathExists") == "/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"
    assert "echo performance > \"$governor\"" in one(unit, "ExecStart")
    assert "/sys/devices/system/cpu/cpu*/cpufreq/scaling_governor" in one(unit, "ExecStart")
    assert one(unit, "WantedBy") == "multi-user.target"


def test_raspberry_pi_os_governor_file_names_performance(inventory):
    text = render(inventory, "cpu_governor.j2", "pi-worker1", "tuning")
    assert one(text, "CPU_DEFAULT_GOVERNOR") == "performance"


def test_tuning_sysctls_are_the_issue_values():
    defaults = yaml.safe_load((ROOT / "roles" / "tuning" / "defaults" / "main.yml").read_text())
    assert defaults["tuning_sysctl_file"].startswith("/etc/sysctl.d/")
    assert {k: str(v) for k, v in defaults["tuning_sysctls"].items()} == {
        "net.core.rmem_max": "16777216",
        "net.core.wmem_max": "16777216",
        "net.ipv4.tcp_rmem": "4096 87380 16777216",
        "net.ipv4.tcp_wmem": "4096 87380 16777216",
    }


# -- network -----------------------------------------------------------------------------------

def test_mtu_udev_rule_sets_jumbo_frames_on_the_cluster_interface(inventory):
    rule = render(inventory, "70-dllama-mtu.rules.j2", "pi-worker1", "network")
    line = [l for l in rule.splitlines() if l and not l.startswith("#")]
    assert line == [
        'ACTION=="add", SUBSYSTEM=="net", KERNEL=="eth0", RUN+="/sbin/ip link set dev eth0 mtu 9000"'
    ]
