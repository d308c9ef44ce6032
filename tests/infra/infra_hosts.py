"""Which nodes the infra tests run on: the groups of the inventory in DLLAMA_INFRA_INVENTORY."""

import os

INVENTORY = os.environ.get("DLLAMA_INFRA_INVENTORY", "")


def hosts(group):
    """testinfra_hosts for a module: every host of `group`, or none (all skipped) without nodes."""
    return [f"ansible://{group}?ansible_inventory={INVENTORY}"] if INVENTORY else []
