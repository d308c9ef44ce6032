"""The generation loop's stopping rules and statistics, driven by a scripted stand-in engine."""
from __future__ import annotations

import numpy as np
import pytest

from dllama.generate import GenerationResult, format_stats, generate
from dllama.sampler import Sampler

VOCAB = 32
EOS = 2


class ScriptedEngine:
    """Returns logits whose argmax is the next token of a script, one per forward call."""

    def __init__(self, script: list[int], max_seq_len: int = 100, stats: dict | None = None) -> None:
        self.script = list(script)
        self.max_seq_len = max_seq_len
        self.position = 0
        self.calls: list[list[int]] = []
        self._stats = stats

    def forward(self, tokens: list[int]) -> np.ndarray:
        assert self.position + len(tokens) <= self.max_seq_len
        self.calls.append(list(tokens))
        self.position += len(tokens)
        logits = np.zeros(VOCAB, dtype=np.float32)
        logits[self.script.pop(0) if self.script else 0] = 10.0
        return logits

    def reset(self) -> None:
        self.position = 0

    def stats(self) -> dict:
        return dict(self._stats) if self._stats is not None else {}


def run(engine: ScriptedEngine, prompt: list[int], steps: int = 100, **kwargs) -> GenerationResult:
    return generate(engine, prompt, steps=steps, sampler=Sampler(temperature=0), eos_ids={EOS}, **kwargs)


def test_prefill_in_one_call_then_one_call_per_token() -> None:
    engine = ScriptedEngine([5, 6, 7, EOS])
    seen: list[int] = []
    result = run(engine, [10, 11, 12], on_token=seen.append)
    assert engine.calls == [[10, 11, 12], [5], [6], [7]]
    assert result.tokens == seen == [5, 6, 7]
    assert result.finish_reason == "stop"
    assert (result.prefill_tokens, result.decode_tokens) == (3, 3)


def test_eos_right_after_prefill() -> None:
    result = run(ScriptedEngine([EOS]), [1, 2])
    assert result.tokens == []
    assert result.finish_reason == "stop"
    assert result.decode_tokens == 0


def test_steps_limit_generated_tokens() -> None:
    engine = ScriptedEngine([5, 6, 7, 8, 9, EOS])
    result = run(engine, [1], steps=3)
    assert result.tokens == [5, 6, 7]
    assert result.finish_reason == "length"
    assert engine.calls == [[1], [5], [6]]  # the last token is returned, never fed


def test_zero_steps_prefills_only() -> None:
    engine = ScriptedEngine([5])
    result = run(engine, [1, 2, 3], steps=0)
    assert result.tokens == [] and engine.calls == [[1, 2, 3]] and engine.position == 3


def test_stops_when_the_context_is_full() -> None:
    engine = ScriptedEngine(list(range(10, 30)), max_seq_len=6)
    result = run(engine, [1, 2, 3])
    assert result.finish_reason == "length"
    assert result.tokens == [10, 11, 12, 13]  # positions 3..5 fed, then the 4th token from the last logits
    assert engine.position == 6


def test_prompt_that_does_not_fit() -> None:
    engine = ScriptedEngine([5], max_seq_len=4)
    with pytest.raises(ValueError, match="does not fit"):
        run(engine, [1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="empty"):
        run(engine, [])
    with pytest.raises(ValueError, match="steps"):
        run(engine, [1], steps=-1)


def test_continues_from_the_current_position() -> None:
    engine = ScriptedEngine([5, EOS, 7, EOS])
    run(engine, [1, 2])
    assert engine.position == 3
    result = run(engine, [EOS, 3])  # the next turn: only the new tokens
    assert engine.calls[-2:] == [[EOS, 3], [7]]
    assert result.tokens == [7] and engine.position == 6


def test_text_with_a_tokenizer() -> None:
    class Letters:
        def decode(self, ids: list[int]) -> str:
            return "".join(chr(ord("a") + i) for i in ids)

    result = run(ScriptedEngine([0, 1, EOS]), [3], tokenizer=Letters())
    assert result.text == "ab"


def test_rates() -> None:
    result = GenerationResult([1] * 8, "stop", prefill_tokens=10, prefill_seconds=0.5, decode_tokens=8, decode_seconds=2.0)
    assert result.prefill_tokens_per_second == pytest.approx(20.0)
    assert result.prefill_ms_per_token == pytest.approx(50.0)
    assert result.decode_tokens_per_second == pytest.approx(4.0)
    assert result.decode_ms_per_token == pytest.approx(250.0)
    empty = GenerationResult([], "stop", 1, 0.1, 0, 0.0)
    assert empty.decode_tokens_per_second == 0.0 and empty.decode_ms_per_token == 0.0


def test_format_stats_single_node() -> None:
    result = GenerationResult([1] * 8, "stop", prefill_tokens=10, prefill_seconds=0.5, decode_tokens=8, decode_seconds=2.0)
    assert format_stats(result) == (
        "Evaluation\n"
        "    nTokens: 10\n"
        "   tokens/s: 20.00 (50.00 ms/tok)\n"
        "Prediction\n"
        "    nTokens: 8\n"
        "   tokens/s: 4.00 (250.00 ms/tok)"
    )


def test_network_figures_per_token() -> None:
    engine = ScriptedEngine([5, 6, 7, EOS], stats={"sync_ms": 3.0, "sent_kb": 12.5, "recv_kb": 25.0})
    result = run(engine, [1, 2, 3, 4])
    # per forward call: the prefill call counts once for 4 tokens, decode calls once each
    assert result.prefill_net == {"sync_ms": 0.75, "sent_kb": 3.125, "recv_kb": 6.25}
    assert result.decode_net == {"sync_ms": 3.0, "sent_kb": 12.5, "recv_kb": 25.0}
    text = format_stats(result)
    assert "       sync: 3.00 ms/tok\n       sent: 12.5 kB/tok\n       recv: 25.0 kB/tok" in text
    assert text.count("sync:") == 2


def test_partial_network_figures() -> None:
    result = run(ScriptedEngine([5, EOS], stats={"sync_ms": 1.0}), [1])
    text = format_stats(result)
    assert "sync:" in text and "sent:" not in text and "recv:" not in text
