"""Ansible's `linear` strategy, run over Mitogen when the controller has it installed.

Without Mitogen every task starts a new Python on the node that compiles Ansible's
module_utils from source before doing anything: 5-10 s per task on a slow board, most of a
site.yml run. Mitogen keeps one interpreter per node for the whole run. Without the `mitogen`
package (ansible/requirements.txt) this is Ansible's own strategy: the same result, slower.

Host keys as ansible.cfg's ssh_args say (StrictHostKeyChecking=accept-new): Mitogen's ssh puts
its own `StrictHostKeyChecking yes` (host_key_checking on) or `no` ahead of them, and ssh takes
the first; its "accept" mode is accept-new (ssh asks about a new key and Mitogen says yes; a
changed key is refused), so a checked connection uses that. Importing this module sets it for
every Mitogen connection of the run (dllama_free imports it too).
"""

try:
    from ansible_mitogen import connection as _mitogen_connection
    from ansible_mitogen.plugins.strategy.mitogen_linear import StrategyModule
except ImportError:
    from ansible.plugins.strategy.linear import StrategyModule
else:
    _checked_ssh = _mitogen_connection.CONNECTION_METHOD["ssh"]

    def _ssh_accepting_new_host_keys(spec):
        params = _checked_ssh(spec)
        if params["kwargs"].get("check_host_keys") == "enforce":
            params["kwargs"]["check_host_keys"] = "accept"
        return params

    if getattr(_checked_ssh, "__name__", "") != "_ssh_accepting_new_host_keys":
        _mitogen_connection.CONNECTION_METHOD.update(ssh=_ssh_accepting_new_host_keys,
                                                     smart=_ssh_accepting_new_host_keys)

__all__ = ["StrategyModule"]
