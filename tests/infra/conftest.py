"""Infra tests: facts about provisioned nodes, checked with pytest-testinfra over ssh.

They need nodes: the e2e harness boots VMs, runs site.yml and then

    DLLAMA_INFRA_INVENTORY=/path/to/its/hosts.yml pytest tests/infra

Without DLLAMA_INFRA_INVENTORY every test here is skipped (a normal `pytest tests` run). Each
module picks its hosts from the inventory's groups (cluster, workers, root); `--hosts` is not
needed. The connection (user, become, ssh options) is the inventory's, as Ansible uses it.
"""

import os
import sys
from functools import lru_cache
from pathlib import Path

import pytest
from infra_hosts import INVENTORY

HERE = Path(__file__).resolve().parent
if INVENTORY:  # testinfra runs ansible-inventory: the one installed beside this Python
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
SKIP_REASON = "no nodes: set DLLAMA_INFRA_INVENTORY to an inventory of provisioned nodes (make e2e does)"


@lru_cache(maxsize=1)
def _inventory():
    """Every host's variables, templated by Ansible itself (dllama_address may be a template)."""
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar
    from ansible.vars.manager import VariableManager

    loader = DataLoader()
    inventory = InventoryManager(loader=loader, sources=[INVENTORY])
    variables = VariableManager(loader=loader, inventory=inventory)
    nodes = {}
    for host in inventory.get_hosts("cluster"):
        templar = Templar(loader=loader, variables=variables.get_vars(host=host))
        get = lambda name, default=None: templar.template(templar.available_variables.get(name, default))  # noqa: E731
        nodes[host.name] = {
            "name": host.name,
            "groups": [g.name for g in host.get_groups()],
            "address": get("dllama_address") or get("ansible_host") or host.name,
            "prefix": int(get("dllama_prefix", 24)),
            "interface": get("dllama_interface", "eth0"),
            "mtu": int(get("dllama_mtu", 9000)),
            "nthreads": get("dllama_nthreads"),
            "model_path": get("dllama_model_path"),
            "tokenizer_path": get("dllama_tokenizer_path"),
        }
    return nodes


@pytest.fixture(scope="session")
def cluster():
    """name -> what the inventory says about that node."""
    return _inventory()


@pytest.fixture(scope="session")
def cluster_key():
    """The key the playbook generated on the controller, next to the inventory."""
    return (Path(INVENTORY).parent / "secrets" / "cluster.key").read_text().strip()


@pytest.fixture()
def node(host, cluster):
    """What the inventory says about the node `host` is connected to."""
    return cluster[host.backend.get_hostname()]


def pytest_collection_modifyitems(config, items):
    if INVENTORY:
        # Under `pytest -n N --dist loadgroup` one worker takes all of a node's checks: it opens one
        # ssh connection (seconds in a slow guest) instead of one per worker and node.
        for item in items:
            spec = getattr(item, "callspec", None)
            if spec is not None and "_testinfra_host" in spec.params:
                item.add_marker(pytest.mark.xdist_group(spec.params["_testinfra_host"].backend.get_hostname()))
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)
