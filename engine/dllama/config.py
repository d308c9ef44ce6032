"""The model's shape: one typed object built from a .m header or a Hugging Face config.json."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Arch(enum.IntEnum):
    LLAMA = 0x00ABCD00
    QWEN3 = 0x00ABCD01
    QWEN3_MOE = 0x00ABCD02


class FloatType(enum.IntEnum):
    F32 = 0
    F16 = 1
    Q40 = 2
    Q80 = 3


class RopeType(enum.IntEnum):
    LLAMA = 0  # interleaved pairs (Meta's layout)
    FALCON = 1  # rotate-half (NeoX); Qwen3 always uses it
    LLAMA3_1 = 2  # interleaved, with llama3 frequency scaling


class HiddenAct(enum.IntEnum):
    GELU = 0
    SILU = 1


BLOCK_SIZE = 32
# Bytes per block of 32 values; None for element types.
BLOCK_BYTES = {FloatType.Q40: 18, FloatType.Q80: 34}
ELEMENT_BYTES = {FloatType.F32: 4, FloatType.F16: 2}


def row_bytes(ftype: FloatType, n: int) -> int:
    """Bytes one row of n values takes in a .m file."""
    if ftype in ELEMENT_BYTES:
        return ELEMENT_BYTES[ftype] * n
    if n % BLOCK_SIZE:
        raise ValueError(f"a {ftype.name} row needs a multiple of {BLOCK_SIZE} values, got {n}")
    return BLOCK_BYTES[ftype] * (n // BLOCK_SIZE)


@dataclass
class ModelConfig:
    """Every field of a .m header, named as in FORMATS.md, with the defaults Distributed Llama uses."""

    arch: Arch
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    n_experts: int = 0
    n_active_experts: int = 0
    moe_hidden_dim: int = 0
    hidden_act: HiddenAct = HiddenAct.SILU
    rope_theta: int = 10000
    weight_type: FloatType = FloatType.Q40
    rope_type: RopeType = RopeType.LLAMA
    rope_scaling_factor: int = 0
    rope_scaling_low_freq_factor: int = 0
    rope_scaling_high_freq_factor: int = 0
    rope_scaling_orig_max_seq_len: int = 0
    head_dim: int = 0  # 0: dim // n_heads
    norm_epsilon: int = 5  # 5 means 1e-5
    version: int = 0
    # derived
    q_dim: int = field(init=False)
    kv_dim: int = field(init=False)

    def __post_init__(self) -> None:
        self.arch = Arch(self.arch)
        self.weight_type = FloatType(self.weight_type)
        self.rope_type = RopeType(self.rope_type)
        self.hidden_act = HiddenAct(self.hidden_act)
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads
        self.q_dim = self.n_heads * self.head_dim
        self.kv_dim = self.n_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.arch == Arch.QWEN3_MOE

    @property
    def has_qk_norm(self) -> bool:
        return self.arch in (Arch.QWEN3, Arch.QWEN3_MOE)

    @property
    def eps(self) -> float:
        return 10.0 ** -self.norm_epsilon

    @property
    def effective_rope_type(self) -> RopeType:
        """Qwen3 and Qwen3 MoE always rotate halves, whatever the header says."""
        return RopeType.FALCON if self.has_qk_norm else self.rope_type
