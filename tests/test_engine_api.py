"""dllama.Engine as the cluster and API code use it: positions, batches, and clear errors for
everything a caller can get wrong."""
from __future__ import annotations

import numpy as np
import pytest

from dllama import Engine
from dllama.model_file import ModelFileError
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
            chunked.feed([t])
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
