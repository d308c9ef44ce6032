"""Batched equals alone: several sequences sharing the engine's steps (joining, prefilling in
chunks next to decoding ones, leaving, a slot reused) each get the logits they get alone.

One scripted schedule drives every case. Each sequence is first run alone on an engine with
max_sequences=1, feeding the same chunks one step each and greedy-decoding from its own logits;
the batched run then feeds exactly those tokens, so any difference is the batching's. Alone and
batched run on the same nodes (tests/test_cluster.py holds a cluster against one node).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pytest

from cluster_helpers import WorkerProcess
from dllama import Engine
from dllama.engine import LOGITS, TOPK, Entry
from dllama.sampler import candidates
from dllama.testing.checkpoint import make_model_file

ARCHS = ("qwen3_moe", "qwen3", "llama")
SEEDS = {"qwen3_moe": 11, "qwen3": 12, "llama": 13}
MAX_SEQ_LEN = 128
SLOTS = 4
# F32 weights and buffers: the error relative to the alone logits' range (max - min)
F32_RELATIVE_ERROR = 1e-4
# Q40 weights with Q80 buffers, or an F16 KV cache: the direction and the greedy token
MIN_COSINE = 0.999


@dataclass(frozen=True)
class Scripted:
    """One sequence of the schedule: it joins at step `start` in `slot`, feeds its prompt in
    chunks of `chunk` tokens (one chunk a step), then decodes `decode` tokens, then leaves.
    `keep` > 0: the slot's previous sequence fed prompt[:keep] already and the slot is rewound
    to it (prefix reuse); else the slot is reset."""

    name: str
    slot: int
    start: int
    prompt: tuple[int, ...]
    chunk: int
    decode: int
    keep: int = 0

    def chunks(self) -> list[list[int]]:
        rest = list(self.prompt[self.keep:])
        return [rest[i:i + self.chunk] for i in range(0, len(rest), self.chunk)]

    def steps(self) -> int:
        return len(self.chunks()) + self.decode


def _prompt(seed: int, n: int) -> tuple[int, ...]:
    return tuple(np.random.default_rng(seed).integers(0, 151643, size=n).tolist())


_B = _prompt(2, 17)
# p: a prompt chunk, d: a decode step, one column per step
# step          0123456789012345
# a  slot 0     pdddddd.........  3 tokens in one step
# b  slot 1     ..ppddddd.......  17 = 16 + 1
# c  slot 2     ...pppdddd......  40 = 16 + 16 + 8, next to decoding a and b
# e  slot 3     .....pdddd......  24 in one step
# d  slot 0     .......pppppdddd  70 in chunks of 16, after a left and the slot was reset
# f  slot 1     .........ppddd..  b's first 10 tokens kept (rewind), 20 more in chunks of 16
SCHEDULE = (
    Scripted("a", slot=0, start=0, prompt=_prompt(1, 3), chunk=16, decode=6),
    Scripted("b", slot=1, start=2, prompt=_B, chunk=16, decode=5),
    Scripted("c", slot=2, start=3, prompt=_prompt(3, 40), chunk=16, decode=4),
    Scripted("e", slot=3, start=5, prompt=_prompt(5, 24), chunk=64, decode=4),
    Scripted("d", slot=0, start=7, prompt=_prompt(4, 70), chunk=16, decode=4),
    Scripted("f", slot=1, start=9, prompt=_B[:10] + _prompt(6, 20), chunk=16, decode=3, keep=10),
)
STEPS = max(s.start + s.steps() for s in SCHEDULE)


def test_the_schedule_is_what_it_claims():
    # a slot holds one sequence at a time, every step has work, a kept prefix is really there
    for s in SCHEDULE:
        after = [o for o in SCHEDULE if o.slot == s.slot and o.start > s.start]
        if after:
            nxt = min(after, key=lambda o: o.start)
            assert s.start + s.steps() <= nxt.start, f"{nxt.name} joins slot {s.slot} before {s.name} left"
            assert nxt.prompt[:nxt.keep] == s.prompt[:nxt.keep]
    busy = {t for s in SCHEDULE for t in range(s.start, s.start + s.steps())}
    assert busy == set(range(STEPS))
    assert max(sum(1 for s in SCHEDULE if s.start <= t < s.start + s.steps()) for t in range(STEPS)) == SLOTS
    assert {len(s.chunks()) for s in SCHEDULE} >= {1, 2, 3, 5}


@dataclass
class Alone:
    """A sequence run alone: the logits of each of its steps and the greedy tokens it fed."""

    logits: list[np.ndarray]
    decoded: list[int]

    def feeds(self, s: Scripted) -> list[list[int]]:
        return s.chunks() + [[t] for t in self.decoded]


def run_alone(engine: Engine, s: Scripted) -> Alone:
    engine.reset(0)
    if s.keep:
        engine.forward(s.prompt[:s.keep])
    logits = [engine.forward(chunk) for chunk in s.chunks()]
    decoded = []
    for _ in range(s.decode):
        decoded.append(int(np.argmax(logits[-1])))
        logits.append(engine.forward(decoded[-1:]))
    return Alone(logits, decoded)


def run_batched(engine: Engine, feeds: dict[str, list[list[int]]], output=LOGITS,
                temperatures: dict[str, float] | None = None) -> dict[str, list]:
    """The schedule on one engine: at each step, every sequence present feeds its next part;
    returns per sequence the result of each of its entries."""
    results: dict[str, list] = {s.name: [] for s in SCHEDULE}
    for step in range(STEPS):
        present = [s for s in SCHEDULE if 0 <= step - s.start < s.steps()]
        for s in present:
            if step == s.start and s.keep:
                engine.rewind(s.keep, s.slot)
            elif step == s.start:
                engine.reset(s.slot)
        entries = [Entry(s.slot, feeds[s.name][step - s.start], output, (temperatures or {}).get(s.name, 1.0))
                   for s in present]
        for s, r in zip(present, engine.step(entries)):
            results[s.name].append(r)
    for slot in range(SLOTS):
        last = max((s for s in SCHEDULE if s.slot == slot), key=lambda s: s.start)
        assert engine.position_of(slot) == len(last.prompt) + last.decode, f"slot {slot} after {last.name}"
    return results


def relative_error(expected: np.ndarray, got: np.ndarray) -> float:
    return float(np.max(np.abs(expected - got))) / float(expected.max() - expected.min())


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def assert_f32_close(expected: list[np.ndarray], got: list[np.ndarray], what: str) -> None:
    assert len(got) == len(expected), what
    for k, (e, g) in enumerate(zip(expected, got)):
        err = relative_error(e, g)
        assert err <= F32_RELATIVE_ERROR, f"{what}, its step {k}: relative error {err:.2e}"


def assert_same_direction_and_token(expected: list[np.ndarray], got: list[np.ndarray], what: str) -> None:
    assert len(got) == len(expected), what
    for k, (e, g) in enumerate(zip(expected, got)):
        assert cosine(e, g) >= MIN_COSINE, f"{what}, its step {k}: cosine {cosine(e, g):.5f}"
        assert int(np.argmax(g)) == int(np.argmax(e)), f"{what}, its step {k}: another greedy token"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("batching-models")
    return {(arch, weights): make_model_file(root / f"{arch}-{weights}.m", preset="tiny", arch=arch, weights=weights,
                                             seed=SEEDS[arch] + (100 if weights == "q40" else 0))
            for arch in ARCHS for weights in ("f32", "q40")}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two workers for every 3-node case of the module; each caches its slices, so a root after
    the first sends no weights."""
    cache = tmp_path_factory.mktemp("worker-caches")
    workers = [WorkerProcess("--cache-dir", str(cache / str(i)), timeout=30) for i in range(2)]
    yield [w.address for w in workers]
    for w in workers:
        w.stop()


NODE_IDS = {1: "1-node", 3: "3-nodes"}


@pytest.fixture(params=sorted(NODE_IDS), ids=NODE_IDS.get)
def workers(request) -> tuple[str, ...]:
    return () if request.param == 1 else tuple(request.getfixturevalue("cluster"))


def weights_and_nodes() -> list:
    """Every architecture with F32 and Q40 weights on 1 and 3 nodes, but the tiny Q40 MoE and Llama
    on 3: Q40 rows are cut in whole blocks of 32, and the MoE's expert hidden size (32) and
    Llama's heads (16 wide) have fewer blocks than nodes (tests/test_cluster.py clusters the
    tiny Q40 Qwen3 alone too)."""
    cases = []
    for arch in ARCHS:
        for weights in ("f32", "q40"):
            for nodes in (1, 3):
                if not (weights == "q40" and nodes == 3 and arch != "qwen3"):
                    cases.append(pytest.param(arch, weights, nodes, id=f"{arch}-{weights}-{NODE_IDS[nodes]}"))
    return cases


def open_engine(model, workers, *, weights: str, max_sequences: int, kv_cache_type: str = "f32") -> Engine:
    return Engine(model, nthreads=1, max_seq_len=MAX_SEQ_LEN, buffer_float_type="f32" if weights == "f32" else "q80",
                  workers=workers, max_sequences=max_sequences, kv_cache_type=kv_cache_type, progress=False)


@pytest.fixture(scope="module")
def alone(models):
    """alone(arch, weights, workers) -> {name: Alone}, run once per model and node count."""

    @functools.cache
    def run(arch: str, weights: str, workers: tuple[str, ...]) -> dict[str, Alone]:
        with open_engine(models[arch, weights], workers, weights=weights, max_sequences=1) as engine:
            return {s.name: run_alone(engine, s) for s in SCHEDULE}

    return run


@pytest.mark.parametrize("arch, weights, workers", weights_and_nodes(), indirect=["workers"])
def test_batched_logits_equal_alone(models, alone, workers, arch, weights):
    expected = alone(arch, weights, workers)
    with open_engine(models[arch, weights], workers, weights=weights, max_sequences=SLOTS) as engine:
        got = run_batched(engine, {s.name: expected[s.name].feeds(s) for s in SCHEDULE})
    check = assert_f32_close if weights == "f32" else assert_same_direction_and_token
    for s in SCHEDULE:
        check(expected[s.name].logits, got[s.name], f"{arch} {weights}, {len(workers) + 1} node(s), sequence {s.name}")


# greedy, and sampled at temperatures whose normaliser differs from the greedy placeholder
TEMPERATURES = {"a": 0.0, "b": 0.7, "c": 1.0, "d": 1.3, "e": 0.0, "f": 0.5}


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_candidates_are_those_of_the_alone_logits(models, alone, workers, arch):
    expected = alone(arch, "f32", workers)
    with open_engine(models[arch, "f32"], workers, weights="f32", max_sequences=SLOTS) as engine:
        got = run_batched(engine, {s.name: expected[s.name].feeds(s) for s in SCHEDULE}, TOPK, TEMPERATURES)
    for s in SCHEDULE:
        t = TEMPERATURES[s.name]
        for k, (logits, c) in enumerate(zip(expected[s.name].logits, got[s.name], strict=True)):
            want = candidates(logits, t)
            what = f"{arch}, {len(workers) + 1} node(s), sequence {s.name}, its step {k}"
            np.testing.assert_array_equal(c.ids, want.ids, err_msg=what)
            span = float(logits.max() - logits.min())
            np.testing.assert_allclose(c.logits, want.logits, rtol=0, atol=F32_RELATIVE_ERROR * span, err_msg=what)
            if t > 0:  # a greedy entry's normaliser is unused (the engine computes it at any temperature)
                assert c.log_norm == pytest.approx(want.log_norm, abs=F32_RELATIVE_ERROR * span / t), what


# F32 weights: the cache's rounding alone. With Q40 weights every matmul first rounds its input to
# Q80, and the F16 cache's rounding can move an element across a Q80 step or change the router's
# pick; on these random tiny models that alone (batching aside) puts a MoE step at cosine 0.9989
# and flips a near-tie greedy token of the dense Qwen3.
@pytest.mark.parametrize("arch", ARCHS)
def test_an_f16_kv_cache_batched_stays_close_to_f32_alone(models, alone, workers, arch):
    weights = "f32"
    expected = alone(arch, weights, workers)
    with open_engine(models[arch, weights], workers, weights=weights, max_sequences=SLOTS,
                     kv_cache_type="f16") as engine:
        got = run_batched(engine, {s.name: expected[s.name].feeds(s) for s in SCHEDULE})
    for s in SCHEDULE:
        assert_same_direction_and_token(expected[s.name].logits, got[s.name],
                                        f"{arch} {weights} f16 cache, {len(workers) + 1} node(s), sequence {s.name}")


def test_a_prompt_fed_in_chunks_gives_the_logits_of_the_whole_prompt(models):
    d = next(s for s in SCHEDULE if s.name == "d")
    with open_engine(models["qwen3_moe", "f32"], (), weights="f32", max_sequences=1) as engine:
        whole = engine.forward(d.prompt)
        engine.reset()
        chunked = [engine.forward(chunk) for chunk in d.chunks()][-1]
    assert relative_error(whole, chunked) <= F32_RELATIVE_ERROR
