"""ansible/teardown.yml and ansible/upgrade.yml.

Both pass Ansible's syntax check and ansible-lint's production profile (tests/test_ansible_lint.py,
with every playbook). teardown.yml takes back
everything a role puts on a node: the roles' own tasks and defaults, rendered by Ansible from the
example inventory (tests/ansible_installs.py), list the paths, units, users and groups, so a file a
role starts to install fails here until teardown.yml (or the network role's teardown) names it.
teardown.yml also runs for real on this machine, every path it removes pointed into a temporary
directory by the inventory. upgrade.yml rolls out one node at a time, workers first, the root
last, each node through the roles site.yml runs on it; its wait for the cluster
(ansible/tasks/cluster_serves.yml) runs against a real dllama-api driving a real worker on
127.0.0.1, and a cluster that does not serve stops it before any node is touched.
"""

import functools
import json
import pwd
import subprocess
import sys
import time
from pathlib import Path

import jinja2
import pytest
import yaml
from ansible_cli import ROOT, run, tool
from test_api_cluster import cluster  # noqa: F401 - the fixture: dllama-api and a real worker on 127.0.0.1

INSTALLS = Path(__file__).with_name("ansible_installs.py")
INVENTORY = ROOT / "inventory" / "hosts.yml"


def load(path):
    return yaml.safe_load((ROOT / path).read_text())


# -- teardown.yml names everything the roles install ----------------------------------------------

# The example inventory, and the model and tokenizer in a directory of their own (not under the
# service user's home, which teardown.yml removes whole).
LAYOUTS = {"example": {}, "model elsewhere": {"dllama_model_path": "/srv/models/model.m",
                                              "dllama_tokenizer_path": "/srv/models/tokenizer"}}


@functools.lru_cache(maxsize=None)
def rendered(layout="example"):
    pytest.importorskip("ansible")
    request = {"inventory": str(INVENTORY), "overrides": LAYOUTS[layout]}
    proc = subprocess.run([sys.executable, str(INSTALLS)], input=json.dumps(request),
                          capture_output=True, text=True, check=False, timeout=120, cwd=INSTALLS.parent)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def installed(kind, layout="example", network=False):
    """(host, value, where it comes from) of what the roles install of `kind`; the network role's
    alone, or every other role's."""
    return [(i["host"], i["value"], f"{i['role']}/{i['via']}: {i['task']}") for i in rendered(layout)["installs"]
            if i["kind"] == kind and (i["role"] == "network") == network]


def removed(found, path):
    """Whether teardown.yml's removals on a host (`found`) take `path` away."""
    return path in found["exact"] or any(path == p or path.startswith(p.rstrip("/") + "/") for p in found["paths"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_task_of_the_roles_is_classified_and_rendered(layout):
    # a module ansible_installs.py does not know may install something teardown.yml must take back
    assert rendered(layout)["unknown"] == []
    assert rendered(layout)["errors"] == []


def test_the_roles_install_what_the_appliance_is_known_for():
    # the rendering finds them at all (an empty list would pass everything below)
    paths = {value for _, value, _ in installed("path")}
    assert {"/opt/dllama/wheelhouse", "/etc/dllama", "/var/cache/dllama", "/var/lib/dllama",
            "/etc/sysctl.d/90-dllama.conf", "/etc/systemd/system/dllama-worker.service",
            "/etc/systemd/system/dllama-api.service"} <= paths
    assert {value for _, value, _ in installed("unit")} >= {"dllama-worker.service", "dllama-api.service"}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_teardown_removes_every_path_a_role_creates(layout):
    teardown = rendered(layout)["teardown"]
    left = [(host, path, where) for host, path, where in installed("path", layout)
            if not removed(teardown[host], path)]
    assert left == []


def test_teardown_stops_and_disables_every_unit_a_role_enables():
    teardown = rendered()["teardown"]
    left = [(host, unit, where) for host, unit, where in installed("unit") if unit not in teardown[host]["units"]]
    assert left == []


def test_teardown_stops_the_firewall_unit_too():
    # dllama-firewall.service loads `table inet dllama`; the table itself goes with `nft delete table`
    assert all("dllama-firewall.service" in found["units"] for found in rendered()["teardown"].values())


def test_teardown_removes_the_service_users_and_groups():
    teardown = rendered()["teardown"]
    for kind in ("user", "group"):
        left = [(host, name, where) for host, name, where in installed(kind) if name not in teardown[host][kind + "s"]]
        assert left == [], kind


def test_network_teardown_names_everything_the_network_role_writes():
    strings = rendered()["network"]
    if strings is None:
        pytest.skip("roles/network/tasks/teardown.yml does not exist yet")
    teardown = rendered()["teardown"]
    left = []
    named = {"strings": strings, "paths": [s for s in strings if s.startswith("/")], "exact": []}
    for kind in ("path", "block", "profile"):
        for host, value, where in installed(kind, network=True):
            if kind == "path":  # removed by either teardown, or under a directory the network's names
                gone = removed(teardown[host], value) or removed(named, value)
            else:  # a block: its file and its marker; a profile: its name
                gone = all(name in strings for name in (value if kind == "block" else [value]))
            if not gone:
                left.append((host, value, where))
    assert left == []


def teardown_tasks():
    (play,) = load("ansible/teardown.yml")
    return play["tasks"]


def module_of(task):
    """The module a task runs ("block" for a block)."""
    return next((k for k in task if k.startswith(("ansible.", "community."))), "block")


def test_teardown_stops_the_services_before_it_removes_a_file():
    modules = [module_of(task) for task in teardown_tasks()]
    assert modules.index("ansible.builtin.systemd_service") < modules.index("ansible.builtin.file")


def test_teardown_gives_the_network_back_last_after_the_handlers():
    *_, flush, network = teardown_tasks()
    assert flush["ansible.builtin.meta"] == "flush_handlers"
    assert network["ansible.builtin.include_role"] == {"name": "network", "tasks_from": "teardown"}
    assert network["tags"] == ["network"]


def test_teardown_loads_the_defaults_of_every_role_site_yml_runs_without_running_one():
    # the network role's teardown is included (and runs); every other role lends its defaults
    site_roles = {role["role"] for play in load("site.yml") for role in play.get("roles", [])}
    imports = [t for t in teardown_tasks() if "ansible.builtin.import_role" in t]
    assert {t["ansible.builtin.import_role"]["name"] for t in imports} == site_roles - {"network"}
    for task in imports:
        assert task["when"] is False and task["tags"] == ["never"], task["name"]


# -- teardown.yml for real, on a layout in a temporary directory ----------------------------------

@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """An installed node's files under a temporary directory, with the model where an inventory may
    put it: its own directory (removed whole) and the tokenizer in a directory holding other files
    (kept, without the tokenizer's)."""
    tool("ansible-playbook")
    tmp = tmp_path_factory.mktemp("teardown")
    user = "dllama-teardown-test"
    try:
        pwd.getpwnam(user)
        pytest.skip(f"a user {user} exists on this machine")
    except KeyError:
        pass
    files = {
        "opt/dllama/bin/python": "", "opt/dllama/.dllama-wheelhouse": "x86_64-cp311.tar sha256:0",
        "opt/dllama/wheelhouse/dllama.whl": "", "etc/dllama/cluster.key": "k", "etc/dllama/api.key": "k",
        "var/cache/dllama/slices/0": "", "var/lib/dllama/.profile": "", "etc/default/cpu_governor": "x",
        "etc/dllama/firewall.nft": "table inet dllama {}", "srv/models/tiny.m": "m", "srv/models/tiny.m.part": "",
        "srv/models/tiny.m.sha256": "0  tiny.m", "home/pi/qwen/tokenizer.json": "{}",
        "home/pi/qwen/tokenizer_config.json": "{}", "home/pi/qwen/config.json": "{}", "home/pi/qwen.sha256": "",
    }
    for name, text in files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(text)
    (tmp / "units").mkdir()
    host = {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable, "ansible_become": False,
        "engine_venv": str(tmp / "opt/dllama"), "worker_config_dir": str(tmp / "etc/dllama"),
        "api_config_dir": str(tmp / "etc/dllama"), "worker_cache_dir": str(tmp / "var/cache/dllama"),
        "firewall_file": str(tmp / "etc/dllama/firewall.nft"),
        "worker_user": user, "api_user": user, "worker_group": user, "api_group": user,
        # absent: its removal would apply this machine's sysctl files again
        "tuning_sysctl_file": str(tmp / "etc/sysctl.d/90-dllama.conf"),
        "dllama_model_path": str(tmp / "srv/models/tiny.m"), "dllama_tokenizer_path": str(tmp / "home/pi/qwen"),
    }
    inventory = {"cluster": {"children": {"root": {"hosts": {"here": host}}, "workers": {"hosts": {}}}}}
    (tmp / "hosts.yml").write_text(yaml.safe_dump(inventory))
    # The play's own paths (extra vars outrank play vars); a table name nothing uses here.
    extra = {"teardown_unit_dir": str(tmp / "units"), "teardown_service_home": str(tmp / "var/lib/dllama"),
             "teardown_governor_file": str(tmp / "etc/default/cpu_governor"),
             "teardown_nft_table": ["inet", "dllama_teardown_test"]}
    (tmp / "extra.json").write_text(json.dumps(extra))
    return tmp


def teardown(layout, *args):
    """teardown.yml on the layout (the network part skipped), with JSON results."""
    proc = run(tool("ansible-playbook"), "-i", str(layout / "hosts.yml"), "ansible/teardown.yml",
               "-e", f"@{layout / 'extra.json'}", "--skip-tags", "network", *args,
               ANSIBLE_STDOUT_CALLBACK="ansible.posix.json", ANSIBLE_CALLBACKS_ENABLED="ansible.posix.json")
    return proc, (json.loads(proc.stdout) if proc.stdout.startswith("{") else None)


def touched_paths(results):
    """Every path a file or find task of the run was given."""
    found = []
    for play in results["plays"]:
        for task in play["tasks"]:
            for result in task["hosts"].values():
                for one in result.get("results", [result]):
                    args = one.get("invocation", {}).get("module_args", {})
                    found += [args["path"]] if "path" in args and isinstance(args["path"], str) else []
                    found += args.get("paths") or []
    return found


@pytest.fixture(scope="module")
def torn_down(layout):
    # First under --check: every path it would touch is inside the layout, and nothing changes.
    before = sorted(str(p) for p in layout.rglob("*"))
    proc, results = teardown(layout, "--check")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr
    assert touched_paths(results) and all(p.startswith(str(layout) + "/") for p in touched_paths(results))
    assert sorted(str(p) for p in layout.rglob("*")) == before
    first, results = teardown(layout)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr
    return results


def test_teardown_removes_the_engine_keys_cache_home_and_governor_setting(layout, torn_down):
    for path in ("opt/dllama", "etc/dllama", "var/cache/dllama", "var/lib/dllama", "etc/default/cpu_governor"):
        assert not (layout / path).exists(), path


def test_teardown_removes_a_model_directory_that_holds_only_the_model(layout, torn_down):
    assert not (layout / "srv/models").exists()
    assert (layout / "srv").is_dir()


def test_teardown_keeps_a_tokenizer_directory_that_holds_other_files(layout, torn_down):
    assert sorted(p.name for p in (layout / "home/pi/qwen").iterdir()) == ["config.json"]
    assert sorted(p.name for p in (layout / "home/pi").iterdir()) == ["qwen"]  # its checksum file gone


def test_a_second_teardown_changes_nothing(layout, torn_down):
    proc, results = teardown(layout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr
    assert results["stats"]["here"]["changed"] == 0


def test_teardown_refuses_to_remove_a_system_directory(layout, torn_down, tmp_path):
    # --check: even a broken guard could not remove anything
    inventory = yaml.safe_load((layout / "hosts.yml").read_text())
    inventory["cluster"]["children"]["root"]["hosts"]["here"]["api_config_dir"] = "/etc"
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory))
    proc = run(tool("ansible-playbook"), "-i", str(tmp_path / "hosts.yml"), "ansible/teardown.yml", "--check",
               "-e", f"@{layout / 'extra.json'}", "--skip-tags", "network")
    assert proc.returncode != 0
    assert "refusing to remove /etc" in proc.stdout, proc.stdout[-3000:]
    assert "Find which of the appliance's units are installed" not in proc.stdout


# -- upgrade.yml --------------------------------------------------------------------------------

def upgrade_plays():
    return load("ansible/upgrade.yml")


def test_upgrade_checks_the_cluster_first_then_goes_one_node_at_a_time():
    check, rollout = upgrade_plays()
    assert check["hosts"] == "root"
    assert check["tasks"][-1]["ansible.builtin.include_tasks"] == "tasks/cluster_serves.yml"
    assert rollout["serial"] == 1 and rollout["max_fail_percentage"] == 0
    # what site.yml runs on the node (the engine, then its service's role), then the wait
    steps = [(module_of(t), (t.get(module_of(t)) or {}).get("name") if module_of(t).endswith("_role") else None,
              t.get("when")) for t in rollout["tasks"] if t.get("tags") != ["never"]]
    assert steps == [
        ("ansible.builtin.import_role", "engine", None),
        ("ansible.builtin.include_role", "worker", "inventory_hostname in groups['workers']"),
        ("ansible.builtin.include_role", "api", "inventory_hostname in groups['root']"),
        ("ansible.builtin.include_tasks", None, None),
    ]
    assert rollout["tasks"][-1]["ansible.builtin.include_tasks"] == "tasks/cluster_serves.yml"


def test_the_roles_find_their_templates_from_ansible():
    # a role's template is looked up beside the playbook too: ansible/templates is templates/
    link = ROOT / "ansible" / "templates"
    assert link.is_symlink() and link.resolve() == (ROOT / "templates").resolve()


def test_upgrade_goes_through_every_worker_before_the_root():
    # The order a play runs its hosts in (order: inventory), from Ansible's inventory itself
    # (`--list-hosts` prints a set). A child process: see ansible_render.py.
    (rollout_hosts,) = [play["hosts"] for play in upgrade_plays() if play.get("serial")]
    script = ("import json, sys; from ansible_render import inventory; _, inv, _ = inventory(sys.argv[1]); "
              "print(json.dumps([h.name for h in inv.get_hosts(sys.argv[2], order='inventory')]))")
    proc = subprocess.run([sys.executable, "-c", script, str(INVENTORY), rollout_hosts], capture_output=True,
                          text=True, check=False, timeout=120, cwd=INSTALLS.parent)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["pi-worker1", "pi-worker3", "pi-worker4", "pi-root"]


def test_upgrade_stops_before_it_touches_a_node_when_the_cluster_does_not_serve(tmp_path):
    # The API's port on the root is one nothing listens on. --check: should the check pass all the
    # same, nothing would be installed on this machine.
    from test_api import _free_port

    host = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable, "ansible_become": False,
            "api_port": _free_port(), "api_key_file": str(tmp_path / "no-key"),
            "engine_venv": str(tmp_path / "venv"), "dllama_model_path": "/m.m", "dllama_tokenizer_path": "/t"}
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump({"cluster": {"children": {
        "root": {"hosts": {"here": host}}, "workers": {"hosts": {}}}}}))
    proc = run(tool("ansible-playbook"), "-i", str(tmp_path / "hosts.yml"), "ansible/upgrade.yml", "--check",
               "-e", "upgrade_timeout=4")
    assert proc.returncode != 0
    assert "before the upgrade: the API on here does not serve: a completion answers -1" in proc.stdout, \
        proc.stdout[-3000:]
    assert "Install the new engine" not in proc.stdout and "engine :" not in proc.stdout


# -- the wait for the cluster, against a real dllama-api and worker --------------------------------

@pytest.fixture(scope="module")
def api_cluster(cluster, tmp_path_factory):
    """test_api_cluster.py's cluster (dllama-api with an API key, driving a real worker), and a
    directory for the playbook."""
    tool("ansible-playbook")
    srv, worker = cluster
    return tmp_path_factory.mktemp("upgrade-wait"), srv, worker


def wait_for_cluster(root, srv, timeout, stage="the test"):
    """ansible/tasks/cluster_serves.yml on this machine as the root, against the server `srv`."""
    playbook = root / "wait.yml"
    playbook.write_text(yaml.safe_dump([{
        "name": "Wait for the cluster", "hosts": "root", "gather_facts": False,
        "vars": {"upgrade_root": "here", "upgrade_api_url": srv.url, "upgrade_hint": "",
                 "upgrade_api_key_file": str(srv.log.with_name("api-key")),  # where start_server put it
                 "upgrade_timeout": timeout, "upgrade_stage": stage},
        "tasks": [{"name": "Wait", "ansible.builtin.include_tasks": str(ROOT / "ansible/tasks/cluster_serves.yml")}],
    }]))
    (root / "hosts.yml").write_text(yaml.safe_dump({"root": {"hosts": {"here": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable}}}}))
    return run(tool("ansible-playbook"), "-i", str(root / "hosts.yml"), str(playbook), ANSIBLE_BECOME="false")


def test_the_wait_passes_at_once_on_a_serving_cluster(api_cluster):
    root, srv, _ = api_cluster
    proc = wait_for_cluster(root, srv, timeout=30)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr
    assert "RETRYING" not in proc.stdout


def test_the_wait_rides_out_a_restarted_worker(api_cluster):
    # what an upgrade's restart leaves: the API reconnects (its node watch saw the new worker, or
    # the wait's first request met the lost one and answered 503 until then)
    root, srv, worker = api_cluster
    worker.kill()
    worker.start()
    proc = wait_for_cluster(root, srv, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr
    assert srv.health().json()["status"] == "ok"


def test_the_wait_fails_naming_the_stage_and_the_worker_that_stays_down(api_cluster):
    root, srv, worker = api_cluster
    worker.kill()
    try:
        start = time.monotonic()
        proc = wait_for_cluster(root, srv, timeout=10, stage="after upgrading here")
        took = time.monotonic() - start
    finally:
        worker.start()
    assert proc.returncode != 0
    assert "after upgrading here: the API on here does not serve" in proc.stdout, proc.stdout[-3000:]
    assert f"workers down: 127.0.0.1:{worker.port}" in proc.stdout, proc.stdout[-3000:]
    assert took < 120
