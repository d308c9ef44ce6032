"""The roles' shape: every knob in defaults/main.yml is prefixed with the role's name and
validated by meta/argument_specs.yml; every template a role writes exists in templates/; every
notified handler exists under its lowercase name; the worker and api roles keep their knobs and
hand them to the service role they share."""

import json
import re
from pathlib import Path

import jinja2
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ROLES = ["network", "firewall", "tuning", "engine", "model", "service", "worker", "api"]
# The roles that run a dllama service through the service role, with their unit.
SERVICES = {"worker": "dllama-worker", "api": "dllama-api"}


def load(path):
    with path.open() as f:
        return yaml.safe_load(f) or {}


def tasks(role, parts=("tasks", "handlers")):
    """Every task of a role's task and handler files, blocks flattened."""
    found = []

    def walk(items):
        for item in items or []:
            found.append(item)
            for key in ("block", "rescue", "always"):
                walk(item.get(key))

    for path in sorted((ROOT / "roles" / role).glob("*/*.yml")):
        if path.parent.name in parts:
            walk(load(path))
    return found


def imports_of(role):
    """The vars of every import of `role` by another role's tasks."""
    return [task["vars"] for other in ROLES for task in tasks(other, parts=("tasks",))
            if task.get("ansible.builtin.import_role", {}).get("name") == role]


@pytest.mark.parametrize("role", ROLES)
def test_role_has_the_geerlingguy_files(role):
    for part in ("defaults/main.yml", "meta/main.yml", "meta/argument_specs.yml", "tasks/main.yml"):
        assert (ROOT / "roles" / role / part).is_file(), f"roles/{role}/{part}"


@pytest.mark.parametrize("role", ROLES)
def test_every_knob_is_prefixed_and_has_an_argument_spec(role):
    defaults = load(ROOT / "roles" / role / "defaults" / "main.yml")
    specs = load(ROOT / "roles" / role / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]
    assert all(name.startswith(f"{role}_") for name in defaults), sorted(defaults)
    assert set(defaults) <= set(specs)
    # an option without a default is one its caller must pass (the service role's)
    assert all(name in defaults or spec.get("required") for name, spec in specs.items())
    assert all(spec.get("description") for spec in specs.values())


@pytest.mark.parametrize("role", ROLES)
def test_every_knob_is_commented(role):
    lines = (ROOT / "roles" / role / "defaults" / "main.yml").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(rf"{role}_\w+:", line):
            above = lines[:i]
            # the knob's comment is the nearest non-knob, non-blank line above (knobs may share one)
            while above and (re.match(rf"({role}_\w+:|\s+)", above[-1]) or not above[-1].strip()):
                above.pop()
            assert above and above[-1].startswith("#"), f"{role}: {line}"


@pytest.mark.parametrize("role", ROLES)
def test_templates_a_role_writes_exist_beside_site_yml(role):
    for task in tasks(role):
        args = task.get("ansible.builtin.template")
        if args:
            # a templated source (the service role's) is rendered with each caller's values
            callers = imports_of(role) if "{{" in args["src"] else [{}]
            assert callers, f"{role}: {args['src']} is templated but no role imports {role}"
            for values in callers:
                src = jinja2.Template(args["src"]).render(values)
                assert (ROOT / "templates" / src).is_file(), src


@pytest.mark.parametrize("role", ROLES)
def test_notified_handlers_exist_under_their_lowercase_names(role):
    # A handler answers to its listen topics, or to its name when it has none (the service role's
    # `restart {{ service_unit }}`: a listen topic cannot be templated).
    handlers = tasks(role, parts=("handlers",))
    topics = {topic for h in handlers for topic in ([h["listen"]] if isinstance(h.get("listen"), str)
                                                    else h.get("listen") or [h["name"]])}
    assert all(name == name.lower() for name in topics)
    for task in tasks(role):
        notify = task.get("notify")
        for name in [notify] if isinstance(notify, str) else notify or []:
            assert name in topics, f"{role}: notify {name!r} has no handler"


@pytest.mark.parametrize("role", ROLES)
def test_task_names_are_imperative_sentences(role):
    # a handler without listen topics is named by its notification, lowercase: not a sentence
    for task in tasks(role, parts=("tasks",)) + [h for h in tasks(role, parts=("handlers",)) if "listen" in h]:
        name = task.get("name", "")
        assert name and name[0].isupper(), f"{role}: {task}"
        assert not name.endswith("."), name


# What operators set on the two service roles (inventory, group_vars, -e) before they shared the
# service role (commit 3d9f9eb); the dllama_* names they fall back to are in inventory/hosts.yml.
OPERATOR_KNOBS = {
    "worker": {"worker_venv", "worker_user", "worker_group", "worker_host", "worker_port", "worker_nthreads",
               "worker_cluster_key_source", "worker_config_dir", "worker_cluster_key_file", "worker_cache_dir",
               "worker_extra_args", "worker_memory_max", "worker_restart_sec"},
    "api": {"api_venv", "api_user", "api_group", "api_port", "api_model_path", "api_tokenizer_path",
            "api_buffer_float_type", "api_nthreads", "api_max_seq_len", "api_workers", "api_workers_group",
            "api_worker_port", "api_cluster_key_source", "api_config_dir", "api_cluster_key_file", "api_key",
            "api_key_file", "api_extra_args", "api_memory_max", "api_restart_sec"},
}


@pytest.mark.parametrize("role", SERVICES)
def test_service_roles_keep_every_knob_operators_set(role):
    assert OPERATOR_KNOBS[role] <= set(load(ROOT / "roles" / role / "defaults" / "main.yml"))


@pytest.mark.parametrize("role", SERVICES)
def test_service_roles_run_their_unit_through_the_service_role_alone(role):
    # one place for how a dllama service is installed, configured and restarted
    (task,) = tasks(role)
    assert task["ansible.builtin.import_role"] == {"name": "service"}
    assert task["vars"]["service_unit"] == SERVICES[role]
    assert not (ROOT / "roles" / role / "handlers").exists()


@pytest.mark.parametrize("role", SERVICES)
def test_service_roles_pass_every_option_the_service_role_requires(role):
    (values,) = [task["vars"] for task in tasks(role)]
    specs = load(ROOT / "roles" / "service" / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]
    assert {name for name, spec in specs.items() if spec.get("required")} <= set(values) <= set(specs)


def test_site_yml_checks_first_then_prepares_every_node_then_serves_by_group():
    preflight, *plays = load(ROOT / "site.yml")
    assert preflight["ansible.builtin.import_playbook"] == "ansible/preflight.yml"
    layout = [(p["hosts"], [(r["role"], r.get("when")) for r in p["roles"]]) for p in plays]
    assert layout == [
        ("cluster", [("network", None), ("firewall", None), ("tuning", None), ("engine", None)]),
        ("cluster", [("worker", "inventory_hostname in groups['workers']"),
                     ("model", "inventory_hostname in groups['root']")]),
        # a play of its own: the API (re)starts after every worker has, and after the model is in place
        ("root", [("api", None)]),
    ]
    assert plays[1]["strategy"] == "dllama_free"
    for play in plays:
        assert play["become"] is True
        assert all(r.get("tags") == [r["role"]] for r in play["roles"])


def test_requirements_pin_the_collections_the_roles_use():
    pins = {c["name"]: c["version"] for c in load(ROOT / "ansible" / "requirements.yml")["collections"]}
    assert set(pins) == {"community.general", "ansible.posix"}
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", v) for v in pins.values())
    used = set()
    for path in list((ROOT / "roles").rglob("*.yml")) + [ROOT / "ansible" / "health.yml", ROOT / "ansible.cfg"]:
        used |= set(re.findall(r"\b(community\.general|ansible\.posix)\.", path.read_text()))
    assert used <= set(pins)


def test_requirements_match_the_installed_ansible_bundle():
    collections = pytest.importorskip("ansible_collections")
    pins = {c["name"]: c["version"] for c in load(ROOT / "ansible" / "requirements.yml")["collections"]}
    base = Path(collections.__path__[0])
    for name, version in pins.items():
        manifest = base / name.replace(".", "/") / "MANIFEST.json"
        installed = json.loads(manifest.read_text())["collection_info"]["version"]
        assert installed == version, f"{name}: pinned {version}, the ansible package bundles {installed}"


def test_engine_installs_no_package_and_builds_nothing_unless_a_node_opts_in():
    # A node gets our wheel for its kind: apt runs only in the block that building from source
    # opts in to, uv makes the venv (no python3-venv) and never builds a package otherwise.
    def walk(items, conditions):
        for item in items or []:
            when = item.get("when", [])
            scope = conditions + (when if isinstance(when, list) else [when])
            yield item, scope
            for key in ("block", "rescue", "always"):
                yield from walk(item.get(key), scope)

    found = list(walk(load(ROOT / "roles" / "engine" / "tasks" / "main.yml"), []))
    apt = [(task, scope) for task, scope in found if "ansible.builtin.apt" in task]
    assert apt
    for task, scope in apt:
        assert "engine_build_from_source | bool" in scope, task["name"]
    text = (ROOT / "roles" / "engine" / "tasks" / "main.yml").read_text()
    assert "-m, venv" not in text and "- venv\n" in text
    (install,) = [t for t, _ in found if t.get("name") == "Install the engine and its dependencies"]
    assert "['--no-build']" in install["ansible.builtin.command"]["argv"]


# -- what a service's unit fingerprints (issue 15: restarts that always happen) ------------------

def test_no_role_hands_an_engine_change_over_in_a_fact():
    # a fact is lost when a run stops before the restart; the unit's fingerprint is not
    for role in ROLES:
        for path in (ROOT / "roles" / role).rglob("*.yml"):
            assert "engine_reinstalled" not in path.read_text(), path


def test_services_fingerprint_the_record_the_engine_role_writes():
    (record,) = [t for t in tasks("engine") if t.get("name") == "Record which wheelhouse the engine came from"]
    assert record["ansible.builtin.copy"]["dest"] == "{{ engine_venv }}/.dllama-wheelhouse"
    service_vars = load(ROOT / "roles" / "service" / "vars" / "main.yml")
    assert "{'DLLAMA_ENGINE': service_venv ~ '/.dllama-wheelhouse'}" in service_vars["service__fingerprint_files"]
    for role in SERVICES:
        (values,) = [task["vars"] for task in tasks(role)]
        assert values["service_venv"] == f"{{{{ {role}_venv }}}}"


def test_the_api_fingerprints_the_checksum_files_the_model_role_records():
    model_vars = load(ROOT / "roles" / "model" / "vars" / "main.yml")
    api_vars = load(ROOT / "roles" / "api" / "vars" / "main.yml")
    assert model_vars["model__checksum_file"] == "{{ model_path }}.sha256"
    assert model_vars["model__tokenizer_checksum_file"] == "{{ model_tokenizer_path }}.sha256"
    assert api_vars["api__fingerprints"] == {"DLLAMA_MODEL": "{{ api_model_path }}.sha256",
                                             "DLLAMA_TOKENIZER": "{{ api_tokenizer_path }}.sha256"}
    # the same paths on the root: both roles default to the inventory's dllama_* paths
    for model_knob, api_knob in (("model_path", "api_model_path"), ("model_tokenizer_path", "api_tokenizer_path")):
        assert (load(ROOT / "roles" / "model" / "defaults" / "main.yml")[model_knob]
                == load(ROOT / "roles" / "api" / "defaults" / "main.yml")[api_knob])
    (values,) = [task["vars"] for task in tasks("api")]
    assert values["service_fingerprints"] == "{{ api__fingerprints }}"
