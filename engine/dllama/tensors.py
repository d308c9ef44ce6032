"""The one table of a model's tensors (in the manner of gpt-fast's tp.py): one row per kind, in .m
file order, with its name in the file, its shape from the config, how it is stored, and how
tensor parallelism cuts it (the axis, and the range of a node's slice it follows).

Every rule about tensors is read from here: the file layout (model_file: order, shapes, sizes),
the part of each tensor a node holds (cluster/slices, so also the manifest a worker checks in
cluster/footprint and cluster/session), and the native core, which receives each weight by its
kind (`core`, a member of `_core.TensorKind`), layer and expert, never by a name to parse.

A new architecture's tensors are rows here (`when` names the models that have them): layout,
parts, manifest and binding follow. The C++ side knows no names, order or cuts; it declares the
weights its forward pass reads (native/model.h: DLLAMA_TENSOR_KINDS, Weights, find_tensor_slot
with the [rows, cols] it multiplies each at), and tests/test_native.py checks both list the same
kinds and that every node binds what this table gives it.

Neither numpy nor the native core is imported here: the Ansible controller reads it (footprint).
"""
from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby
from typing import TYPE_CHECKING

from .config import FloatType, ModelConfig, row_bytes

if TYPE_CHECKING:
    from .cluster.plan import NodeSlice


class Scope(enum.Enum):
    """How many of a kind a file holds, and how they are named."""

    MODEL = "model"  # one: `name` (before the first layer or after the last, as the table places it)
    LAYER = "layer"  # one per layer: `layers.{l}.name`
    EXPERT = "expert"  # one per expert of every layer: `layers.{l}.experts.{e}.name`


class Split(enum.Enum):
    """The axis tensor parallelism cuts: a node holds all of the other one."""

    NONE = "none"  # every node holds it whole
    ROWS = "rows"  # outputs
    COLS = "cols"  # inputs: the node's partial sum is all-reduced


class Follows(enum.Enum):
    """The range of a node's slice (cluster.plan.NodeSlice, named by the value) a split follows."""

    WHOLE = "whole"
    Q_HEADS = "q_heads"  # in heads of head_dim rows or columns
    KV_HEADS = "kv_heads"
    FFN = "ffn"
    MOE = "moe"
    VOCAB = "vocab"


@dataclass(frozen=True)
class Kind:
    """One row of the table."""

    core: str  # the native core's _core.TensorKind member: the weight its forward pass reads
    name: str  # in a .m file, after the scope's prefix
    scope: Scope
    shape: Callable[[ModelConfig], tuple[int, ...]]  # [out, in] of a matrix, [n] of a vector
    matrix: bool  # stored in the header's weight type (F32 or Q40); False: always F32
    split: Split = Split.NONE
    follows: Follows = Follows.WHOLE
    when: Callable[[ModelConfig], bool] = lambda c: True

    def type(self, config: ModelConfig) -> FloatType:
        return config.weight_type if self.matrix else FloatType.F32


def _dense(c: ModelConfig) -> bool:
    return not c.is_moe


def _moe(c: ModelConfig) -> bool:
    return c.is_moe


def _qk_norm(c: ModelConfig) -> bool:
    return c.has_qk_norm


MODEL, LAYER, EXPERT = Scope.MODEL, Scope.LAYER, Scope.EXPERT
ROWS, COLS = Split.ROWS, Split.COLS
Q_HEADS, KV_HEADS, FFN, MOE, VOCAB = Follows.Q_HEADS, Follows.KV_HEADS, Follows.FFN, Follows.MOE, Follows.VOCAB

# Every tensor of every architecture, in file order; a layer's expert rows repeat per expert where
# they stand. Norms and the router are replicated; attention follows the node's heads, the FFN its
# hidden rows, the LM head its vocabulary rows (DESIGN.md, "Tensor parallelism").
KINDS: tuple[Kind, ...] = (
    #    core           .m name                     scope   shape                               matrix split follows
    Kind("EMBEDDING",   "embed_tokens",             MODEL,  lambda c: (c.vocab_size, c.dim),    False),
    Kind("WQ",          "q_proj",                   LAYER,  lambda c: (c.q_dim, c.dim),         True, ROWS, Q_HEADS),
    Kind("WK",          "k_proj",                   LAYER,  lambda c: (c.kv_dim, c.dim),        True, ROWS, KV_HEADS),
    Kind("WV",          "v_proj",                   LAYER,  lambda c: (c.kv_dim, c.dim),        True, ROWS, KV_HEADS),
    Kind("WO",          "o_proj",                   LAYER,  lambda c: (c.dim, c.q_dim),         True, COLS, Q_HEADS),
    Kind("GATE",        "gate_proj",                LAYER,  lambda c: (c.hidden_dim, c.dim),    True, ROWS, FFN, _dense),
    Kind("DOWN",        "down_proj",                LAYER,  lambda c: (c.dim, c.hidden_dim),    True, COLS, FFN, _dense),
    Kind("UP",          "up_proj",                  LAYER,  lambda c: (c.hidden_dim, c.dim),    True, ROWS, FFN, _dense),
    Kind("ROUTER",      "router",                   LAYER,  lambda c: (c.n_experts, c.dim),     False, when=_moe),
    Kind("EXPERT_GATE", "gate_proj",                EXPERT, lambda c: (c.moe_hidden_dim, c.dim), True, ROWS, MOE, _moe),
    Kind("EXPERT_DOWN", "down_proj",                EXPERT, lambda c: (c.dim, c.moe_hidden_dim), True, COLS, MOE, _moe),
    Kind("EXPERT_UP",   "up_proj",                  EXPERT, lambda c: (c.moe_hidden_dim, c.dim), True, ROWS, MOE, _moe),
    Kind("Q_NORM",      "q_norm",                   LAYER,  lambda c: (c.head_dim,),            False, when=_qk_norm),
    Kind("K_NORM",      "k_norm",                   LAYER,  lambda c: (c.head_dim,),            False, when=_qk_norm),
    Kind("ATTN_NORM",   "input_layernorm",          LAYER,  lambda c: (c.dim,),                 False),
    Kind("FFN_NORM",    "post_attention_layernorm", LAYER,  lambda c: (c.dim,),                 False),
    Kind("FINAL_NORM",  "norm",                     MODEL,  lambda c: (c.dim,),                 False),
    Kind("LM_HEAD",     "lm_head",                  MODEL,  lambda c: (c.vocab_size, c.dim),    True, ROWS, VOCAB),
)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a file: its name, shape [out, in] (or [n] for vectors), storage type, and
    which weight of the model it is (its kind, layer and expert; None where the kind has none)."""

    name: str
    shape: tuple[int, ...]
    type: FloatType
    kind: Kind
    layer: int | None
    expert: int | None

    @property
    def nbytes(self) -> int:
        rows = math.prod(self.shape[:-1])
        return rows * row_bytes(self.type, self.shape[-1])


def _runs(config: ModelConfig) -> tuple[list[Kind], list[list[Kind]], list[Kind]]:
    """The kinds this model has: those before the first layer, a layer's as runs of one scope
    (an expert run repeats per expert), those after the last layer."""
    kinds = [k for k in KINDS if k.when(config)]
    body = [i for i, k in enumerate(kinds) if k.scope is not MODEL]
    first, last = (body[0], body[-1] + 1) if body else (len(kinds), len(kinds))
    runs = [list(run) for _, run in groupby(kinds[first:last], key=lambda k: k.scope)]
    return kinds[:first], runs, kinds[last:]


def _experts(config: ModelConfig) -> int:
    return config.n_experts if config.is_moe else 0


def _spec(kind: Kind, config: ModelConfig, layer: int | None = None, expert: int | None = None) -> TensorSpec:
    name = kind.name
    if expert is not None:
        name = f"experts.{expert}.{name}"
    if layer is not None:
        name = f"layers.{layer}.{name}"
    return TensorSpec(name, kind.shape(config), kind.type(config), kind, layer, expert)


def tensor_layout(config: ModelConfig) -> list[TensorSpec]:
    """Every tensor of a .m file for this config, in file order."""
    head, runs, tail = _runs(config)
    out = [_spec(k, config) for k in head]
    for layer in range(config.n_layers):
        for run in runs:
            if run[0].scope is EXPERT:
                out += [_spec(k, config, layer, e) for e in range(_experts(config)) for k in run]
            else:
                out += [_spec(k, config, layer) for k in run]
    return out + [_spec(k, config) for k in tail]


def _per_layer(config: ModelConfig, run: list[Kind]) -> int:
    return _experts(config) if run[0].scope is EXPERT else 1


def tensor_count(config: ModelConfig) -> int:
    """len(tensor_layout(config)), without listing them."""
    head, runs, tail = _runs(config)
    return len(head) + len(tail) + config.n_layers * sum(_per_layer(config, run) * len(run) for run in runs)


def layout_nbytes(config: ModelConfig) -> int:
    """The bytes of every tensor of a .m file for this config, computed per kind (a header claiming
    millions of experts costs no list of them). The config must pass check()."""
    head, runs, tail = _runs(config)

    def total(kinds: list[Kind]) -> int:
        return sum(_spec(k, config).nbytes for k in kinds)

    per_layer = sum(_per_layer(config, run) * total(run) for run in runs)
    return total(head) + config.n_layers * per_layer + total(tail)


def held_part(kind: Kind, config: ModelConfig, node: NodeSlice) -> tuple[tuple[int, int], tuple[int, int]]:
    """The rows and the columns of a `kind` tensor that a node with this slice holds, as half-open
    ranges (a vector is one row)."""
    shape = kind.shape(config)
    rows, cols = (0, shape[0] if len(shape) == 2 else 1), (0, shape[-1])
    if kind.split is Split.NONE:
        return rows, cols
    lo, hi = getattr(node, kind.follows.value)
    unit = config.head_dim if kind.follows in (Follows.Q_HEADS, Follows.KV_HEADS) else 1
    part = (lo * unit, hi * unit)
    return (part, cols) if kind.split is Split.ROWS else (rows, part)


def _check_table() -> None:
    """A row that splits names the range it follows, and one that does not names none; the
    native names are unique (each is one weight of the forward pass)."""
    for k in KINDS:
        if (k.split is Split.NONE) != (k.follows is Follows.WHOLE):
            raise AssertionError(f"tensor kind {k.core}: split {k.split.name} with follows {k.follows.name}")
    cores = [k.core for k in KINDS]
    if len(set(cores)) != len(cores):
        raise AssertionError("tensor kinds share a core name")


_check_table()

