"""Ansible's `free` strategy, over Mitogen when the controller has it (see dllama_linear.py)."""

from ansible.plugins.loader import strategy_loader

try:
    from ansible_mitogen.plugins.strategy.mitogen_free import StrategyModule
except ImportError:
    from ansible.plugins.strategy.free import StrategyModule

# dllama_linear's import makes Mitogen's ssh accept new host keys as ansible.cfg asks.
strategy_loader.get("dllama_linear", class_only=True)

__all__ = ["StrategyModule"]
