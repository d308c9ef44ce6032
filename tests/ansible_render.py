"""Renders one appliance template as `ansible-playbook` would, for tests/test_ansible_templates.py:
a JSON request on stdin (inventory, template, host, role, extra vars), the text on stdout."""
import json
import sys
from pathlib import Path

import yaml
from ansible.inventory.manager import InventoryManager
from ansible.parsing.dataloader import DataLoader
from ansible.template import Templar, trust_as_template
from ansible.vars.hostvars import HostVars
from ansible.vars.manager import VariableManager

ROOT = Path(__file__).resolve().parent.parent


def trusted(value):
    """Strings from the repository's own YAML may hold templates (Ansible trusts its own files)."""
    if isinstance(value, str):
        return trust_as_template(value)
    if isinstance(value, dict):
        return {k: trusted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [trusted(v) for v in value]
    return value


def role_file(role, kind):
    path = ROOT / "roles" / role / kind / "main.yml"
    if not path.exists():
        return {}
    with path.open() as f:
        return trusted(yaml.safe_load(f) or {})


def imports(role):
    """(role, vars) of every role that `role`'s tasks import: the worker and api roles import the
    service role with its service_* values taken from their own knobs."""
    path = ROOT / "roles" / role / "tasks" / "main.yml"
    found = []
    for task in (yaml.safe_load(path.read_text()) if path.exists() else None) or []:
        args = task.get("ansible.builtin.import_role")
        if args:
            found.append((args["name"], trusted(task.get("vars", {}))))
    return found


def inventory(path):
    loader = DataLoader()
    inv = InventoryManager(loader=loader, sources=[path])
    return loader, inv, VariableManager(loader=loader, inventory=inv)


def render(inventory, template, host, role, **extra):
    """Role defaults < inventory < role vars < the vars `role` imports a role with < extra, like a
    play running `role` on `host`; templates/ is the search path of {% extends %}, as for the
    template module."""
    loader, inv, variables = inventory
    host_vars = variables.get_vars(host=inv.get_host(host))
    imported = imports(role)
    context = {
        **{k: v for name, _ in imported for k, v in role_file(name, "defaults").items()},
        **role_file(role, "defaults"),
        **host_vars,
        "hostvars": HostVars(inventory=inv, variable_manager=variables, loader=loader),
        **role_file(role, "vars"),
        **{k: v for _, import_vars in imported for k, v in import_vars.items()},
        "ansible_managed": "Ansible managed",
        "ansible_facts": {"processor_nproc": 4},
        **trusted(extra),
    }
    source = (ROOT / "templates" / template).read_text()
    templar = Templar(loader=loader, variables=context).copy_with_new_env(searchpath=[str(ROOT / "templates")])
    return templar.template(trust_as_template(source))


def inventory_facts(inv_tuple):
    """Groups and every host's variables, as JSON (what the inventory tests check)."""
    loader, inv, variables = inv_tuple
    hosts = {}
    for host in inv.get_hosts():
        hv = variables.get_vars(host=host)
        hosts[host.name] = {k: v for k, v in hv.items() if k.startswith(("ansible_host", "dllama_"))}
    return {"groups": inv.get_groups_dict(), "hosts": hosts}


if __name__ == "__main__":
    request = json.load(sys.stdin)
    inv_tuple = inventory(request["inventory"])
    if request.get("mode") == "inventory":
        json.dump(inventory_facts(inv_tuple), sys.stdout, default=str)
    else:
        sys.stdout.write(render(inv_tuple, request["template"], request["host"], request["role"], **request["extra"]))
