"""A node's figures: the Pi's throttling word decoded, what this machine's sysfs gives, and the
root's checks on what a worker reports, against real `dllama worker` processes and scripted
hostile ones over real TCP."""
from __future__ import annotations

import json
import math
import time

import pytest

from cluster_helpers import WorkerProcess
from hostile_peers import StatsWorker
from dllama.cluster import node_stats
from dllama.cluster.errors import ClusterError
from dllama.cluster.protocol import HEADER, MAGIC, VERSION, Frame
from dllama.cluster.root import WorkerAddress
from dllama.cluster.stats_client import BadReport, StatsLink, refused

KEY = b"a cluster key for the figures test"
GOOD = {"instance": "0123456789abcdef0123456789abcdef", "serving": False,
        "figures": {"temperature_c": 48.3, "cpu_mhz": 2400.0, "load1": 0.5, "cpus": 4, "rss_bytes": 1 << 20,
                    "mem_total_bytes": 8 << 30, "mem_available_bytes": 6 << 30, "throttled": 0x50005}}


def test_throttled_word_decodes_now_and_since_boot():
    word = node_stats.decode_throttled(0x50005)
    assert word["now"] == {"under_voltage": True, "freq_capped": False, "throttled": True, "soft_temp_limit": False}
    assert word["since_boot"] == {"under_voltage": True, "freq_capped": False, "throttled": True,
                                  "soft_temp_limit": False}
    only_past = node_stats.decode_throttled(0xA0000)
    assert not any(only_past["now"].values())
    assert only_past["since_boot"] == {"under_voltage": False, "freq_capped": True, "throttled": False,
                                       "soft_temp_limit": True}
    assert node_stats.decode_throttled(0x8) == {
        "now": {"under_voltage": False, "freq_capped": False, "throttled": False, "soft_temp_limit": True},
        "since_boot": dict.fromkeys(node_stats.THROTTLE_BITS, False)}
    assert node_stats.decode_throttled(None) is None  # no vcgencmd: "n/a", not "all clear"


def test_this_machine_reports_what_it_has():
    figures = node_stats.read_local()
    assert set(figures) == set(node_stats.FIELDS)
    assert figures["rss_bytes"] > 10 << 20 and figures["cpus"] >= 1
    assert 0 < figures["mem_available_bytes"] <= figures["mem_total_bytes"]
    assert figures["load1"] >= 0
    assert node_stats.check_figures(figures) == figures  # the root accepts what a worker reads


@pytest.mark.parametrize("figures, problem", [
    ({"temperature_c": math.nan}, "temperature_c is out of range"),
    ({"temperature_c": math.inf}, "temperature_c is out of range"),
    ({"temperature_c": 1e9}, "temperature_c is out of range"),
    ({"cpu_mhz": "2400"}, "cpu_mhz is not a number"),
    ({"cpus": True}, "cpus is not an integer"),
    ({"cpus": 4.5}, "cpus is not an integer"),
    ({"rss_bytes": -1}, "rss_bytes is out of range"),
    ({"throttled": 1 << 40}, "throttled is out of range"),
    ({"load1": [1, 2]}, "load1 is not a number"),
])
def test_the_root_refuses_figures_out_of_shape(figures, problem):
    with pytest.raises(ValueError, match=problem):
        node_stats.check_figures(figures)


def test_the_root_keeps_only_known_fields():
    kept = node_stats.check_figures({"cpus": 2, "extra": "x" * 100, "nested": {"a": 1}})
    assert set(kept) == set(node_stats.FIELDS) and kept["cpus"] == 2 and kept["temperature_c"] is None


def test_a_real_worker_answers_stats_and_a_restart_shows_as_a_new_instance(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    key_file.chmod(0o600)
    worker = WorkerProcess("--cluster-key-file", str(key_file))
    link = StatsLink(WorkerAddress.parse(worker.address), KEY)
    try:
        first, again = link.ask(), link.ask()  # the second over the kept connection
        assert first.instance == again.instance and first.serving is False
        assert first.figures["rss_bytes"] > 10 << 20 and first.figures["cpus"] >= 1
        wrong = StatsLink(WorkerAddress.parse(worker.address), b"another key of sixteen bytes or more")
        with pytest.raises(ClusterError, match="cluster key"):
            wrong.ask()
        worker.stop()
        with pytest.raises(ClusterError) as gone:
            link.ask()
        assert refused(gone.value)  # nobody listens: the process is gone
        worker = WorkerProcess("--cluster-key-file", str(key_file))
        link = StatsLink(WorkerAddress.parse(worker.address), KEY)
        assert link.ask().instance != first.instance
    finally:
        link.close()
        log = worker.stop()
    assert "Traceback" not in log


@pytest.mark.parametrize("answer, error, problem", [
    (lambda ch: ch.send(Frame.STATS, json.dumps({**GOOD, "figures": {"temperature_c": 1e308 * 10}}).encode()),
     BadReport, "temperature_c is out of range"),  # json's Infinity
    (lambda ch: ch.send(Frame.STATS, b'{"instance": "0123456789abcdef0123456789abcdef", "serving": false, '
                                     b'"figures": {"load1": NaN}}'), BadReport, "load1 is out of range"),
    (lambda ch: ch.send(Frame.STATS, json.dumps({**GOOD, "instance": "../../etc"}).encode()),
     BadReport, "instance is not 32 hex digits"),
    (lambda ch: ch.send(Frame.STATS, json.dumps({**GOOD, "serving": "yes"}).encode()), BadReport, "serving"),
    (lambda ch: ch.send(Frame.STATS, json.dumps({**GOOD, "figures": []}).encode()), BadReport, "not a JSON object"),
    (lambda ch: ch.send(Frame.STATS, b"[" * 100_000), ClusterError, "over the limit"),
    (lambda ch: ch.send(Frame.STATS, b"{not json"), ClusterError, "not valid JSON"),
    (lambda ch: ch.send(Frame.CONFIG_OK, b"{}"), ClusterError, "expected STATS, got CONFIG_OK"),
    # a header that announces a huge frame: refused before a byte of it is read or allocated
    (lambda ch: ch.sock.sendall(HEADER.pack(MAGIC, VERSION, Frame.STATS, 1 << 31)), ClusterError, "over the limit"),
    (lambda ch: time.sleep(3), ClusterError, "timed out"),  # says nothing: the wait is bounded
])
def test_a_hostile_stats_reply_is_refused_with_a_reason(answer, error, problem):
    peer = StatsWorker(KEY, answer)
    link = StatsLink(WorkerAddress.parse(peer.address), KEY, timeout=1.0)
    try:
        started = time.monotonic()
        with pytest.raises(error, match=problem) as caught:
            link.ask()
        assert time.monotonic() - started < 5
        assert peer.address in str(caught.value)
        assert not refused(caught.value)  # it answered: not a vanished worker
    finally:
        link.close()
        peer.close()


def test_a_good_scripted_reply_is_taken():
    peer = StatsWorker(KEY, lambda ch: ch.send_json(Frame.STATS, GOOD))
    link = StatsLink(WorkerAddress.parse(peer.address), KEY)
    try:
        report = link.ask()
        assert report.instance == GOOD["instance"] and report.figures["throttled"] == 0x50005
    finally:
        link.close()
        peer.close()


def test_a_worker_serves_a_bounded_number_of_figures_connections(tmp_path):
    from dllama.cluster.stats_service import MAX_CONVERSATIONS

    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    key_file.chmod(0o600)
    worker = WorkerProcess("--cluster-key-file", str(key_file))
    links = [StatsLink(WorkerAddress.parse(worker.address), KEY) for _ in range(MAX_CONVERSATIONS + 1)]
    try:
        for link in links[:-1]:
            link.ask()  # each kept open
        with pytest.raises(ClusterError, match=f"at most {MAX_CONVERSATIONS} figures connections"):
            links[-1].ask()
        links[0].close()
        deadline = time.monotonic() + 5
        while True:  # the freed place is taken by the next caller
            try:
                links[-1].ask()
                break
            except ClusterError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        for link in links:
            link.close()
        log = worker.stop()
    assert "Traceback" not in log
