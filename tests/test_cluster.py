"""Tensor parallelism with real `dllama worker` processes on 127.0.0.1: the same logits as one
node, the cluster key, garbage on the worker port, a worker killed mid-generation, the cache."""
from __future__ import annotations

import os
import socket
import struct
import threading
import time

import numpy as np
import pytest

from cluster_helpers import WorkerProcess, Workers
from dllama import Engine
from dllama.cluster.protocol import HEADER, MAGIC, VERSION, Frame
from dllama.engine import WorkerLost
from dllama.testing.checkpoint import make_model_file

PROMPT = [9707, 11, 1879, 0, 3838, 374, 279, 6722, 315]
DECODE = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster-models")
    return {
        "qwen3_moe": make_model_file(root / "moe.m", preset="tiny", arch="qwen3_moe", weights="f32", seed=1),
        "qwen3": make_model_file(root / "qwen3.m", preset="tiny", arch="qwen3", weights="f32", seed=2),
        "llama": make_model_file(root / "llama.m", preset="tiny", arch="llama", weights="f32", seed=3),
        "qwen3_q40": make_model_file(root / "qwen3-q40.m", preset="tiny", arch="qwen3", weights="q40", seed=4),
    }


def run_steps(engine: Engine) -> list[np.ndarray]:
    """Logits of the prompt, then of 8 greedy decode steps."""
    out = [engine.forward(PROMPT)]
    for _ in range(DECODE):
        out.append(engine.forward([int(np.argmax(out[-1]))]))
    return out


def single_node(model, buffer="f32") -> list[np.ndarray]:
    with Engine(model, nthreads=1, max_seq_len=64, buffer_float_type=buffer) as e:
        return run_steps(e)


def cosine(a, b) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3", "llama", "qwen3_q40"])
@pytest.mark.parametrize("nodes", [2, 3, 4])
def test_cluster_logits_equal_one_node(models, arch, nodes):
    # the tiny models have 2 kv heads: on 3 and 4 nodes, nodes share a kv head's projections
    expected = single_node(models[arch])
    with Workers(nodes - 1) as workers:
        for buffer in ("f32", "q80"):
            with Engine(models[arch], nthreads=1, max_seq_len=64, buffer_float_type=buffer, workers=workers.addresses,
                        progress=False) as engine:
                got = []
                out = engine.forward(PROMPT)
                got.append(out)
                for e in expected[:-1]:
                    got.append(engine.forward([int(np.argmax(e))]))  # the single node's tokens
            for step, (e, g) in enumerate(zip(expected, got)):
                if buffer == "f32":
                    err = float(np.max(np.abs(e - g))) / float(e.max() - e.min())
                    assert err <= 1e-4, f"{arch} on {nodes} nodes, step {step}: relative error {err}"
                else:
                    assert cosine(e, g) >= 0.995, f"{arch} on {nodes} nodes (q80 sync), step {step}"


def test_sampling_in_a_cluster_draws_what_one_node_draws(models):
    from dllama.generate import generate
    from dllama.sampler import Sampler

    def tokens(workers=()):
        with Engine(models["qwen3"], nthreads=1, max_seq_len=64, buffer_float_type="f32", workers=workers,
                    progress=False) as e:
            return generate(e, PROMPT, steps=12, sampler=Sampler(0.8, 0.9, seed=7), eos_ids=set()).tokens

    with Workers(2) as workers:
        assert tokens(workers.addresses) == tokens()


def test_a_cluster_reports_sync_time_and_traffic(models):
    with Workers(1) as workers, Engine(models["qwen3_moe"], nthreads=1, max_seq_len=64, workers=workers.addresses,
                                        progress=False) as engine:
        engine.forward(PROMPT)
        stats = engine.stats()
    assert stats["sync_ms"] > 0 and stats["sent_kb"] > 0 and stats["recv_kb"] > 0


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3_q40"])
@pytest.mark.parametrize("buffer", ["f32", "q80"])
def test_a_decode_tokens_partials_leave_while_their_matmul_runs(models, arch, buffer):
    # a one-token step hands each all-reduce's partial to the mesh a piece at a time (the tiny
    # models' 64-wide residual: 2 pieces), and what the idle sockets take of the first piece
    # leaves before the second is computed; a prompt's rows interleave the pieces: one piece.
    # 2 threads a node: a piece is handed on by whichever thread completes it
    with Workers(2, nthreads=2) as workers, Engine(models[arch], nthreads=2, max_seq_len=64, buffer_float_type=buffer,
                                                   workers=workers.addresses, progress=False) as engine:
        engine.forward(PROMPT)
        prompt = engine.stats()
        engine.forward([PROMPT[0]])
        decode = engine.stats()
    assert prompt["sent_early_kb"] == 0
    # per all-reduce, to each of the 2 workers: the first of 2 pieces of one row
    row_bytes = 64 // 32 * 34 if buffer == "q80" else 64 * 4
    layers = 2
    assert decode["sent_early_kb"] * 1024 == 2 * layers * 2 * row_bytes // 2


def test_a_one_thread_node_sends_each_partial_whole(models):
    # with one thread, the pieces' system calls would stall the matmul itself: one piece
    with Workers(1, nthreads=1) as workers, Engine(models["qwen3_moe"], nthreads=1, max_seq_len=64,
                                                   workers=workers.addresses, progress=False) as engine:
        engine.forward(PROMPT)
        engine.forward([PROMPT[0]])
        decode = engine.stats()
    assert decode["sent_kb"] > 0 and decode["sent_early_kb"] == 0


@pytest.fixture
def keyfiles(tmp_path):
    good, bad = tmp_path / "good.key", tmp_path / "bad.key"
    good.write_text(os.urandom(32).hex())
    bad.write_text(os.urandom(32).hex())
    return good, bad


def test_wrong_or_missing_key_is_refused_then_the_right_root_is_served(models, keyfiles):
    good, bad = keyfiles
    worker = WorkerProcess("--cluster-key-file", str(good))
    try:
        for key in (bad, None):
            with pytest.raises(ConnectionError, match=worker.address):
                Engine(models["qwen3"], max_seq_len=64, workers=[worker.address], cluster_key_file=key, progress=False)
        with Engine(models["qwen3"], max_seq_len=64, workers=[worker.address], cluster_key_file=good,
                    progress=False) as e:
            assert e.forward(PROMPT).shape == (e.config.vocab_size,)
    finally:
        log = worker.stop()
    assert log.count("refused root") == 2


def frame(kind: int, payload: bytes, length: int | None = None) -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, len(payload) if length is None else length) + payload


GARBAGE = {
    "random bytes": os.urandom(4096),
    "huge length": HEADER.pack(MAGIC, VERSION, Frame.HELLO, 0xFFFFFFF0),
    "truncated frame": frame(Frame.HELLO, b'{"nonce": "ab', length=200),
    "unknown type": frame(999, b"{}"),
    "wrong version": HEADER.pack(MAGIC, VERSION + 7, Frame.HELLO, 2) + b"{}",
    "not json": frame(Frame.HELLO, b"\xff\xfe\x00garbage"),
}


def test_garbage_on_the_worker_port_closes_that_connection_only(models):
    worker = WorkerProcess(timeout=1.0)
    try:
        for name, data in GARBAGE.items():
            with socket.create_connection(("127.0.0.1", worker.port)) as s:
                s.sendall(data)
                s.settimeout(5)
                try:
                    while s.recv(4096):  # the worker closes the connection (maybe after an error frame)
                        pass
                except (ConnectionResetError, TimeoutError):
                    pass
            assert worker.alive(), f"the worker died of {name}"
        # a slow sender that stops mid-frame: the worker gives up after its timeout
        with socket.create_connection(("127.0.0.1", worker.port)) as s:
            s.sendall(frame(Frame.HELLO, b'{"nonce"', length=80)[:12])
            time.sleep(1.5)
        with Engine(models["qwen3"], max_seq_len=64, workers=[worker.address], progress=False) as e:
            assert np.isfinite(e.forward(PROMPT)).all()
    finally:
        log = worker.stop()
    for words in ("not a dllama peer", "over the limit", "unknown frame type", "protocol version", "timed out"):
        assert words in log, f"no log line saying {words!r}"


def test_killing_a_worker_mid_generation_names_it(models):
    workers = Workers(2)
    victim = workers.list[1]
    try:
        engine = Engine(models["qwen3_moe"], nthreads=1, max_seq_len=4096, workers=workers.addresses, progress=False)
        engine.forward(PROMPT)
        killer = threading.Timer(0.5, victim.proc.kill)
        killer.start()
        start = time.monotonic()
        with pytest.raises(WorkerLost, match=victim.address):
            for _ in range(4000):
                engine.forward([1])
        assert time.monotonic() - start < 12
        with pytest.raises(WorkerLost):
            engine.forward([1])
        engine.close()
    finally:
        workers.stop()


def test_a_worker_cache_makes_the_second_root_send_no_weights(models, tmp_path):
    worker = WorkerProcess("--cache-dir", str(tmp_path / "cache"))
    try:
        runs = []
        for _ in range(2):
            with Engine(models["qwen3_moe"], nthreads=1, max_seq_len=64, workers=[worker.address],
                        buffer_float_type="f32", progress=False) as e:
                runs.append((e.weights_sent, e.forward(PROMPT)))
        assert runs[0][0] > 0 and runs[1][0] == 0
        np.testing.assert_array_equal(runs[0][1], runs[1][1])
        # a damaged cache file is noticed and fetched again
        (cached,) = (tmp_path / "cache").glob("*.slices")
        data = bytearray(cached.read_bytes())
        data[len(data) // 2] ^= 0xFF
        cached.write_bytes(bytes(data))
        with Engine(models["qwen3_moe"], nthreads=1, max_seq_len=64, workers=[worker.address],
                    buffer_float_type="f32", progress=False) as e:
            assert e.weights_sent == runs[0][0]
            np.testing.assert_array_equal(e.forward(PROMPT), runs[0][1])
    finally:
        log = worker.stop()
    assert "damaged" in log


def test_a_weighted_node_takes_a_bigger_share_and_the_logits_stay_the_same(models):
    expected = single_node(models["qwen3"])
    with Workers(1) as workers, Engine(models["qwen3"], nthreads=1, max_seq_len=64, buffer_float_type="f32",
                                        workers=[workers.addresses[0] + "@3"], progress=False) as engine:
        got = engine.forward(PROMPT)
        assert engine.weights_sent > 0
    err = float(np.max(np.abs(expected[0] - got))) / float(expected[0].max() - expected[0].min())
    assert err <= 1e-4
