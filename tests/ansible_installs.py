"""What the roles put on a node and what ansible/teardown.yml takes away, each rendered by Ansible's
own templating from the example inventory (inventory/hosts.yml) and the roles' defaults, for
tests/test_ansible_playbooks.py. Runs as a child process (see ansible_render.py): a JSON request
on stdin ({inventory, overrides}: host variables set over the inventory's), JSON on stdout:

  installs:   [{role, task, kind, value}]  every file, directory, unit, user, group, /etc block and
              NetworkManager profile a role's task creates, on a worker and on the root
  teardown:   {host: {paths, exact, units, users, groups}}  what teardown.yml removes (paths with
              everything under them, exact only themselves), stops or deletes
  network:    the strings roles/network/tasks/teardown.yml and the files it includes name (null
              while it does not exist)
  unknown:    modules a role uses that this file does not classify yet (a new one must be)
  errors:     what could not be rendered

Every task counts whatever its `when` (the most a node can get); a task delegated to the
controller puts nothing on the node.
"""
import json
import sys
from pathlib import Path

import yaml
from ansible.template import Templar, trust_as_template
from ansible_render import ROOT, imports, inventory, role_file, trusted

HOSTS = ("pi-worker1", "pi-root")
# module -> [(kind, argument)] of what it creates on the node.
CREATES = {
    "ansible.builtin.template": [("path", "dest")],
    "ansible.builtin.copy": [("path", "dest")],
    "ansible.builtin.unarchive": [("path", "dest")],
    "ansible.builtin.get_url": [("path", "dest")],
    "ansible.builtin.file": [("path", "path")],  # unless state is absent or the file's own (mode, owner)
    "ansible.builtin.command": [("path", "creates")],
    "ansible.posix.sysctl": [("path", "sysctl_file")],
    "ansible.builtin.user": [("user", "name"), ("path", "home")],
    "ansible.builtin.group": [("group", "name")],
    "ansible.builtin.systemd_service": [("unit", "name")],  # when it enables the unit
    "ansible.builtin.blockinfile": [("block", "path")],
    "community.general.nmcli": [("profile", "conn_name")],
}
# Modules that create nothing on the node, or nothing teardown.yml takes back: apt's packages stay
# (curl, the build packages), the other tools may be used by anything else on the board.
CREATES_NOTHING = {
    "ansible.builtin.assert", "ansible.builtin.set_fact", "ansible.builtin.debug", "ansible.builtin.stat",
    "ansible.builtin.slurp", "ansible.builtin.shell", "ansible.builtin.meta", "ansible.builtin.include_tasks",
    "ansible.builtin.import_role", "ansible.builtin.include_role", "ansible.builtin.wait_for_connection",
    "ansible.builtin.async_status", "ansible.builtin.find", "ansible.builtin.apt", "ansible.builtin.uri",
    "ansible.builtin.validate_argument_spec", "ansible.builtin.import_tasks", "ansible.builtin.fail",
}
TASK_KEYS = {"name", "when", "loop", "loop_control", "register", "notify", "vars", "tags", "become", "delegate_to",
             "changed_when", "failed_when", "check_mode", "no_log", "async", "poll", "retries", "delay", "until",
             "block", "rescue", "always", "listen", "run_once", "ignore_errors", "environment", "args",
             "ignore_unreachable"}
# What a task's registered result looks like to the rendering of the tasks after it: the most a
# node can get (a file that exists, a command that succeeded).
REGISTERED = {"stat": {"exists": True}, "rc": 0, "stdout": "", "stdout_lines": [], "results": [], "changed": True,
              "matched": 0, "files": []}
# Host variables set over the inventory's: an API key of the rendering's own (unset, the api role
# would generate one with a lookup that writes it on this machine), and a request's "overrides"
# (another layout of the node).
OVERRIDES = {"dllama_api_key": "a key of the rendering's own"}
# The modules teardown.yml removes things with.
REMOVES = {"ansible.builtin.file", "ansible.builtin.systemd_service", "ansible.builtin.user", "ansible.builtin.group"}


def load(path):
    return yaml.safe_load(Path(path).read_text()) or []


def walk(tasks, inherited=None, delegate_to=None):
    """(task, the vars of the blocks around it and its own) for every task, blocks flattened; a
    task in a block delegated elsewhere is given the block's delegate_to."""
    for task in tasks or []:
        scope = {**(inherited or {}), **(task.get("vars") or {})}
        if delegate_to and "delegate_to" not in task:
            task = {**task, "delegate_to": delegate_to}
        yield task, scope
        for key in ("block", "rescue", "always"):
            yield from walk(task.get(key), scope, task.get("delegate_to"))


def module_of(task):
    modules = [k for k in task if k not in TASK_KEYS]
    return (modules[0], task[modules[0]]) if modules else (None, None)


class Renderer:
    def __init__(self, inv, context, tasks=()):
        """Renders in `context`, with a result for every name `tasks` register."""
        self.loader = inv[0]
        facts = {**context.get("ansible_facts", {}), "processor_nproc": 4}
        registered = {task["register"]: REGISTERED for task, _ in tasks if "register" in task}
        self.variables = {**registered, **context, "ansible_facts": facts}

    def __call__(self, value, **extra):
        if isinstance(value, str):
            templar = Templar(loader=self.loader, variables={**self.variables, **extra})
            return templar.template(trust_as_template(value))
        if isinstance(value, list):
            return [self(v, **extra) for v in value]
        if isinstance(value, dict):
            return {k: self(v, **extra) for k, v in value.items()}
        return value

    def items(self, task, scope):
        """The variables of each run of a task: its scope (templated when read), and each item of its loop."""
        scope = trusted(scope)
        loop = task.get("loop")
        if loop is None:
            return [scope]
        name = (task.get("loop_control") or {}).get("loop_var", "item")
        return [{**scope, name: item} for item in self(trusted(loop), **scope)]

    def args(self, args, keys, extra):
        """The arguments named in `keys` rendered (the others may read what earlier tasks registered)."""
        return {k: self(trusted(args[k]), **extra) for k in keys if k in args}


def host_vars_of(inv, host):
    """The inventory's variables of `host`, with the request's overrides (another layout)."""
    _, inventory_manager, variables = inv
    return {**variables.get_vars(host=inventory_manager.get_host(host)), **OVERRIDES}


def context_for(inv, host, role, importer=None, import_vars=None):
    """Role defaults < inventory < role vars < the vars an importing role passes, like a play."""
    host_vars = host_vars_of(inv, host)
    defaults = {**role_file(role, "defaults"), **(role_file(importer, "defaults") if importer else {})}
    role_vars = {**(role_file(importer, "vars") if importer else {}), **role_file(role, "vars")}
    return {**defaults, **host_vars, **role_vars, **(import_vars or {})}


def role_tasks(role):
    """Every task of a role's task files but its teardown (a role's way back, not what it installs)."""
    found = []
    for path in sorted((ROOT / "roles" / role / "tasks").glob("*.yml")):
        if path.stem != "teardown":
            found += list(walk(load(path)))
    return found


def installs_of(role, host, inv, out, import_vars=None, importer=None):
    """What `role` (imported by `importer` with `import_vars`, or run itself) creates on `host`."""
    context = context_for(inv, host, role, importer, import_vars)
    tasks = role_tasks(role)
    render = Renderer(inv, trusted(context), tasks)
    for task, scope in tasks:
        module, args = module_of(task)
        if module is None or module in CREATES_NOTHING:
            continue
        if module not in CREATES:
            out["unknown"].append(f"{role}: {task.get('name')} ({module})")
            continue
        if task.get("delegate_to") in ("localhost", "127.0.0.1"):
            continue
        args = args if isinstance(args, dict) else {}
        try:
            for extra in render.items(task, scope):
                if not creates(module, render.args(args, ["state", "enabled"], extra)):
                    continue
                rendered = render.args(args, [key for _, key in CREATES[module]] + ["marker"], extra)
                for kind, key in CREATES[module]:
                    value = rendered.get(key)
                    if not value:
                        continue
                    if kind == "block":
                        value = [value, rendered.get("marker", "# {mark} ANSIBLE MANAGED BLOCK")]
                    if kind == "unit" and "." not in value:
                        value += ".service"
                    out["installs"].append({"role": importer or role, "via": role, "host": host,
                                            "task": task.get("name"), "kind": kind, "value": value})
        except Exception as e:  # noqa: BLE001 - reported to the test, which names the task
            out["errors"].append(f"{role} on {host}: {task.get('name')}: {e}")


def creates(module, args):
    state = args.get("state", "present")
    if state == "absent":
        return False
    if module == "ansible.builtin.file":
        return state in ("directory", "touch", "link", "hard")
    if module == "ansible.builtin.systemd_service":
        return args.get("enabled") is True
    return True


def top_level_roles():
    """Roles a play runs; a role only other roles import (the service role) is rendered through them."""
    roles = sorted(p.name for p in (ROOT / "roles").iterdir() if (p / "tasks" / "main.yml").is_file())
    imported = {name for role in roles for name, _ in imports(role)}
    return [r for r in roles if r not in imported]


def teardown_removals(inv, host, out):
    """What each task of teardown.yml removes on `host`, rendered like its play: the defaults of the
    roles it imports < inventory < the play's vars."""
    (play,) = load(ROOT / "ansible" / "teardown.yml")
    tasks = list(walk(play.get("tasks"))) + list(walk(play.get("handlers")))
    imported = [t["ansible.builtin.import_role"]["name"] for t, _ in tasks if "ansible.builtin.import_role" in t]
    defaults, role_vars = {}, {}
    for role in imported:
        for name, _ in imports(role):
            defaults.update(role_file(name, "defaults"))
        defaults.update(role_file(role, "defaults"))
        role_vars.update(role_file(role, "vars"))
    context = {**defaults, **host_vars_of(inv, host), **role_vars, **play.get("vars", {})}
    render = Renderer(inv, trusted(context), tasks)
    conditional = set(under_when(play.get("tasks")))
    found = {"paths": [], "exact": [], "units": [], "users": [], "groups": []}
    for task, scope in tasks:
        module, args = module_of(task)
        if module not in REMOVES:
            continue
        try:
            for extra in render.items(task, scope):
                rendered = render.args(args, ["path", "name", "state", "enabled"], extra)
                if module == "ansible.builtin.file" and rendered.get("state") == "absent":
                    # a directory removed only when it holds nothing else takes nothing with it
                    found["exact" if id(task) in conditional else "paths"].append(rendered["path"])
                elif module == "ansible.builtin.systemd_service" and rendered.get("state") == "stopped" \
                        and rendered.get("enabled") is False:
                    found["units"].append(rendered["name"])
                elif module == "ansible.builtin.user" and rendered.get("state") == "absent":
                    found["users"].append(rendered["name"])
                elif module == "ansible.builtin.group" and rendered.get("state") == "absent":
                    found["groups"].append(rendered["name"])
        except Exception as e:  # noqa: BLE001 - reported to the test
            out["errors"].append(f"teardown.yml on {host}: {task.get('name')}: {e}")
    return found


def under_when(tasks, inherited=False):
    """id() of every task that runs only on a condition (its own `when` or its block's)."""
    for task in tasks or []:
        conditional = inherited or "when" in task
        if conditional:
            yield id(task)
        for key in ("block", "rescue", "always"):
            yield from under_when(task.get(key), conditional)


def network_teardown_strings(inv, host):
    """Every string roles/network/tasks/teardown.yml (and the task files it includes) passes to a
    module, as written and rendered (where it cannot be rendered, as written only)."""
    path = ROOT / "roles" / "network" / "tasks" / "teardown.yml"
    if not path.exists():
        return None
    tasks, files = [], [path]
    while files:  # the teardown's tasks and those of the files it includes or imports
        found = list(walk(load(files.pop())))
        tasks += found
        for task, _ in found:
            for key in ("ansible.builtin.include_tasks", "ansible.builtin.import_tasks"):
                if isinstance(task.get(key), str) and (path.parent / task[key]).is_file():
                    files.append(path.parent / task[key])
    render = Renderer(inv, trusted(context_for(inv, host, "network")), tasks)
    strings = []

    def collect(value):
        if isinstance(value, str):
            strings.append(value)
        elif isinstance(value, list):
            for v in value:
                collect(v)
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)

    for task, scope in tasks:
        _, args = module_of(task)
        collect([args, task.get("loop")])
        try:
            for extra in render.items(task, scope):
                collect(render(trusted(args), **extra))
                collect(list(extra.values()))
        except Exception:  # noqa: BLE001 - not renderable here: the text as written was kept
            continue
    return strings


def main():
    request = json.load(sys.stdin)
    OVERRIDES.update(request.get("overrides", {}))
    inv = inventory(request["inventory"])
    out = {"installs": [], "teardown": {}, "network": None, "unknown": [], "errors": []}
    for host in HOSTS:
        for role in top_level_roles():
            installs_of(role, host, inv, out)
            for name, import_vars in imports(role):
                installs_of(name, host, inv, out, import_vars=import_vars, importer=role)
        out["teardown"][host] = teardown_removals(inv, host, out)
    out["network"] = network_teardown_strings(inv, HOSTS[0])
    json.dump(out, sys.stdout, default=str)


if __name__ == "__main__":
    main()
