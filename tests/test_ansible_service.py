"""The service role as site.yml runs it: the serve play (worker, model, api) with --check --diff on
a fresh worker and a fresh root, both this machine over a local connection. Check mode changes
nothing here; the only writes are the controller's cluster key and its .gitignore, in a temporary
directory. This shows what rendering a template alone cannot: the worker and api roles reach the
shared service role with their own knobs (every one set, tests/ansible_units/every-knob.yml), the
unit each would write is byte for byte the one before the roles shared it, each restart
notification finds the handler of its own unit, and a fresh node fails nothing under --check (the
end-to-end run's first step)."""

import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from ansible_cli import run, tool

UNITS = Path(__file__).with_name("ansible_units")
HOSTS = {"w1": ("worker", "dllama-worker"), "r1": ("api", "dllama-api")}


@pytest.fixture(scope="module")
def check_run(tmp_path_factory):
    playbook = tool("ansible-playbook")
    for _, unit in HOSTS.values():
        if Path(f"/etc/systemd/system/{unit}.service").exists():
            pytest.skip(f"{unit} is installed on this machine: its unit would not be a new file here")
    tmp = tmp_path_factory.mktemp("service")
    knobs = yaml.safe_load((UNITS / "every-knob.yml").read_text())
    inventory = {"cluster": {
        "children": {"workers": {"hosts": {"w1": knobs["worker"]}}, "root": {"hosts": {"r1": knobs["api"]}}},
        "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                 "ansible_become": False, "dllama_cluster_key_source": str(tmp / "secrets" / "cluster.key"),
                 # the model role's arguments are checked even where --tags skips it
                 "dllama_model_path": "/var/lib/dllama/models/m.m", "dllama_tokenizer_path": "/var/lib/dllama/tok"},
    }}
    (tmp / "hosts.yml").write_text(yaml.safe_dump(inventory))
    # JSON on stdout; the callback list may not be empty, and ansible.cfg's profile_tasks would
    # print its table into the JSON.
    proc = run(playbook, "-i", str(tmp / "hosts.yml"), "site.yml", "--check", "--diff",
               "--tags", "worker,api", "--skip-tags", "preflight",
               ANSIBLE_STDOUT_CALLBACK="ansible.posix.json", ANSIBLE_CALLBACKS_ENABLED="ansible.posix.json")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr
    results = {host: {} for host in HOSTS}
    for play in json.loads(proc.stdout)["plays"]:
        for task in play["tasks"]:
            for host, result in task["hosts"].items():
                results[host].setdefault(task["task"]["name"], []).append(result)
    return tmp, results


def ran(results, host):
    """{task name: [results]} of the tasks that were not skipped on host."""
    return {name: [r for r in rs if not r.get("skipped")] for name, rs in results[host].items()
            if any(not r.get("skipped") for r in rs)}


@pytest.mark.parametrize("host", HOSTS)
def test_a_fresh_node_fails_nothing_under_check(check_run, host):
    _, results = check_run
    failed = [name for name, rs in results[host].items() if any(r.get("failed") for r in rs)]
    assert not failed


@pytest.mark.parametrize("host", HOSTS)
def test_check_shows_the_unit_as_it_was_before_the_shared_role(check_run, host):
    _, results = check_run
    role, unit = HOSTS[host]
    (written,) = ran(results, host)[f"service : Install the systemd unit of {unit}"]
    assert written["changed"] and written["invocation"]["dest"] == f"/etc/systemd/system/{unit}.service"
    (diff,) = written["diff"] if isinstance(written["diff"], list) else [written["diff"]]
    assert diff["after"] == (UNITS / f"{unit}.every-knob.service").read_text()


@pytest.mark.parametrize("host", HOSTS)
def test_each_node_notifies_the_restart_handler_of_its_own_unit(check_run, host):
    _, results = check_run
    _, unit = HOSTS[host]
    handlers = {name for name in results[host] if re.fullmatch(r"service : restart \S+", name)}
    assert handlers == {f"service : restart {unit}"}
    # a unit that is not installed yet is not restarted under --check
    (handler,) = results[host][f"service : restart {unit}"]
    assert handler["skipped"] and "ansible_check_mode" in handler["false_condition"]


@pytest.mark.parametrize("host", HOSTS)
def test_a_fresh_node_would_get_the_group_the_user_and_the_unit(check_run, host):
    _, results = check_run
    _, unit = HOSTS[host]
    changed = {name for name, rs in ran(results, host).items() if any(r.get("changed") for r in rs)}
    # the controller's .gitignore is written for real, by whichever node gets there first
    changed.discard("service : Keep the controller's copy of the key out of git")
    assert changed == {"service : Create the dllama system group", "service : Create the dllama system user",
                       f"service : Install the systemd unit of {unit}"}


def test_the_cluster_key_is_generated_once_on_the_controller_and_kept_out_of_git(check_run):
    tmp, _ = check_run
    assert re.fullmatch(r"[0-9a-f]{64}", (tmp / "secrets" / "cluster.key").read_text().strip())
    assert (tmp / "secrets" / ".gitignore").read_text() == "*\n"
