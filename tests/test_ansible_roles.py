"""The roles' shape: every knob in defaults/main.yml is prefixed with the role's name and
validated by meta/argument_specs.yml; every template a role writes exists in templates/; every
notified handler exists under its lowercase name."""

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ROLES = ["network", "tuning", "engine", "model", "worker", "api"]


def load(path):
    with path.open() as f:
        return yaml.safe_load(f) or {}


def tasks(role):
    """Every task of a role's task and handler files, blocks flattened."""
    found = []

    def walk(items):
        for item in items or []:
            found.append(item)
            for key in ("block", "rescue", "always"):
                walk(item.get(key))

    for path in sorted((ROOT / "roles" / role).glob("*/*.yml")):
        if path.parent.name in ("tasks", "handlers"):
            walk(load(path))
    return found


@pytest.mark.parametrize("role", ROLES)
def test_role_has_the_geerlingguy_files(role):
    for part in ("defaults/main.yml", "meta/main.yml", "meta/argument_specs.yml", "tasks/main.yml"):
        assert (ROOT / "roles" / role / part).is_file(), f"roles/{role}/{part}"


@pytest.mark.parametrize("role", ROLES)
def test_every_knob_is_prefixed_and_has_an_argument_spec(role):
    defaults = load(ROOT / "roles" / role / "defaults" / "main.yml")
    specs = load(ROOT / "roles" / role / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]
    assert all(name.startswith(f"{role}_") for name in defaults), sorted(defaults)
    assert set(defaults) == set(specs)
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
            assert (ROOT / "templates" / args["src"]).is_file(), args["src"]


@pytest.mark.parametrize("role", ROLES)
def test_notified_handlers_exist_under_their_lowercase_names(role):
    all_tasks = tasks(role)
    listens = {t.get("listen") for t in all_tasks if "listen" in t}
    assert all(name == name.lower() for name in listens)
    for task in all_tasks:
        notify = task.get("notify")
        for name in [notify] if isinstance(notify, str) else notify or []:
            assert name in listens, f"{role}: notify {name!r} has no handler"


@pytest.mark.parametrize("role", ROLES)
def test_task_names_are_imperative_sentences(role):
    for task in tasks(role):
        if "listen" in task:
            continue
        name = task.get("name", "")
        assert name and name[0].isupper(), f"{role}: {task}"
        assert not name.endswith("."), name


def test_site_yml_checks_first_then_prepares_every_node_then_serves_by_group():
    preflight, *plays = load(ROOT / "site.yml")
    assert preflight["ansible.builtin.import_playbook"] == "ansible/preflight.yml"
    layout = [(p["hosts"], [(r["role"], r.get("when")) for r in p["roles"]]) for p in plays]
    assert layout == [
        ("cluster", [("network", None), ("tuning", None), ("engine", None)]),
        ("cluster", [("worker", "inventory_hostname in groups['workers']"),
                     ("model", "inventory_hostname in groups['root']"),
                     ("api", "inventory_hostname in groups['root']")]),
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
