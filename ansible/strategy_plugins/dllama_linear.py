"""Ansible's `linear` strategy, run over Mitogen when the controller has it installed.

Without Mitogen every task starts a new Python on the node that compiles Ansible's
module_utils from source before doing anything: 5-10 s per task on a slow board, most of a
site.yml run. Mitogen keeps one interpreter per node for the whole run. Without the `mitogen`
package (ansible/requirements.txt) this is Ansible's own strategy: the same result, slower.
"""

try:
    from ansible_mitogen.plugins.strategy.mitogen_linear import StrategyModule
except ImportError:
    from ansible.plugins.strategy.linear import StrategyModule

__all__ = ["StrategyModule"]
