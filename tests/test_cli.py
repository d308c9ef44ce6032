"""The dllama command on a tiny random Qwen3 with the real Qwen3 tokenizer: argument errors as one
clear line; `dllama inference` and `dllama chat` print what greedy decoding with engine.forward
and argmax gives (tests/greedy_reference.py), fed the way they feed it; the chat's Conversation
keeps what the engine holds and feeds only the rest."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_helpers import WorkerProcess
from greedy_reference import greedy

from dllama import Engine, launch
from dllama.cli import CHAT_STEPS, Conversation
from dllama.engine import Entry
from dllama.testing import qwen3_tokenizer_dir as tokenizer_dir
from dllama.testing.checkpoint import make_model_file
from dllama.tokenizer import Tokenizer


def dllama_cmd(*args: str, env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    # same interpreter and environment: the subprocess imports the dllama this process imports
    environ = {k: v for k, v in os.environ.items() if k != "DLLAMA_DEBUG"}
    environ.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "dllama.cli", *map(str, args)], capture_output=True, env=environ,
                          timeout=120, input=None if stdin is None else stdin.encode())
    # decoded here, not in text mode: a random model's reply may hold a "\r" that text mode would turn into "\n"
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


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
    [["--steps", "0"], ["--nthreads", "x"], ["--buffer-float-type", "q40"], ["--workers", "nohost"],
     ["--kv-cache-type", "q80"]],
)
def test_bad_flag_values_are_usage_errors(flags: list[str]) -> None:
    proc = dllama_cmd("inference", "--model", "m.m", "--prompt", "hi", *flags)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"argument {flags[0]}" in proc.stderr


# the commands on a tiny real model

CONTEXT = 512  # KV cache: 2 layers x (keys, values) x 64 floats per position = 512 KiB in f32
SYSTEM = "Be brief."


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_model_file(tmp_path_factory.mktemp("cli") / "tiny.m", preset="tiny", arch="qwen3", seed=11)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load(tokenizer_dir())


@pytest.fixture(scope="module")
def engine(model):
    """The reference runs: the commands' engine (one thread, the same context)."""
    with Engine(model, nthreads=1, max_seq_len=CONTEXT) as e:
        yield e


def run_model(model: Path, command: str, *flags: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return dllama_cmd(command, "--model", model, "--tokenizer", tokenizer_dir(), "--temperature", "0",
                      "--nthreads", "1", *flags, stdin=stdin)


def start_up_line(proc: subprocess.CompletedProcess) -> str:
    return next(line for line in proc.stderr.splitlines() if line.startswith("dllama: qwen3,"))


def test_inference_streams_the_greedy_text_and_prints_figures(model, tok, engine) -> None:
    prompt = "Say hi:"
    ids = tok.encode(prompt)
    engine.reset()
    expected = tok.decode(greedy(engine, ids, 6, eos=tok.eos_ids))
    proc = run_model(model, "inference", "--prompt", prompt, "--steps", "6", "--max-seq-len", CONTEXT,
                     "--buffer-float-type", "f32", "--weights-float-type", "f32")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{prompt}{expected}\n\nEvaluation\n    nTokens: {len(ids)}\n   tokens/s: ")
    assert "\nPrediction\n    nTokens: 5\n   tokens/s: " in proc.stdout  # the prompt's step gave the first token
    assert "sync:" not in proc.stdout  # one node: no network figures
    assert "--weights-float-type is ignored" in proc.stderr
    assert "the model's weights are q40, not f32" in proc.stderr
    assert start_up_line(proc) == ("dllama: qwen3, layers 2, dim 64, weights q40, context 512, KV cache 0.5 MiB f32, "
                                   "buffer f32, 1 thread, 1 node")


def test_inference_with_an_f16_kv_cache(model, tok) -> None:
    ids = tok.encode("P")
    with Engine(model, nthreads=1, max_seq_len=2048, kv_cache_type="f16") as e:
        expected = tok.decode(greedy(e, ids, 2, eos=tok.eos_ids))
    proc = run_model(model, "inference", "--prompt", "P", "--steps", "2", "--max-seq-len", "2048",
                     "--kv-cache-type", "F16")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("P" + expected + "\n\n")
    assert "context 2048, KV cache 1.0 MiB f16, buffer q80" in start_up_line(proc)


def test_inference_prompt_that_does_not_fit(model) -> None:
    proc = run_model(model, "inference", "--prompt", "word " * 40, "--max-seq-len", "16")
    assert_one_line_error_after_start_up(proc, "does not fit in the context (16 tokens)")


def assert_one_line_error_after_start_up(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dllama: error: ") and fragment in last


def test_inference_on_a_cluster(model) -> None:
    worker = WorkerProcess()
    try:
        proc = run_model(model, "inference", "--prompt", "Hi", "--steps", "4", "--max-seq-len", "2048",
                         "--workers", worker.address)
        assert worker.alive()
    finally:
        worker.stop()
    assert proc.returncode == 0, proc.stderr
    # the two kv heads, one per node
    assert "context 2048, KV cache 1.0 MiB/node f32, buffer q80, 1 thread, 2 nodes" in start_up_line(proc)
    stats = proc.stdout[proc.stdout.index("\n\nEvaluation\n"):]
    for figure in ("sync: ", "sent: ", "recv: "):
        assert stats.count(figure) == 2  # per token of the prompt and of the reply


# dllama chat


def render(tok: Tokenizer, messages: list[dict], enable_thinking: bool | None = None) -> list[int]:
    text = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, *messages],
                                   enable_thinking=enable_thinking)
    return tok.encode(text, add_special_tokens=False)


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def expected_replies(engine: Engine, tok: Tokenizer, lines: list[str], steps: int) -> list[str]:
    """The chat's replies at temperature 0: each turn keeps the engine's tokens the new rendering
    starts with (all but its last token at most), feeds the rest in one step, then one step per
    reply token; /clear forgets the messages."""
    engine.reset()
    held: list[int] = []
    messages: list[dict] = []
    replies = []
    for line in lines:
        if line == "/clear":
            messages = []
            continue
        messages.append({"role": "user", "content": line})
        ids = render(tok, messages)
        keep = common_prefix(held, ids[:-1])
        engine.rewind(keep)
        reply = greedy(engine, ids[keep:], steps, eos=tok.eos_ids)
        held = (ids + reply)[:engine.position]
        replies.append(tok.decode(reply))
        messages.append({"role": "assistant", "content": replies[-1]})
    return replies


def chat(model: Path, lines: str, *flags: str) -> subprocess.CompletedProcess:
    return run_model(model, "chat", "--system-prompt", SYSTEM, "--max-seq-len", CONTEXT, *flags, stdin=lines)


def test_chat_replies_with_the_greedy_continuations(model, tok, engine) -> None:
    proc = chat(model, "hello\n안녕?\n/exit\nnot read\n", "--steps", "8")
    assert proc.returncode == 0, proc.stderr
    first, second = expected_replies(engine, tok, ["hello", "안녕?"], 8)
    assert first and second
    assert proc.stdout == f"\n> {first}\n\n> {second}\n\n> "  # input()'s prompts, each reply on its line


def test_chat_cuts_a_reply_at_steps_and_says_so(model, tok, engine) -> None:
    engine.reset()
    reply = greedy(engine, render(tok, [{"role": "user", "content": "hello"}]), 3, eos=tok.eos_ids)
    proc = chat(model, "hello\n", "--steps", "3")
    assert proc.returncode == 0, proc.stderr
    assert ("dllama: the reply was cut at 3 tokens (--steps)" in proc.stderr) == (len(reply) == 3)
    assert f"(default: {CHAT_STEPS})" in " ".join(dllama_cmd("chat", "--help").stdout.split())


def test_chat_clear_and_eof(model, tok, engine) -> None:
    proc = chat(model, "x\n/clear\n\ny\n", "--steps", "5")  # ends at EOF
    assert proc.returncode == 0, proc.stderr
    first, second = expected_replies(engine, tok, ["x", "/clear", "y"], 5)
    assert proc.stdout == f"\n> {first}\n\n> \n> \n> {second}\n\n> \n"


def test_chat_message_that_does_not_fit(model, tok, engine) -> None:
    proc = chat(model, "word " * 600 + "\nok\n", "--steps", "3")
    assert proc.returncode == 0, proc.stderr
    assert f"dllama: that message does not fit in the context ({CONTEXT} tokens)" in proc.stderr
    assert proc.stdout.endswith(f"\n> {expected_replies(engine, tok, ['ok'], 3)[0]}\n\n> \n")


def test_chat_survives_a_full_context(model) -> None:
    proc = chat(model, "one\ntwo\nthree\n", "--max-seq-len", "64", "--steps", "100")
    assert proc.returncode == 0, proc.stderr
    assert "the context is full (64 tokens); older turns will be dropped" in proc.stderr
    assert proc.stdout.count("\n> ") == 4 and "does not fit" not in proc.stderr


# the conversation behind dllama chat, on a real engine


def answer(engine: Engine, conversation: Conversation, new_ids: list[int], tok: Tokenizer, text: str) -> None:
    """As if the model replied `text` and then an end token: the turn's tokens and every reply
    token are fed (as far as the context goes)."""
    fed = new_ids + tok.encode(text, add_special_tokens=False)
    engine.step([Entry(0, fed[: engine.max_seq_len - engine.position])])
    conversation.answer(fed, text)


def test_conversation_feeds_only_the_new_tokens(engine, tok) -> None:
    engine.forward([1, 2, 3])  # whatever the engine held before: the conversation knows nothing of it
    conversation = Conversation(engine, tok, SYSTEM, None)
    turn1 = render(tok, [{"role": "user", "content": "hello"}])
    assert conversation.ask("hello") == turn1 and engine.position == 0
    answer(engine, conversation, turn1, tok, "First answer.")
    held = engine.position

    new = conversation.ask("안녕?")
    turn2 = render(tok, [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "First answer."},
                         {"role": "user", "content": "안녕?"}])
    assert turn2[:held] == turn1 + tok.encode("First answer.")  # the template keeps the reply as it was fed
    assert new == turn2[held:] and engine.position == held  # only what the engine has not seen


def test_conversation_rewinds_to_the_common_prefix(engine, tok) -> None:
    # without thinking, the template shows an empty <think> block only in the open turn, so the
    # second rendering departs from what the engine holds: it keeps the shared prefix
    engine.reset()
    conversation = Conversation(engine, tok, SYSTEM, False)
    turn1 = conversation.ask("a")
    answer(engine, conversation, turn1, tok, "Sure.")
    held = turn1 + tok.encode("Sure.")
    assert engine.position == len(held)

    new = conversation.ask("b")
    turn2 = render(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "Sure."},
                         {"role": "user", "content": "b"}], enable_thinking=False)
    common = common_prefix(held, turn2)
    assert 0 < common < len(held)
    assert engine.position == common and new == turn2[common:]


def test_conversation_clear_keeps_the_system_prompt(engine, tok) -> None:
    engine.reset()
    conversation = Conversation(engine, tok, SYSTEM, None)
    answer(engine, conversation, conversation.ask("x"), tok, "One.")
    conversation.clear()
    assert conversation.history == []
    new = conversation.ask("y")
    ids = render(tok, [{"role": "user", "content": "y"}])
    system = render(tok, [])  # the system turn and an open assistant turn: the system turn is shared
    assert engine.position >= common_prefix(system, ids) > 0
    assert new == ids[engine.position:]
    assert conversation.history == [{"role": "user", "content": "y"}]


def test_conversation_drops_old_turns_when_the_context_is_full(model, tok) -> None:
    with Engine(model, nthreads=1, max_seq_len=64) as small:
        conversation = Conversation(small, tok, SYSTEM, None)
        for word in ("one", "two", "three"):
            new = conversation.ask(word)
            assert new is not None and small.position + len(new) < 64  # room for a reply
            answer(small, conversation, new, tok, "word " * 12)
        assert [m["content"] for m in conversation.history if m["role"] == "user"][0] != "one"
        assert conversation.history[-2:] == [{"role": "user", "content": "three"},
                                             {"role": "assistant", "content": "word " * 12}]
        history = list(conversation.history)
        assert conversation.ask("word " * 80) is None  # alone it leaves no room: forgotten
        assert conversation.history == history


def test_describe_names_the_sequences_and_their_kv_cache(model) -> None:
    from dllama.cli import build_parser

    args = build_parser().parse_args(["inference", "--model", str(model), "--prompt", "x", "--nthreads", "1",
                                      "--max-seq-len", "1024", "--kv-cache-type", "f16"])
    with launch.open_engine(args, model, max_sequences=4) as four:
        assert four.max_sequences == 4 and four.kv_cache_type == "f16"
        assert launch.describe(four, args) == ("qwen3, layers 2, dim 64, weights q40, context 1024, 4 sequences, "
                                               "KV cache 2.0 MiB f16, buffer q80, 1 thread, 1 node")


def test_kv_cache_text() -> None:
    assert launch.kv_cache_text([96 << 20]) == "96.0 MiB"
    assert launch.kv_cache_text([48 << 20] * 3) == "48.0 MiB/node"
    assert launch.kv_cache_text([64 << 20, 32 << 20, 32 << 20]) == "64.0+32.0+32.0 MiB"
    assert launch.kv_cache_text([3 << 30, 3 << 29]) == "3.0+1.5 GiB"
