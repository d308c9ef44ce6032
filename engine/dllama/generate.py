"""The generation loop, the prefix cache between sequences, and the figures an operator compares
at the end of a run.

A `Generation` is one sequence being generated in one of the engine's sequence slots: it says
what to feed next (`entry`: a chunk of its prompt, or the token it sampled last) and takes the
step's result (`advance`: samples the next token from the candidates). `generate()` runs one of
them alone; dllama-api's scheduler runs several in the same steps. Both drive a real
dllama.Engine (engine.step).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Sequence

from dllama.engine import NONE, TOPK, Entry, StepResult
from dllama.sampler import Candidates, Sampler

NET_STATS = ("sync_ms", "sent_kb", "recv_kb")
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


class Generation:
    """One sequence from its prompt to its last token, in engine sequence slot `seq`.

    prompt_ids are the tokens still to feed (a reused prefix already in the slot's cache is not
    among them); `start` is the slot's position before them. Up to `steps` tokens are sampled;
    generation ends at an eos id (not returned), after `steps` tokens, when the context is full,
    or when on_token(id) returns True (the caller has what it wants, or nobody is listening:
    finish_reason "stop"), or `stop()` is called between steps.

        while not g.done:
            out = engine.step([g.entry()])[0]
            g.advance(out, seconds, engine.stats())
    """

    def __init__(self, prompt_ids: Sequence[int], *, seq: int, start: int, max_seq_len: int, steps: int,
                 sampler: Sampler, eos_ids: Collection[int], on_token: Callable[[int], bool | None] | None = None
                 ) -> None:
        self.prompt = [int(t) for t in prompt_ids]
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if not self.prompt:
            raise ValueError("the prompt is empty: nothing to continue from")
        if start + len(self.prompt) > max_seq_len:
            raise ValueError(
                f"the prompt ({len(self.prompt)} tokens, from position {start}) does not fit in the context "
                f"({max_seq_len} tokens); raise --max-seq-len or shorten the prompt"
            )
        self.seq = seq
        self.position = start  # the slot's position: tokens its cache holds
        self.max_seq_len = max_seq_len
        self.steps = steps
        self.sampler = sampler
        self.eos = frozenset(int(t) for t in eos_ids)
        self.on_token = on_token
        self.tokens: list[int] = []  # generated, without the eos
        self.fed: list[int] = []  # given to the engine: the prompt, then generated tokens
        self.done = False
        self.finish_reason = "length"
        self._prompt_at = 0  # prompt tokens fed so far
        self._pending: int | None = None  # sampled, not yet fed
        self._entry_tokens = 0
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0
        self.decode_tokens = 0
        self._prefill_net: dict[str, float] = {}
        self._decode_net: dict[str, float] = {}

    @property
    def prefilling(self) -> bool:
        return self._prompt_at < len(self.prompt)

    @property
    def prompt_left(self) -> int:
        return len(self.prompt) - self._prompt_at

    def entry(self, budget: int | None = None) -> Entry:
        """What this sequence feeds in the next step: up to `budget` prompt tokens (all of the
        rest when None), or the token it sampled last. Candidates come back only for the prompt's
        last chunk and for decode steps (none when steps is 0)."""
        if self.done:
            raise RuntimeError("this generation is over")
        if self.prefilling:
            n = self.prompt_left if budget is None else max(1, min(budget, self.prompt_left))
            tokens = self.prompt[self._prompt_at:self._prompt_at + n]
            last = self._prompt_at + n == len(self.prompt)
            output = TOPK if last and self.steps > 0 else NONE
        else:
            assert self._pending is not None
            tokens, output = [self._pending], TOPK
        self._entry_tokens = len(tokens)
        return Entry(self.seq, tokens, output, self.sampler.temperature)

    def advance(self, result: StepResult, seconds: float = 0.0, stats: dict | None = None) -> int | None:
        """Takes the step's result for the last entry(): returns the token it yields to the
        caller (None when it yields none: a prompt chunk, an eos, the end)."""
        n, was_prefill = self._entry_tokens, self.prefilling
        self.fed += (self.prompt[self._prompt_at:self._prompt_at + n] if was_prefill else [self._pending])
        self.position += n
        net = _net_values(stats)
        if was_prefill:
            self._prompt_at += n
            self.prefill_seconds += seconds
            _add(self._prefill_net, net)
            if self.prefilling:
                return None  # more prompt to feed
            if self.steps == 0:
                self.done = True
                return None
        else:
            self.decode_seconds += seconds
            self.decode_tokens += 1
            _add(self._decode_net, net)
        assert isinstance(result, Candidates), "a step that ends a prompt or decodes returns candidates"
        token = self.sampler.sample_candidates(*result)
        self._pending = None
        if token in self.eos:
            return self._finish("stop")
        self.tokens.append(token)
        if self.on_token is not None and self.on_token(token) is True:
            self._finish("stop")
            return token
        if len(self.tokens) >= self.steps or self.position >= self.max_seq_len:
            self._finish("length")
            return token
        self._pending = token
        return token

    def stop(self) -> None:
        """Ends the generation between steps (the client left): finish_reason "stop"."""
        if not self.done:
            self._finish("stop")

    def _finish(self, reason: str) -> None:
        self.done = True
        self.finish_reason = reason
        self._pending = None

    def result(self, tokenizer: Any = None) -> GenerationResult:
        return GenerationResult(
            tokens=list(self.tokens),
            finish_reason=self.finish_reason,
            prefill_tokens=len(self.prompt),
            prefill_seconds=self.prefill_seconds,
            decode_tokens=self.decode_tokens,
            decode_seconds=self.decode_seconds,
            text=tokenizer.decode(self.tokens) if tokenizer is not None else "",
            prefill_net=_per_token(self._prefill_net, self._prompt_at),  # per prompt token fed
            decode_net=_per_token(self._decode_net, self.decode_tokens),
        )


def generate(
    engine: Any,
    prompt_ids: Sequence[int],
    *,
    steps: int,
    sampler: Sampler,
    eos_ids: Collection[int],
    on_token: Callable[[int], bool | None] | None = None,
    tokenizer: Any = None,
    seq: int = 0,
) -> GenerationResult:
    """One Generation alone on a dllama.Engine, from sequence `seq`'s current position: the prompt
    in one step (the engine runs it in chunks of its max_batch), then one step per token. The
    caller resets the sequence when it wants a fresh context."""
    g = Generation(prompt_ids, seq=seq, start=engine.position_of(seq), max_seq_len=engine.max_seq_len,
                   steps=steps, sampler=sampler, eos_ids=eos_ids, on_token=on_token)
    while not g.done:
        t0 = time.perf_counter()
        out = engine.step([g.entry()])[0]
        g.advance(out, time.perf_counter() - t0, engine.stats())
    return g.result(tokenizer)


class PrefixCache:
    """The tokens one engine sequence's KV cache holds, in order. A new prompt keeps the longest
    common prefix (at least one prompt token is always evaluated: its logits are not stored)."""

    def __init__(self, seq: int = 0) -> None:
        self.seq = seq
        self.tokens: list[int] = []

    def common(self, ids: Sequence[int]) -> int:
        """How many leading tokens of ids this cache could keep."""
        keep, limit = 0, min(len(self.tokens), len(ids) - 1)
        while keep < limit and self.tokens[keep] == ids[keep]:
            keep += 1
        return keep

    def reuse(self, engine: Any, ids: list[int]) -> int:
        """Makes the engine's sequence hold the longest usable prefix of ids; returns its length
        (ids[that:] are what to evaluate)."""
        if engine.position_of(self.seq) != len(self.tokens):  # someone else moved it: nothing is known
            self.tokens = []
        keep = self.common(ids)
        engine.rewind(keep, self.seq)
        del self.tokens[keep:]
        return keep

    def record(self, engine: Any, fed: list[int]) -> None:
        """After a sequence: fed are the tokens given to the engine since reuse() (the prompt's
        rest, then the generated ones); the cache holds those up to the engine's position."""
        self.tokens = (self.tokens + fed)[: engine.position_of(self.seq)]

    def clear(self) -> None:
        self.tokens = []


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


def _net_values(stats: dict | None) -> dict[str, float]:
    values = stats or {}
    return {k: float(values[k]) for k in NET_STATS if values.get(k) is not None}


def _add(totals: dict[str, float], values: dict[str, float]) -> None:
    for key, value in values.items():
        totals[key] = totals.get(key, 0.0) + value


def _per_token(totals: dict[str, float], n: int) -> dict[str, float]:
    return {k: v / n for k, v in totals.items()} if n else {}
