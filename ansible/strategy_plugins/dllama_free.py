"""Ansible's `free` strategy, over Mitogen when the controller has it (see dllama_linear.py)."""

try:
    from ansible_mitogen.plugins.strategy.mitogen_free import StrategyModule
except ImportError:
    from ansible.plugins.strategy.free import StrategyModule

__all__ = ["StrategyModule"]
