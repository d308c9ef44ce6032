"""dllama.Engine as the CLI, the API and the cluster code use it: steps over several sequences,
each with its own position, what each entry gets back, and clear errors for everything a caller
can get wrong. (Whether a sequence's logits in a batch equal its logits alone: test_batching.py.)"""
from __future__ import annotations

import numpy as np
import pytest

from dllama import Engine
from dllama.engine import LOGITS, NONE, TOPK, Entry
from dllama.model_file import ModelFileError
from dllama.sampler import Candidates, candidates
from dllama.testing.checkpoint import make_model_file

PROMPT = [151644, 872, 198, 9707, 11, 1879, 0, 151645]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model_file(tmp_path_factory.mktemp("engine") / "tiny.m", preset="tiny", arch="qwen3_moe", seed=4)


@pytest.fixture
def engine(model):
    with Engine(model, nthreads=2, max_seq_len=32) as e:
        yield e


def test_forward_returns_vocab_logits_and_advances(engine):
    logits = engine.forward(PROMPT)
    assert logits.shape == (engine.config.vocab_size,) and logits.dtype == np.float32
    assert np.isfinite(logits).all()
    assert engine.position == len(PROMPT)
    engine.forward([1])
    assert engine.position == len(PROMPT) + 1


def test_prefill_batch_equals_token_by_token(model):
    with Engine(model, nthreads=2, max_seq_len=32) as batched, Engine(model, nthreads=1, max_seq_len=32, max_batch=3) as chunked:
        a = batched.forward(PROMPT)
        for t in PROMPT[:-1]:
            assert chunked.step([Entry(0, [t])]) == [None]
        b = chunked.forward(PROMPT[-1:])
    cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert cos > 0.999


def test_reset_and_rewind_reproduce_the_same_logits(engine):
    first = engine.forward(PROMPT)
    engine.reset()
    assert engine.position == 0
    np.testing.assert_array_equal(engine.forward(PROMPT), first)
    after = engine.forward([42])
    engine.rewind(len(PROMPT))
    np.testing.assert_array_equal(engine.forward([42]), after)


@pytest.mark.parametrize(
    "tokens, words",
    [
        ([], "non-empty"),
        ([-1], "outside the vocabulary"),
        ([10**9], "outside the vocabulary"),
        (["a"], "ints"),
        ([1.5], "ints"),
        ([[1, 2]], "flat"),
        (None, "flat"),
        (list(range(40)), "max_seq_len"),
    ],
)
def test_bad_tokens_raise_a_clear_error_and_leave_the_engine_usable(engine, tokens, words):
    with pytest.raises(ValueError, match=words):
        engine.forward(tokens)
    assert engine.position == 0
    engine.forward([1, 2])
    assert engine.position == 2


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(nthreads=0), "nthreads"),
        (dict(nthreads="2"), "nthreads"),
        (dict(buffer_float_type="q40"), "buffer_float_type"),
        (dict(max_seq_len=0), "max_seq_len"),
        (dict(max_batch=-1), "max_batch"),
        (dict(max_sequences=0), "max_sequences"),
        (dict(max_sequences=257), "max_sequences"),
        (dict(max_sequences=True), "max_sequences"),
        (dict(kv_cache_type="q80"), "kv_cache_type"),
    ],
)
def test_bad_arguments_raise_a_clear_error(model, kwargs, words):
    with pytest.raises(ValueError, match=words):
        Engine(model, **kwargs)


def test_missing_and_damaged_model_files(tmp_path, model):
    with pytest.raises(ModelFileError, match="cannot open"):
        Engine(tmp_path / "nowhere.m")
    broken = tmp_path / "broken.m"
    broken.write_bytes(model.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="expected"):
        Engine(broken)


def test_a_closed_engine_says_so(model):
    e = Engine(model, max_seq_len=8)
    e.close()
    with pytest.raises(ValueError, match="closed"):
        e.forward([1])


# several sequences


@pytest.fixture
def three(model):
    with Engine(model, nthreads=2, max_seq_len=32, max_sequences=3) as e:
        yield e


def positions(engine) -> list[int]:
    return [engine.position_of(s) for s in range(engine.max_sequences)]


def test_one_step_feeds_several_sequences(three):
    logits, top, nothing = three.step([Entry(0, PROMPT, LOGITS), Entry(2, PROMPT[:3], TOPK, 0.7), Entry(1, [5, 6], NONE)])
    assert logits.shape == (three.vocab_size,) and logits.dtype == np.float32
    assert isinstance(top, Candidates) and top.ids.shape == top.logits.shape == (64,)
    assert nothing is None
    assert positions(three) == [len(PROMPT), 2, 3]
    assert three.position == len(PROMPT)  # sequence 0's
    three.step([Entry(1, [7], TOPK)])
    assert positions(three) == [len(PROMPT), 3, 3]


def test_reset_and_rewind_one_sequence(three):
    three.step([Entry(0, PROMPT), Entry(1, PROMPT), Entry(2, PROMPT)])
    three.reset(1)
    three.rewind(3, seq=2)
    assert positions(three) == [len(PROMPT), 0, 3]
    three.rewind(len(PROMPT))  # sequence 0 by default, to where it is: no change
    assert positions(three) == [len(PROMPT), 0, 3]
    with pytest.raises(ValueError, match="between 0 and 3"):
        three.rewind(4, seq=2)


def test_rewound_sequence_reproduces_its_logits(three):
    three.step([Entry(0, PROMPT), Entry(1, [1, 2, 3])])
    after = three.step([Entry(1, [42], LOGITS)])[0]
    three.rewind(3, seq=1)
    np.testing.assert_array_equal(three.step([Entry(1, [42], LOGITS)])[0], after)


@pytest.mark.parametrize(
    "entries, words",
    [
        ([], "at least one entry"),
        ([Entry(0, [1]), Entry(0, [2])], "twice"),
        ([Entry(1, [1]), Entry(3, [2])], "sequence 3"),
        ([Entry(-1, [1])], "sequence -1"),
        ([Entry(True, [1])], "sequence True"),
        ([Entry(0, [1]), Entry(2, list(range(31)))], "max_seq_len"),  # 2 + 31 > 32: all or nothing
        ([Entry(0, [1], output=7)], "output"),
        ([Entry(0, [1], output="LOGITS")], "output"),
        ([Entry(0, [1], TOPK, temperature=-0.5)], "temperature"),
        ([Entry(0, [1], TOPK, temperature=float("nan"))], "temperature"),
        ([Entry(0, [1], TOPK, temperature=float("inf"))], "temperature"),
        ([Entry(1, [1]), Entry(2, [10**9])], "outside the vocabulary"),
    ],
)
def test_a_refused_step_changes_no_position(three, entries, words):
    three.step([Entry(0, [1, 2]), Entry(2, [3, 4])])
    with pytest.raises(ValueError, match=words):
        three.step(entries)
    assert positions(three) == [2, 0, 2]
    three.step([Entry(0, [5]), Entry(1, [5]), Entry(2, [5])])  # and the engine goes on
    assert positions(three) == [3, 1, 3]


@pytest.mark.parametrize("call", [lambda e: e.reset(3), lambda e: e.rewind(0, seq=3), lambda e: e.position_of(3),
                                  lambda e: e.forward([1], seq=-1)])
def test_sequence_ids_out_of_range(three, call):
    with pytest.raises(ValueError, match="0..2"):
        call(three)


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0, 1.6])
def test_topk_candidates_are_the_logits_best(engine, temperature):
    """On one node the core's top-k over the logits equals the sampler's, which is what a cluster's
    merged candidates are held to."""
    logits = engine.step([Entry(0, PROMPT, LOGITS)])[0]
    engine.reset()
    top = engine.step([Entry(0, PROMPT, TOPK, temperature)])[0]
    expected = candidates(logits, temperature)
    np.testing.assert_array_equal(top.ids, expected.ids)
    np.testing.assert_array_equal(top.logits, expected.logits)
    if temperature > 0:  # greedy needs no normaliser
        assert top.log_norm == pytest.approx(expected.log_norm, abs=1e-6, rel=1e-6)


def test_kv_cache_bytes(model):
    with Engine(model, max_seq_len=32) as f32, Engine(model, max_seq_len=32, kv_cache_type="f16") as f16, \
            Engine(model, max_seq_len=32, max_sequences=3) as three:
        c = f32.config
        # keys and values of every kv head, every layer, every position: 4 bytes each
        assert f32.kv_cache_bytes() == [2 * c.n_layers * 32 * c.n_kv_heads * c.head_dim * 4]
        assert f16.kv_cache_bytes() == [f32.kv_cache_bytes()[0] // 2]
        assert three.kv_cache_bytes() == [3 * f32.kv_cache_bytes()[0]]
        assert (f32.kv_cache_type, f16.kv_cache_type, three.max_sequences) == ("f32", "f16", 3)
        assert np.isfinite(f16.forward(PROMPT)).all()
