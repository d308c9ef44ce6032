"""The native core's typed inputs, built in one place from the engine's objects: the model's shape
(`_core.ModelConfig`), a node's slice (`_core.SlicePlan`) and its weights, bound by the kind,
layer and expert the table in dllama.tensors gives them. The engine (a root or a single node) and
a worker both build their `_core.Transformer` through here."""
from __future__ import annotations

from typing import TYPE_CHECKING

from . import _core
from .cluster.plan import NodeSlice
from .config import ModelConfig, RopeType

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from .cluster.slices import TensorSlice


def native_config(config: ModelConfig, vocab_limit: int = 0) -> _core.ModelConfig:
    """The model's shape as the native core takes it: the header's numbers, the rope style the
    architecture implies, llama3 rope scaling only where the header asks for it. `vocab_limit`
    (0: none) is the tokenizer's vocabulary when smaller than the model's: the LM head's padding
    rows at or above it get -inf logits, so no node ever offers them as candidates."""
    scaled = config.rope_type == RopeType.LLAMA3_1 and config.rope_scaling_factor > 0
    rotate_half = config.effective_rope_type == RopeType.FALCON
    return _core.ModelConfig(
        arch=_core.Arch(int(config.arch)),
        dim=config.dim,
        hidden_dim=config.hidden_dim,
        n_layers=config.n_layers,
        n_heads=config.n_heads,
        n_kv_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        vocab_size=config.vocab_size,
        vocab_limit=vocab_limit,
        n_experts=config.n_experts,
        n_active_experts=config.n_active_experts,
        moe_hidden_dim=config.moe_hidden_dim,
        rope_theta=float(config.rope_theta),
        rope_style=_core.RopeStyle.ROTATE_HALF if rotate_half else _core.RopeStyle.INTERLEAVED,
        rope_scaling_factor=float(config.rope_scaling_factor) if scaled else 0.0,
        rope_scaling_low_freq_factor=float(config.rope_scaling_low_freq_factor),
        rope_scaling_high_freq_factor=float(config.rope_scaling_high_freq_factor),
        rope_scaling_orig_max_seq_len=config.rope_scaling_orig_max_seq_len,
        norm_eps=config.eps,
        weight_type=_core.FloatType(int(config.weight_type)),
    )


def native_plan(node: NodeSlice) -> _core.SlicePlan:
    """A node's slice as the native core takes it (the core checks it against the model)."""
    return _core.SlicePlan(q_heads=node.q_heads, kv_heads=node.kv_heads, ffn=node.ffn, moe=node.moe,
                           vocab=node.vocab)


def bind_tensor(core: _core.Transformer, t: TensorSlice, buffer: Buffer, offset: int, row_stride: int) -> None:
    """Binds the slice `t` of a tensor, its rows `row_stride` bytes apart from `offset` in `buffer`;
    a refusal names the tensor."""
    try:
        core.bind(_core.TensorKind.__members__[t.kind.core], t.layer or 0, t.expert or 0, buffer, offset,
                  t.rows, t.cols, row_stride, _core.FloatType(int(t.type)))
    except ValueError as e:
        raise ValueError(f"tensor {t.name}: {e}") from None
