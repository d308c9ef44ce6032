"""The generation loop, the prefix cache between sequences, and the figures an operator compares
at the end of a run.

generate() drives any engine with this shape:
    forward(tokens: list[int]) -> np.ndarray   logits of the last token; advances position
    position: int                              tokens already in the KV cache
    max_seq_len: int                           the context size
    reset()                                    empty the KV cache (position 0)
    stats() -> dict (optional)                 figures of the last forward call: sync_ms,
                                               sent_kb, recv_kb (each optional)
    rewind(n) (optional)                       keep the first n tokens of the KV cache
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Protocol, Sequence

import numpy as np

from dllama.sampler import Sampler

NET_STATS = ("sync_ms", "sent_kb", "recv_kb")


class EngineLike(Protocol):
    position: int
    max_seq_len: int

    def forward(self, tokens: list[int]) -> np.ndarray: ...

    def reset(self) -> None: ...


@dataclass
class GenerationResult:
    tokens: list[int]  # generated ids, without the eos that stopped generation
    finish_reason: str  # "stop": an eos id; "length": steps reached or context full
    prefill_tokens: int  # prompt tokens evaluated in the one prefill call
    prefill_seconds: float  # that call plus sampling the first token
    decode_tokens: int  # one-token forward calls after the prefill
    decode_seconds: float  # those calls plus sampling after each
    text: str = ""  # filled when generate() is given a tokenizer
    # per-token averages of the engine's network counters, when it has them
    prefill_net: dict[str, float] = field(default_factory=dict)
    decode_net: dict[str, float] = field(default_factory=dict)

    @property
    def prefill_tokens_per_second(self) -> float:
        return _rate(self.prefill_tokens, self.prefill_seconds)

    @property
    def prefill_ms_per_token(self) -> float:
        return _per_token_ms(self.prefill_tokens, self.prefill_seconds)

    @property
    def decode_tokens_per_second(self) -> float:
        return _rate(self.decode_tokens, self.decode_seconds)

    @property
    def decode_ms_per_token(self) -> float:
        return _per_token_ms(self.decode_tokens, self.decode_seconds)


def generate(
    engine: EngineLike,
    prompt_ids: Sequence[int],
    *,
    steps: int,
    sampler: Sampler,
    eos_ids: Collection[int],
    on_token: Callable[[int], bool | None] | None = None,
    tokenizer: Any = None,
) -> GenerationResult:
    """Evaluate prompt_ids from the engine's current position in one forward call, then sample
    up to `steps` tokens, one forward call each. Stops at an eos id (not returned), after
    `steps` tokens, or when the context is full. on_token(id) sees every returned token as it
    is sampled; when it returns True generation ends there (finish_reason "stop": the caller
    has what it wants, e.g. a stop string, or nobody is listening). The caller resets the engine
    when it wants a fresh context."""
    prompt_ids = [int(t) for t in prompt_ids]
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not prompt_ids:
        raise ValueError("the prompt is empty: nothing to continue from")
    start = engine.position
    if start + len(prompt_ids) > engine.max_seq_len:
        raise ValueError(
            f"the prompt ({len(prompt_ids)} tokens, from position {start}) does not fit in the context "
            f"({engine.max_seq_len} tokens); raise --max-seq-len or shorten the prompt"
        )
    eos = frozenset(int(t) for t in eos_ids)
    tokens: list[int] = []

    t0 = time.perf_counter()
    if steps > 0:
        token = _next_token(engine, prompt_ids, sampler)
    else:
        engine.forward(prompt_ids)
        token = None
    prefill_net = _net_stats(engine)
    prefill_seconds = time.perf_counter() - t0
    decode_net: dict[str, float] = {}

    decode_tokens = 0
    decode_seconds = 0.0
    finish_reason = "length"
    while token is not None:
        if token in eos:
            finish_reason = "stop"
            break
        tokens.append(token)
        if on_token is not None and on_token(token) is True:
            finish_reason = "stop"
            break
        if len(tokens) >= steps or engine.position >= engine.max_seq_len:
            break
        t0 = time.perf_counter()
        token = _next_token(engine, [token], sampler)
        for key, value in _net_stats(engine).items():
            decode_net[key] = decode_net.get(key, 0.0) + value
        decode_seconds += time.perf_counter() - t0
        decode_tokens += 1

    return GenerationResult(
        tokens=tokens,
        finish_reason=finish_reason,
        prefill_tokens=len(prompt_ids),
        prefill_seconds=prefill_seconds,
        decode_tokens=decode_tokens,
        decode_seconds=decode_seconds,
        text=tokenizer.decode(tokens) if tokenizer is not None else "",
        prefill_net=_per_token(prefill_net, len(prompt_ids)),
        decode_net=_per_token(decode_net, decode_tokens),
    )


class PrefixCache:
    """The tokens the engine's KV cache holds, in order. A new sequence keeps the longest common
    prefix (at least one prompt token is always evaluated: its logits are not stored); an engine
    without rewind(n) keeps it only when the sequence grew at its end."""

    def __init__(self) -> None:
        self.tokens: list[int] = []

    def reuse(self, engine: Any, ids: list[int]) -> int:
        """Makes the engine hold the longest usable prefix of ids; returns its length (ids[that:]
        are what to evaluate)."""
        if engine.position != len(self.tokens):  # someone else moved the engine: nothing is known
            self.tokens = []
        keep, limit = 0, min(len(self.tokens), len(ids) - 1)
        while keep < limit and self.tokens[keep] == ids[keep]:
            keep += 1
        if keep < engine.position:
            rewind = getattr(engine, "rewind", None)
            if keep > 0 and callable(rewind):
                rewind(keep)
            else:
                engine.reset()
                keep = 0
        del self.tokens[keep:]
        return keep

    def record(self, engine: Any, fed: list[int]) -> None:
        """After a sequence: fed are the tokens given to the engine since reuse() (the prompt's
        rest, then the generated ones); the cache holds those up to the engine's position."""
        self.tokens = (self.tokens + fed)[: engine.position]

    def clear(self) -> None:
        self.tokens = []


def _next_token(engine: Any, tokens: list[int], sampler: Sampler) -> int:
    # the engine samples where that moves less data (a cluster's nodes send their best
    # candidates, not every logit); anything with only forward() gets its logits sampled here
    if hasattr(engine, "next_token"):
        return engine.next_token(tokens, sampler)
    return sampler.sample(engine.forward(tokens))


def format_stats(result: GenerationResult) -> str:
    """The closing block, in Distributed Llama's words:

    Evaluation
        nTokens: 12
       tokens/s: 95.21 (10.50 ms/tok)
    Prediction
        nTokens: 63
       tokens/s: 8.40 (119.05 ms/tok)
           sync: 31.20 ms/tok
           sent: 96.0 kB/tok
           recv: 96.0 kB/tok
    """
    lines: list[str] = []
    for title, n, seconds, net in (
        ("Evaluation", result.prefill_tokens, result.prefill_seconds, result.prefill_net),
        ("Prediction", result.decode_tokens, result.decode_seconds, result.decode_net),
    ):
        lines.append(title)
        lines.append(f"    nTokens: {n}")
        lines.append(f"   tokens/s: {_rate(n, seconds):.2f} ({_per_token_ms(n, seconds):.2f} ms/tok)")
        if "sync_ms" in net:
            lines.append(f"       sync: {net['sync_ms']:.2f} ms/tok")
        if "sent_kb" in net:
            lines.append(f"       sent: {net['sent_kb']:.1f} kB/tok")
        if "recv_kb" in net:
            lines.append(f"       recv: {net['recv_kb']:.1f} kB/tok")
    return "\n".join(lines)


def _rate(n: int, seconds: float) -> float:
    return n / seconds if n and seconds > 0 else 0.0


def _per_token_ms(n: int, seconds: float) -> float:
    return seconds * 1000.0 / n if n else 0.0


def _net_stats(engine: Any) -> dict[str, float]:
    stats = getattr(engine, "stats", None)
    if not callable(stats):
        return {}
    values = stats() or {}
    return {k: float(values[k]) for k in NET_STATS if values.get(k) is not None}


def _per_token(totals: dict[str, float], n: int) -> dict[str, float]:
    return {k: v / n for k, v in totals.items()} if n else {}
