"""The reference a temperature-0 generation is held to: engine.forward and argmax, fed the way
generate() feeds (the prompt in one step, then one step per token), so the same computations
give the same tokens."""
from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from dllama import Engine


def greedy(engine: Engine, prompt: Sequence[int], n: int, eos: Collection[int] = (), seq: int = 0) -> list[int]:
    """Up to n greedy tokens after prompt, from the sequence's current position: ends before an eos
    (fed like every token before it) or when the context is full. The last token is never fed."""
    out: list[int] = []
    logits = engine.forward(list(prompt), seq)
    while len(out) < n:
        token = int(np.argmax(logits))  # the first maximum: a tie goes to the smaller id, as in the sampler
        if token in eos:
            break
        out.append(token)
        if len(out) == n or engine.position_of(seq) >= engine.max_seq_len:
            break
        logits = engine.forward([token], seq)
    return out


def eos_at(tokens: Sequence[int], k: int) -> tuple[int, int]:
    """tokens[k] to name as an eos id, and how many tokens a run that stops at it yields: those
    before its first occurrence (a random model may repeat itself)."""
    eos = tokens[k]
    return eos, list(tokens).index(eos)
