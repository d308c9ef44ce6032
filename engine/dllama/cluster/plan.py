"""Which part of every sharded dimension each node owns: computed once from the model's shape,
the node count and the nodes' weights; the forward pass only reads it."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..config import BLOCK_SIZE, FloatType, ModelConfig


@dataclass(frozen=True)
class NodeSlice:
    """Half-open ranges of one node."""

    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    ffn: tuple[int, int]
    moe: tuple[int, int]
    vocab: tuple[int, int]


def split(total: int, weights: Sequence[float], unit: int = 1) -> list[tuple[int, int]]:
    """Cuts [0, total) into len(weights) consecutive ranges proportional to the weights, every
    boundary a multiple of `unit` (the last range takes the remainder), each range non-empty."""
    units = total // unit
    n = len(weights)
    if units < n:
        raise ValueError(f"cannot split {total} into {n} parts of whole blocks of {unit}")
    whole = sum(weights)
    bounds = [0]
    acc = 0.0
    for i, w in enumerate(weights[:-1]):
        acc += w
        b = round(units * acc / whole)
        # every node keeps at least one unit, and leaves one for each node after it
        b = max(b, bounds[-1] + 1)
        b = min(b, units - (n - 1 - i))
        bounds.append(b)
    ranges = [(bounds[i] * unit, bounds[i + 1] * unit) for i in range(n - 1)]
    ranges.append((bounds[-1] * unit, total))
    return ranges


def plan_slices(config: ModelConfig, weights: Sequence[float]) -> list[NodeSlice]:
    """The slice of every node; node 0 is the root. Every node holds the whole embedding (the
    root sends token ids, 4 bytes each, where embedded rows would cost dim floats)."""
    n = len(weights)
    if n < 1:
        raise ValueError("a cluster has at least one node")
    if any(w <= 0 for w in weights):
        raise ValueError("node weights must be positive")
    if n > config.n_heads:
        raise ValueError(f"{n} nodes cannot share {config.n_heads} attention heads: use at most {config.n_heads} nodes")
    # blocks of 32 stay whole wherever a Q40 row is cut (the columns of o_proj and down_proj)
    unit = BLOCK_SIZE if config.weight_type == FloatType.Q40 else 1
    head_unit = 1
    while (head_unit * config.head_dim) % unit:
        head_unit += 1
    if config.n_heads % head_unit or config.n_heads // head_unit < n:
        raise ValueError(f"cannot split {config.n_heads} heads of {config.head_dim} into {n} block-aligned parts")
    heads = split(config.n_heads, weights, head_unit)
    ffn = split(config.hidden_dim, weights, unit) if not config.is_moe else [(0, 0)] * n
    moe = split(config.moe_hidden_dim, weights, unit) if config.is_moe else [(0, 0)] * n
    vocab = split(config.vocab_size, weights)
    out = []
    for i in range(n):
        out.append(NodeSlice(heads[i], kv_heads_of(config, heads[i]), ffn[i], moe[i], vocab[i]))
    return out


def kv_heads_of(config: ModelConfig, q_heads: tuple[int, int]) -> tuple[int, int]:
    """The kv heads a range of query heads reads (grouped-query attention); nodes sharing a kv
    head each hold a copy of it."""
    group = config.n_heads // config.n_kv_heads
    return q_heads[0] // group, (q_heads[1] - 1) // group + 1
