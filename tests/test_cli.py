"""The dllama command: argument errors as one clear line, and the inference/chat loops driven by a
scripted stand-in engine (the real engine's end-to-end run lives with the engine's tests)."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import dllama
from dllama import cli
from dllama.tokenizer import Tokenizer

from dllama.testing import qwen3_tokenizer_dir as tokenizer_dir




def dllama_cmd(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # same interpreter and environment: the subprocess imports the dllama this process imports
    environ = {k: v for k, v in os.environ.items() if k != "DLLAMA_DEBUG"}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "dllama.cli", *args], capture_output=True, text=True, env=environ, timeout=120
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dllama: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


# argument errors, as a user sees them


def test_no_command_prints_usage() -> None:
    proc = dllama_cmd()
    assert proc.returncode == 2
    assert "inference" in proc.stderr and "chat" in proc.stderr


def test_missing_model() -> None:
    proc = dllama_cmd("inference", "--prompt", "hi")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "the following arguments are required: --model" in proc.stderr


def test_nonexistent_model_file(tmp_path: Path) -> None:
    proc = dllama_cmd("inference", "--model", str(tmp_path / "missing.m"), "--prompt", "hi", "--steps", "4")
    assert_one_line_error(proc, "model file not found", "missing.m")


def test_bad_model_file(tmp_path: Path) -> None:
    model = tmp_path / "garbage.m"
    model.write_bytes(b"this is not a model" * 100)
    proc = dllama_cmd("inference", "--model", str(model), "--tokenizer", str(tokenizer_dir()), "--prompt", "hi")
    assert_one_line_error(proc, "garbage.m")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    model = tmp_path / "garbage.m"
    model.write_bytes(b"this is not a model" * 100)
    args = ["inference", "--model", str(model), "--tokenizer", str(tokenizer_dir()), "--prompt", "hi"]
    assert "Traceback" in dllama_cmd(*args, "--debug").stderr
    assert "Traceback" in dllama_cmd(*args, env={"DLLAMA_DEBUG": "1"}).stderr


def test_missing_tokenizer(tmp_path: Path) -> None:
    model = tmp_path / "model.m"
    model.write_bytes(b"x")
    proc = dllama_cmd("inference", "--model", str(model), "--prompt", "hi")
    assert_one_line_error(proc, "--tokenizer is required")
    proc = dllama_cmd("inference", "--model", str(model), "--tokenizer", str(tmp_path / "nope.json"), "--prompt", "hi")
    assert_one_line_error(proc, "tokenizer not found")


def test_dllama_tokenizer_file_is_explained(tmp_path: Path) -> None:
    model, tok = tmp_path / "model.m", tmp_path / "dllama_tokenizer_qwen3.t"
    model.write_bytes(b"x")
    tok.write_bytes(b"\x00\x01\x02\x03 binary")
    proc = dllama_cmd("inference", "--model", str(model), "--tokenizer", str(tok), "--prompt", "hi")
    assert_one_line_error(proc, "Distributed Llama .t tokenizer")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--temperature", "-1"], "temperature"),
        (["--topp", "0"], "topp"),
    ],
)
def test_bad_sampling_flags(tmp_path: Path, flags: list[str], message: str) -> None:
    model = tmp_path / "model.m"
    model.write_bytes(b"x")
    proc = dllama_cmd("inference", "--model", str(model), "--tokenizer", str(tokenizer_dir()), "--prompt", "hi", *flags)
    assert_one_line_error(proc, message)


@pytest.mark.parametrize(
    "flags",
    [["--steps", "0"], ["--nthreads", "x"], ["--buffer-float-type", "q40"], ["--workers", "nohost"]],
)
def test_bad_flag_values_are_usage_errors(flags: list[str]) -> None:
    proc = dllama_cmd("inference", "--model", "m.m", "--prompt", "hi", *flags)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"argument {flags[0]}" in proc.stderr


# the loops, with a stand-in engine


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load(tokenizer_dir())


class ScriptedEngine:
    """Plays back replies: each forward returns logits whose argmax is the next scripted token."""

    instances: list[ScriptedEngine] = []
    script: list[int] = []

    def __init__(self, model: str, *, nthreads: int, buffer_float_type: str, workers: list[str],
                 max_seq_len: int = 4096, cluster_key_file: str | None = None) -> None:
        self.options = {"nthreads": nthreads, "buffer_float_type": buffer_float_type, "workers": workers,
                        "max_seq_len": max_seq_len}
        self.config = SimpleNamespace(vocab_size=151936, n_layers=2, dim=64)
        self.max_seq_len = max_seq_len
        self.position = 0
        self.calls: list[tuple[int, list[int]]] = []  # (position, tokens)
        self.queue = list(ScriptedEngine.script)
        ScriptedEngine.instances.append(self)

    def forward(self, tokens: list[int]) -> np.ndarray:
        assert self.position + len(tokens) <= self.max_seq_len
        self.calls.append((self.position, list(tokens)))
        self.position += len(tokens)
        logits = np.zeros(self.config.vocab_size, dtype=np.float32)
        logits[self.queue.pop(0)] = 1.0
        return logits

    def reset(self) -> None:
        self.position = 0

    def rewind(self, position: int) -> None:
        assert 0 <= position <= self.position
        self.position = position

    def stats(self) -> dict:
        return {}


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    ScriptedEngine.instances = []
    monkeypatch.setattr(dllama, "Engine", ScriptedEngine, raising=False)
    model = tmp_path / "model.m"
    model.write_bytes(b"stand-in")
    return model


REPLY = "Hello 세계 🙂! Raspberry Pi."


def test_inference_streams_the_reply_and_prints_figures(scripted: Path, tok: Tokenizer, capsys) -> None:
    ScriptedEngine.script = [*tok.encode(REPLY), tok.token_to_id("<|im_end|>")]
    code = cli.main(["inference", "--model", str(scripted), "--tokenizer", str(tokenizer_dir()), "--prompt",
                     "Say hi:", "--steps", "64", "--temperature", "0", "--buffer-float-type", "f32",
                     "--nthreads", "3", "--weights-float-type", "q40"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out.startswith("Say hi:" + REPLY + "\n\nEvaluation\n")
    assert "Prediction\n    nTokens: " in out
    assert "--weights-float-type is ignored" in err
    engine = ScriptedEngine.instances[0]
    assert engine.options == {"nthreads": 3, "buffer_float_type": "f32", "workers": [], "max_seq_len": 4096}
    assert engine.calls[0] == (0, tok.encode("Say hi:"))  # the raw prompt, in one call


def test_inference_steps_limit(scripted: Path, tok: Tokenizer, capsys) -> None:
    ids = tok.encode(REPLY)
    ScriptedEngine.script = [*ids, tok.token_to_id("<|im_end|>")]
    cli.main(["inference", "--model", str(scripted), "--tokenizer", str(tokenizer_dir()), "--prompt", "P",
              "--steps", "2", "--temperature", "0", "--max-seq-len", "128"])
    out = capsys.readouterr().out
    assert out.startswith("P" + tok.decode(ids[:2]) + "\n\n")
    assert ScriptedEngine.instances[0].options["max_seq_len"] == 128


def chat(scripted: Path, monkeypatch: pytest.MonkeyPatch, lines: str, *flags: str) -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    return cli.main(["chat", "--model", str(scripted), "--tokenizer", str(tokenizer_dir()), "--temperature", "0",
                     "--system-prompt", "Be brief.", *flags])


def test_chat_feeds_only_the_new_tokens(scripted: Path, tok: Tokenizer, monkeypatch, capsys) -> None:
    end = tok.token_to_id("<|im_end|>")
    first, second = tok.encode("First answer."), tok.encode("둘째 답 🙂")
    ScriptedEngine.script = [*first, end, *second, end]
    assert chat(scripted, monkeypatch, "hello\n안녕?\n/exit\n") == 0
    out = capsys.readouterr().out
    assert "First answer.\n" in out and "둘째 답 🙂\n" in out

    engine = ScriptedEngine.instances[0]
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    turn1 = tok.encode(tok.apply_chat_template(conversation), add_special_tokens=False)
    conversation += [{"role": "assistant", "content": "First answer."}, {"role": "user", "content": "안녕?"}]
    turn2 = tok.encode(tok.apply_chat_template(conversation), add_special_tokens=False)
    prefills = [call for call in engine.calls if len(call[1]) > 1]
    assert prefills[0] == (0, turn1)
    held = len(turn1) + len(first)  # the prompt and every reply token (each fed to get the next)
    assert turn2[:held] == turn1 + first
    assert prefills[1] == (held, turn2[held:])  # only what the engine has not seen


def test_chat_rewinds_to_the_common_prefix(scripted: Path, tok: Tokenizer, monkeypatch, capsys) -> None:
    # without thinking, the template shows an empty <think> block only in the open turn, so the
    # second rendering departs from what the engine holds: it keeps the shared prefix
    end = tok.token_to_id("<|im_end|>")
    first = tok.encode("Sure.")
    ScriptedEngine.script = [*first, end, *tok.encode("Ok."), end]
    assert chat(scripted, monkeypatch, "a\nb\n", "--no-enable-thinking") == 0
    engine = ScriptedEngine.instances[0]
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"}]
    turn1 = tok.encode(tok.apply_chat_template(conversation, enable_thinking=False), add_special_tokens=False)
    conversation += [{"role": "assistant", "content": "Sure."}, {"role": "user", "content": "b"}]
    turn2 = tok.encode(tok.apply_chat_template(conversation, enable_thinking=False), add_special_tokens=False)
    common = next(i for i, (a, b) in enumerate(zip(turn1 + first, turn2)) if a != b)
    prefills = [call for call in engine.calls if len(call[1]) > 1]
    assert prefills[1] == (common, turn2[common:])


class ForwardOnlyEngine(ScriptedEngine):
    """An engine without rewind(n): only reset() forgets (generate's EngineLike)."""

    rewind = None


def test_chat_without_rewind_starts_over_when_the_template_rewrote_a_turn(scripted: Path, tok: Tokenizer,
                                                                          monkeypatch, capsys) -> None:
    monkeypatch.setattr(dllama, "Engine", ForwardOnlyEngine)
    end = tok.token_to_id("<|im_end|>")
    first = tok.encode("Sure.")
    ScriptedEngine.script = [*first, end, *tok.encode("Ok."), end]
    assert chat(scripted, monkeypatch, "a\nb\n", "--no-enable-thinking") == 0
    engine = ScriptedEngine.instances[0]
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "Sure."}, {"role": "user", "content": "b"}]
    turn2 = tok.encode(tok.apply_chat_template(conversation, enable_thinking=False), add_special_tokens=False)
    prefills = [call for call in engine.calls if len(call[1]) > 1]
    assert prefills[1] == (0, turn2)  # the common prefix could not be kept: all of it again, from 0


def test_chat_clear_and_eof(scripted: Path, tok: Tokenizer, monkeypatch, capsys) -> None:
    end = tok.token_to_id("<|im_end|>")
    ScriptedEngine.script = [*tok.encode("One."), end, *tok.encode("Two."), end]
    assert chat(scripted, monkeypatch, "x\n/clear\n\ny\n") == 0  # ends at EOF
    engine = ScriptedEngine.instances[0]
    prefills = [call for call in engine.calls if len(call[1]) > 1]
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "y"}]
    expected = tok.encode(tok.apply_chat_template(conversation), add_special_tokens=False)
    position, tokens = prefills[1]
    assert tokens == expected[position:]  # the forgotten turn is gone; the system prompt may stay cached


def test_chat_drops_old_turns_when_the_context_is_full(scripted: Path, tok: Tokenizer, monkeypatch, capsys) -> None:
    end = tok.token_to_id("<|im_end|>")
    reply = tok.encode("word " * 20)
    ScriptedEngine.script = [*reply, end, *reply, end, *reply, end]
    assert chat(scripted, monkeypatch, "one\ntwo\nthree\n", "--max-seq-len", "80") == 0
    engine = ScriptedEngine.instances[0]
    assert max(pos + len(tokens) for pos, tokens in engine.calls) <= 80
    assert capsys.readouterr().out.count("word " * 20) == 3
