"""Picking the next token from the logits: greedy, or temperature + top-p over the top 64.

Sampling only ever looks at the 64 largest logits and the softmax normaliser of the whole
vocabulary. That is what a cluster can gather cheaply: each node holds a slice of the LM head,
sends its own top 64 and the normaliser of its slice, and `merge_candidates` turns those into the
same candidates one node would have found, so a cluster samples what one node samples. (The ids
and logits merge exactly; the normaliser agrees to about 1e-7, which matters only when a
cumulative probability falls that close to topp.)
"""
from __future__ import annotations

import math
import os
from typing import Iterable, NamedTuple

import numpy as np

TOP_K = 64  # candidates kept per node and after merging
# Temperatures below this are greedy. Dividing by a tiny temperature overflows (1/1e-39 is inf in
# float32, and 0 * inf is NaN), and long before that sampling is argmax already: at 1e-5 a logit
# gap of 1e-3 (about the rounding of q80 activations) makes the runner-up e^-100 as likely, so
# only ties within rounding noise could differ. (vLLM treats temperatures below 1e-5 the same way.)
GREEDY_BELOW = 1e-5


class Candidates(NamedTuple):
    """The top logits of a vocabulary (or a slice of one), best first."""

    ids: np.ndarray  # int64 [<=TOP_K], sorted by logit descending, ties by smaller id
    logits: np.ndarray  # float32 [<=TOP_K], the raw logits of ids
    log_norm: float  # logsumexp(logits / temperature) over the whole vocabulary (or slice)


class Sampler:
    """temperature 0 (or below GREEDY_BELOW): argmax. Otherwise: softmax(logits / temperature),
    keep the smallest prefix of the top 64 whose probability reaches topp, and draw from it with a
    seeded PCG64 generator (one uniform draw per token)."""

    def __init__(self, temperature: float = 0.8, topp: float = 0.9, seed: int | None = None) -> None:
        temperature = float(temperature)
        topp = float(topp)
        if not (np.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not (0 < topp <= 1):
            raise ValueError(f"topp must be in (0, 1], got {topp}")
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        elif not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.temperature = effective_temperature(temperature)
        self.topp = topp
        self.seed = int(seed)
        self.rng = np.random.Generator(np.random.PCG64(self.seed))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def sample(self, logits: np.ndarray) -> int:
        """The next token id for the logits of the last position."""
        if self.greedy:
            x = _check_logits(logits)
            return int(np.argmax(x))  # first maximum: the smaller id wins a tie
        return self.sample_candidates(*self.candidates(logits))

    def candidates(self, logits: np.ndarray) -> Candidates:
        """The top 64 of logits and logsumexp(logits / temperature) (0.0 when greedy: unused)."""
        return candidates(logits, self.temperature)

    def sample_candidates(self, ids: np.ndarray, logits: np.ndarray, log_norm: float) -> int:
        """Draw from candidates; their probabilities are global, exp(logit / T - log_norm)."""
        ids = np.asarray(ids)
        if ids.size == 0:
            raise ValueError("no candidates to sample from")
        if self.greedy:
            return int(ids[0])
        if not np.isfinite(log_norm):
            raise ValueError("every logit is -inf: nothing to sample")
        p = np.exp(np.asarray(logits, dtype=np.float64) / self.temperature - float(log_norm))
        cum = np.cumsum(p)
        reached = np.flatnonzero(cum >= self.topp)
        keep = int(reached[0]) + 1 if reached.size else len(p)  # the 64 may fall short of topp: use them all
        r = self.rng.random() * cum[keep - 1]
        index = min(int(np.searchsorted(cum[:keep], r, side="right")), keep - 1)
        return int(ids[index])


def candidates(logits: np.ndarray, temperature: float, offset: int = 0) -> Candidates:
    """Top 64 ids (plus offset: a node's slice starts there) and the slice's log-normaliser."""
    x = _check_logits(logits)
    k = min(TOP_K, x.size)
    if k == x.size:
        top = np.arange(x.size)
    else:
        # the k-th largest value, then every larger one plus the smallest ids among the equal ones
        threshold = np.partition(x, x.size - k)[x.size - k]
        above = np.flatnonzero(x > threshold)
        equal = np.flatnonzero(x == threshold)[: k - above.size]
        top = np.concatenate([above, equal])
    top = top[np.lexsort((top, -x[top]))]
    temperature = effective_temperature(temperature)
    log_norm = _logsumexp(x, temperature) if temperature > 0 else 0.0
    return Candidates(top.astype(np.int64) + offset, x[top].copy(), log_norm)


def effective_temperature(temperature: float) -> float:
    """The temperature sampling uses: 0.0 (greedy) below GREEDY_BELOW, else temperature itself."""
    return 0.0 if temperature < GREEDY_BELOW else float(temperature)


def merge_candidates(parts: Iterable[tuple[np.ndarray, np.ndarray, float]]) -> Candidates:
    """Merge per-node (ids, logits, log_norm) into the global top 64 and global log-normaliser."""
    parts = list(parts)
    if not parts:
        raise ValueError("nothing to merge")
    ids = np.concatenate([np.asarray(p[0], dtype=np.int64) for p in parts])
    logits = np.concatenate([np.asarray(p[1], dtype=np.float32) for p in parts])
    if ids.size == 0:
        raise ValueError("no candidates to merge")
    order = np.lexsort((ids, -logits))[:TOP_K]
    log_norm = float(np.logaddexp.reduce(np.array([float(p[2]) for p in parts], dtype=np.float64)))
    return Candidates(ids[order], logits[order], log_norm)


def _check_logits(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float32)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"logits must be a non-empty vector, got shape {x.shape}")
    if np.isnan(x).any() or np.isposinf(x).any():
        raise ValueError("logits contain NaN or +inf")
    return x


def _logsumexp(x: np.ndarray, temperature: float) -> float:
    """logsumexp(x / temperature): exp in float32 (several times faster than float64 over a whole
    vocabulary), summed in float64; about 1e-7 from the float64 value."""
    m = float(np.max(x))
    if m == -np.inf:
        return -np.inf  # every logit masked: this slice contributes nothing
    with np.errstate(over="ignore", under="ignore"):
        z = np.subtract(x, np.float32(m))
        z *= np.float32(1.0 / temperature)
        np.exp(z, out=z)
    return m / temperature + math.log(float(np.sum(z, dtype=np.float64)))
