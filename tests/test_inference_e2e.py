"""`dllama convert` and `dllama inference` as a user runs them, on a tiny random Qwen3-MoE with
the real Qwen3 tokenizer: the printed text is what greedy decoding through the Python API gives."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from dllama import Engine
from dllama.testing.checkpoint import make_checkpoint
from dllama.tokenizer import Tokenizer

PROMPT = "Hello, world! 안녕하세요."
STEPS = 12


def dllama(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dllama", *map(str, args)], capture_output=True, text=True,
                          check=check, timeout=300)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    hf = make_checkpoint(root / "hf", preset="tiny", arch="qwen3_moe", seed=2)
    model = root / "model.m"
    run = dllama("convert", hf, "-o", model, "--weights", "q40")
    assert model.exists(), run.stderr
    return hf, model


def greedy(model, tokenizer: Tokenizer, ids: list[int], steps: int) -> str:
    """What a fresh engine generates greedily after ids, up to steps tokens or an end token."""
    out = []
    with Engine(model, nthreads=2, max_seq_len=4096) as engine:
        logits = engine.forward(ids)
        while len(out) < steps:
            token = int(np.argmax(logits))
            if token in tokenizer.eos_ids:
                break
            out.append(token)
            if len(out) < steps:
                logits = engine.forward([token])
    return tokenizer.decode(out)


def greedy_text(model, tokenizer_dir) -> str:
    tokenizer = Tokenizer.load(tokenizer_dir)
    return greedy(model, tokenizer, tokenizer.encode(PROMPT), STEPS)


def test_inference_prints_greedy_text_and_figures(tiny_model):
    hf, model = tiny_model
    run = dllama("inference", "--model", model, "--tokenizer", hf, "--prompt", PROMPT, "--steps", STEPS,
                 "--buffer-float-type", "q80", "--nthreads", 2, "--max-seq-len", 4096, "--temperature", 0)
    expected = greedy_text(model, hf)
    assert expected, "the tiny model should generate something"
    assert PROMPT + expected in run.stdout
    for figure in ("Evaluation", "Prediction", "tokens/s", "ms/tok"):
        assert figure in run.stdout


def test_inference_is_reproducible_with_a_seed(tiny_model):
    hf, model = tiny_model
    args = ("inference", "--model", model, "--tokenizer", hf, "--prompt", PROMPT, "--steps", STEPS,
            "--temperature", "0.8", "--topp", "0.9", "--seed", "42", "--nthreads", 1)
    first, second = dllama(*args), dllama(*args)
    text = lambda out: out.split("Evaluation")[0]  # noqa: E731
    assert text(first.stdout) == text(second.stdout)


def test_inference_on_a_damaged_model_file_says_so(tiny_model, tmp_path):
    hf, model = tiny_model
    broken = tmp_path / "broken.m"
    broken.write_bytes(model.read_bytes()[:-100])
    run = dllama("inference", "--model", broken, "--tokenizer", hf, "--prompt", PROMPT, "--steps", 4, check=False)
    assert run.returncode != 0
    assert "expected" in run.stderr and "Traceback" not in run.stderr


def greedy_reply(model, tokenizer, conversation, steps=8) -> str:
    """The reply one fresh engine gives the whole rendered conversation: no cache involved."""
    ids = tokenizer.encode(tokenizer.apply_chat_template(conversation, enable_thinking=False), add_special_tokens=False)
    return greedy(model, tokenizer, ids, steps)


def test_chat_answers_each_turn_as_a_fresh_engine_would(tiny_model):
    """Turn 2 reuses turn 1's KV cache; its answer must equal a from-scratch evaluation."""
    hf, model = tiny_model
    tokenizer = Tokenizer.load(hf)
    first = [{"role": "user", "content": "안녕? Say hi."}]
    reply1 = greedy_reply(model, tokenizer, first)
    second = first + [{"role": "assistant", "content": reply1}, {"role": "user", "content": "And now?"}]
    reply2 = greedy_reply(model, tokenizer, second)
    run = subprocess.run(
        [sys.executable, "-m", "dllama", "chat", "--model", str(model), "--tokenizer", str(hf), "--temperature", "0",
         "--steps", "8", "--nthreads", "2", "--no-enable-thinking"],
        input="안녕? Say hi.\nAnd now?\n", capture_output=True, text=True, timeout=300, check=True)
    assert f"> {reply1}\n" in run.stdout
    assert f"> {reply2}\n" in run.stdout
