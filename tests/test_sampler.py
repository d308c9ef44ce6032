"""Sampler: greedy, seeded top-p over the top 64, and merging per-node candidates."""
from __future__ import annotations

import numpy as np
import pytest

from dllama.sampler import GREEDY_BELOW, TOP_K, Sampler, candidates, merge_candidates

VOCAB = 1000


def random_logits(seed: int = 0, n: int = VOCAB) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, n).astype(np.float32)


def test_greedy_is_argmax() -> None:
    logits = random_logits()
    sampler = Sampler(temperature=0)
    assert sampler.sample(logits) == int(np.argmax(logits))
    ties = np.zeros(10, dtype=np.float32)
    ties[[3, 7]] = 5
    assert sampler.sample(ties) == 3  # the smaller id wins a tie


def test_greedy_does_not_consume_randomness() -> None:
    a, b = Sampler(0, seed=1), Sampler(0, seed=1)
    a.sample(random_logits())
    assert a.rng.random() == b.rng.random()


def test_same_seed_same_tokens() -> None:
    logits = [random_logits(i) for i in range(50)]

    def run(seed: int) -> list[int]:
        sampler = Sampler(1.5, 1.0, seed=seed)
        return [sampler.sample(x) for x in logits]

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_one_uniform_draw_per_token() -> None:
    sampler, twin = Sampler(1.0, 0.5, seed=7), np.random.Generator(np.random.PCG64(7))
    for i in range(5):
        sampler.sample(random_logits(i))
        twin.random()
    assert sampler.rng.random() == twin.random()


def test_tiny_topp_is_argmax() -> None:
    sampler = Sampler(temperature=1.0, topp=1e-9, seed=3)
    for i in range(20):
        logits = random_logits(i)
        assert sampler.sample(logits) == int(np.argmax(logits))


@pytest.mark.parametrize("temperature", [5e-324, 1e-45, 1e-39, 1e-20, GREEDY_BELOW / 2])
def test_tiny_temperature_is_greedy(temperature: float) -> None:
    # dividing logits by such a temperature overflows to inf and NaN: it is greedy instead, on one
    # node and on merged cluster candidates alike, drawing no randomness
    sampler, twin = Sampler(temperature, 0.9, seed=5), Sampler(0, 0.9, seed=5)
    assert sampler.greedy
    for i in range(20):
        logits = random_logits(i)
        assert sampler.sample(logits) == int(np.argmax(logits))
        assert sampler.sample_candidates(*candidates(logits, temperature)) == int(np.argmax(logits))
    halves = [candidates(logits[:500], temperature), candidates(logits[500:], temperature, offset=500)]
    assert sampler.sample_candidates(*merge_candidates(halves)) == int(np.argmax(logits))
    assert sampler.rng.random() == twin.rng.random()


def test_greedy_threshold_is_sharp() -> None:
    # at GREEDY_BELOW itself the sampler still samples: the rule only takes what would overflow
    # or be argmax anyway
    assert not Sampler(GREEDY_BELOW, seed=1).greedy
    close = np.array([1.0, 1.0 - GREEDY_BELOW], dtype=np.float32)  # a gap of one temperature
    sampler = Sampler(GREEDY_BELOW, 1.0, seed=2)
    assert {sampler.sample(close) for _ in range(200)} == {0, 1}


def test_candidates_are_top_64_sorted_with_id_tie_break() -> None:
    logits = np.round(random_logits(1), 0)  # many equal values
    ids, top, log_norm = candidates(logits, 1.0)
    assert len(ids) == TOP_K
    order = sorted(range(VOCAB), key=lambda i: (-logits[i], i))[:TOP_K]
    assert ids.tolist() == order
    assert top.tolist() == logits[order].tolist()
    expected = np.log(np.sum(np.exp(logits.astype(np.float64))))
    assert log_norm == pytest.approx(expected, rel=1e-6)


def test_candidates_of_a_small_vocab() -> None:
    ids, top, _ = candidates(np.array([1.0, 3.0, 2.0], dtype=np.float32), 1.0)
    assert ids.tolist() == [1, 2, 0]
    assert top.tolist() == [3.0, 2.0, 1.0]


def test_probabilities_are_global() -> None:
    # the top 64 of a flat vocabulary hold 6.4% of the mass: topp 0.9 is out of reach, all 64 are used
    logits = np.zeros(VOCAB, dtype=np.float32)
    sampler = Sampler(1.0, 0.9, seed=0)
    draws = {sampler.sample(logits) for _ in range(2000)}
    assert draws == set(range(TOP_K))


def test_distribution_matches_softmax() -> None:
    # T=1, topp=1: a chi-square test of 20000 draws against softmax
    p = np.array([0.5, 0.25, 0.15, 0.07, 0.03])
    logits = np.log(p).astype(np.float32)
    sampler = Sampler(temperature=1.0, topp=1.0, seed=1234)
    n = 20000
    counts = np.bincount([sampler.sample(logits) for _ in range(n)], minlength=len(p))
    expected = n * p
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < 18.47  # 4 degrees of freedom, p = 0.001


def test_topp_keeps_the_smallest_prefix() -> None:
    p = np.array([0.5, 0.25, 0.15, 0.07, 0.03])
    logits = np.log(p).astype(np.float32)
    sampler = Sampler(temperature=1.0, topp=0.7, seed=5)  # 0.5 + 0.25 >= 0.7: two tokens
    counts = np.bincount([sampler.sample(logits) for _ in range(6000)], minlength=len(p))
    assert counts[2:].sum() == 0
    assert abs(counts[0] / 6000 - 2 / 3) < 0.03  # renormalised within the kept set


def test_temperature_sharpens() -> None:
    logits = np.log(np.array([0.6, 0.4])).astype(np.float32)
    cold = Sampler(temperature=0.25, topp=1.0, seed=9)
    counts = np.bincount([cold.sample(logits) for _ in range(4000)], minlength=2)
    share = 0.6**4 / (0.6**4 + 0.4**4)  # softmax(log p / 0.25)
    assert abs(counts[0] / 4000 - share) < 0.03


def test_sample_equals_sample_candidates() -> None:
    a, b = Sampler(0.7, 0.95, seed=11), Sampler(0.7, 0.95, seed=11)
    for i in range(30):
        logits = random_logits(i, 5000)
        assert a.sample(logits) == b.sample_candidates(*b.candidates(logits))


@pytest.mark.parametrize("temperature", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("cuts", [[500], [1, 999], [100, 333, 700, 901], list(range(50, VOCAB, 50))])
def test_merging_slices_equals_the_full_vocabulary(temperature: float, cuts: list[int]) -> None:
    logits = np.round(random_logits(2) * 4) / 4  # ties across slice boundaries
    full = candidates(logits, temperature)
    bounds = [0, *cuts, VOCAB]
    parts = [candidates(logits[a:b], temperature, offset=a) for a, b in zip(bounds, bounds[1:])]
    merged = merge_candidates(parts)
    assert merged.ids.tolist() == full.ids.tolist()
    assert merged.logits.tolist() == full.logits.tolist()
    if temperature > 0:
        assert merged.log_norm == pytest.approx(full.log_norm, rel=1e-6)
        s1, s2 = Sampler(temperature, 0.9, seed=4), Sampler(temperature, 0.9, seed=4)
        assert [s1.sample_candidates(*full) for _ in range(200)] == [s2.sample_candidates(*merged) for _ in range(200)]


def test_merge_of_masked_slice() -> None:
    logits = random_logits(3)
    masked = np.full(100, -np.inf, dtype=np.float32)
    full = candidates(np.concatenate([logits, masked]), 1.0)
    merged = merge_candidates([candidates(logits, 1.0), candidates(masked, 1.0, offset=VOCAB)])
    assert merged.ids.tolist() == full.ids.tolist()
    assert merged.log_norm == pytest.approx(full.log_norm, rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"topp": 0.0}, "topp"),
        ({"topp": 1.5}, "topp"),
        ({"topp": -1}, "topp"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Sampler(**kwargs)


def test_bad_logits() -> None:
    sampler = Sampler(1.0, seed=0)
    with pytest.raises(ValueError, match="vector"):
        sampler.sample(np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="vector"):
        sampler.sample(np.zeros(0, dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        sampler.sample(np.array([0.0, np.nan], dtype=np.float32))
    with pytest.raises(ValueError, match="-inf"):
        sampler.sample(np.full(4, -np.inf, dtype=np.float32))
    with pytest.raises(ValueError, match="nothing to merge"):
        merge_candidates([])


def test_seed_none_is_recorded() -> None:
    a = Sampler(seed=None)
    b = Sampler(seed=a.seed)
    logits = random_logits()
    assert [a.sample(logits) for _ in range(20)] == [b.sample(logits) for _ in range(20)]
