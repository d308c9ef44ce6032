"""The files the appliance writes on a node, rendered by Ansible's own templating from the example
inventory (inventory/hosts.yml) and the roles' defaults, as `ansible-playbook site.yml` would."""

import functools
import json
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


def render(inventory, template, host, role, **extra):
    """Role defaults < inventory < role vars < extra, like a play running `role` on `host`."""
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
        "/opt/dllama/bin/dllama worker --port 9999 --nthreads 4 --host 0.0.0.0"
        " --cluster-key-file /etc/dllama/cluster.key --cache-dir /var/cache/dllama"
    )


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
        " --port 8080 --cluster-key-file /etc/dllama/cluster.key"
    )


def test_api_unit_restarts_always_as_the_dedicated_user(inventory):
    unit = render(inventory, "dllama-api.service.j2", "pi-root", "api")
    assert one(unit, "Restart") == "always"
    assert one(unit, "User") == "dllama"
    assert one(unit, "StartLimitIntervalSec") == "0"


def test_api_unit_passes_the_client_key_file_only_when_a_key_is_set(inventory):
    without = render(inventory, "dllama-api.service.j2", "pi-root", "api")
    with_key = render(inventory, "dllama-api.service.j2", "pi-root", "api", api_key="s3cret")
    assert "--api-key-file" not in one(without, "ExecStart")
    assert "--api-key-file /etc/dllama/api.key" in one(with_key, "ExecStart")
    assert "s3cret" not in with_key


def test_api_unit_takes_explicit_workers_and_a_worker_cluster_address(inventory):
    explicit = render(inventory, "dllama-api.service.j2", "pi-root", "api", api_workers=["a:1", "b:2"])
    assert "--workers a:1 b:2 --port" in one(explicit, "ExecStart")


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


# -- both units, byte for byte as before the shared template -------------------------------------
# A node provisioned before the units shared dllama-service-unit.j2 sees no change and no restart.

@pytest.mark.parametrize("unit,host,role", [("dllama-worker", "pi-worker3", "worker"), ("dllama-api", "pi-root", "api")])
@pytest.mark.parametrize("case", ["example", "every-knob"])
def test_unit_renders_exactly_as_before_the_shared_template(inventory, unit, host, role, case):
    knobs = yaml.safe_load((UNITS / "every-knob.yml").read_text())[role] if case == "every-knob" else {}
    expected = (UNITS / f"{unit}.{case}.service").read_text()
    assert render(inventory, f"{unit}.service.j2", host, role, **knobs) == expected


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
