"""The model's padding rows (ids at or above the tokenizer's vocabulary: 151669..151935 for Qwen3)
are never a candidate: greedy, sampling, logits and top-k, on one node and across real worker
processes. The checkpoint here makes those rows win by far, so a leak would show at once."""
from __future__ import annotations

import numpy as np
import pytest

from cluster_helpers import Workers
from dllama import Engine
from dllama.engine import LOGITS, TOPK, Entry
from dllama.generate import generate
from dllama.model_file import ModelFile
from dllama.sampler import Sampler
from dllama.testing.checkpoint import make_model_file

PROMPT = [9707, 11, 1879, 0, 3838, 374, 279, 6722, 315]
TOKENIZER_VOCAB = 151669  # the Qwen3 tokenizer's ids; the tiny model has 151936 rows


@pytest.fixture(scope="module")
def padded_model(tmp_path_factory):
    """A tiny Qwen3 whose LM head padding rows are 1000x random directions of both signs: for any
    hidden state some padding logit dwarfs every real one."""
    path = make_model_file(tmp_path_factory.mktemp("vocab") / "padded.m", preset="tiny", arch="qwen3",
                           weights="f32", seed=5)
    with ModelFile.open(path) as mf:
        info = mf.tensors["lm_head"]
        vocab, dim = info.shape
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((vocab - TOKENIZER_VOCAB, dim)).astype("<f4") * 1000
    rows[1::2] = -rows[::2][: len(rows[1::2])]
    with open(path, "r+b") as f:
        f.seek(info.offset + TOKENIZER_VOCAB * dim * 4)
        f.write(rows.tobytes())
    return path


def check_outputs(engine: Engine) -> None:
    logits, top = engine.step([Entry(0, PROMPT, LOGITS)])[0], None
    assert logits.shape == (151936,)
    assert np.isneginf(logits[TOKENIZER_VOCAB:]).all()
    assert int(np.argmax(logits)) < TOKENIZER_VOCAB
    engine.reset()
    top = engine.step([Entry(0, PROMPT, TOPK, temperature=0.8)])[0]
    assert (top.ids < TOKENIZER_VOCAB).all() and np.isfinite(top.logits).all() and np.isfinite(top.log_norm)
    engine.reset()
    for temperature in (0.0, 1.5):
        ids = generate(engine, PROMPT, steps=12, sampler=Sampler(temperature, 1.0, seed=3), eos_ids=set()).tokens
        assert len(ids) == 12 and max(ids) < TOKENIZER_VOCAB, ids
        engine.reset()


def test_the_padding_rows_would_win_without_the_limit(padded_model):
    with Engine(padded_model, nthreads=1, max_seq_len=64) as engine:
        assert int(np.argmax(engine.forward(PROMPT))) >= TOKENIZER_VOCAB


def test_one_node_never_offers_a_padding_row(padded_model):
    with Engine(padded_model, nthreads=1, max_seq_len=64, vocab_limit=TOKENIZER_VOCAB) as engine:
        check_outputs(engine)


@pytest.mark.parametrize("nodes", [2, 3])
def test_a_cluster_never_offers_a_padding_row(padded_model, nodes):
    """The padding rows are all in the last worker's slice: masked there, before its top-k."""
    with Workers(nodes - 1) as workers, Engine(padded_model, nthreads=1, max_seq_len=64, workers=workers.addresses,
                                                vocab_limit=TOKENIZER_VOCAB, progress=False) as engine:
        check_outputs(engine)


def test_a_limit_at_or_above_the_vocabulary_is_no_limit(padded_model):
    with Engine(padded_model, nthreads=1, max_seq_len=64, vocab_limit=151936) as engine:
        assert engine.vocab_limit == 0
        assert int(np.argmax(engine.forward(PROMPT))) >= TOKENIZER_VOCAB
