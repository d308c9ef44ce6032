"""The e2e runner's own logic, without VMs: its lock, the PLAY RECAP reading, the budget verdict."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "vm"))
import run_e2e  # noqa: E402


def test_one_run_at_a_time(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run_e2e, "CACHE", tmp_path / "cache")
    first = run_e2e.take_lock()
    assert first is not None
    with first:
        assert run_e2e.take_lock() is None
        assert "another e2e run holds" in capsys.readouterr().out
    second = run_e2e.take_lock()  # free again once the first run ends
    assert second is not None
    second.close()


def test_the_recap_counts_changes_per_host():
    out = ("TASK [x]\nok: [a]\n\nPLAY RECAP ****\n"
           "pi-root   : ok=12   changed=0    unreachable=0    failed=0\n"
           "pi-w1     : ok=9    changed=2    unreachable=0    failed=1\n")
    hosts = run_e2e.recap(out)
    assert hosts["pi-w1"] == {"ok": 9, "changed": 2, "unreachable": 0, "failed": 1}
    assert run_e2e.changed_summary(hosts) == "pi-root: changed=0, pi-w1: changed=2"


@pytest.mark.parametrize(("how", "total", "passed", "enforce", "verdict"), [
    ("resumed", run_e2e.WARM_BUDGET_S - 1, True, True, True),
    ("resumed", run_e2e.WARM_BUDGET_S + 1, True, False, True),  # reported, not enforced
    ("resumed", run_e2e.WARM_BUDGET_S + 1, True, True, False),
    ("booted", run_e2e.WARM_BUDGET_S + 1, True, True, True),  # a cold run has the cold budget
    ("?", 1.0, False, False, False),  # a failed phase fails the run whatever the time
])
def test_the_budget_verdict(monkeypatch, capsys, how, total, passed, enforce, verdict):
    monkeypatch.setattr(run_e2e, "PHASES", [("boot", 1.0, "ok"), ("checks", 2.0, "failed")])
    assert run_e2e.summary(total, how, passed, enforce) is verdict
    out = capsys.readouterr().out
    assert "checks" in out and "failed" in out and out.rstrip().endswith("PASSED" if verdict else "FAILED")
