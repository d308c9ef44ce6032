"""The model's shape: one typed object built from a .m header or a Hugging Face config.json."""
from __future__ import annotations

import dataclasses
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


# The largest shape a model may have: far above any released model (Llama 3.1 405B: dim 16384, FFN
# 53248, 126 layers, 128 heads; Qwen3-235B-A22B: 128 experts; vocabularies up to ~256k tokens),
# far below what would let a stranger's header or CONFIG frame make a node allocate without limit.
LIMITS: dict[str, int] = {
    "dim": 1 << 16,
    "hidden_dim": 1 << 20,
    "n_layers": 1024,
    "n_heads": 1024,
    "n_kv_heads": 1024,
    "head_dim": 1024,
    "n_experts": 1024,
    "moe_hidden_dim": 1 << 20,
    "vocab_size": 1 << 21,
    "seq_len": 1 << 24,
}
# Every layer of a MoE model holds three tensors per expert: n_layers x n_experts bounds the size
# of a tensor table (Kimi K2: 61 x 384 = 23,424).
MAX_EXPERT_LAYERS = 1 << 16
INT32 = (-(2**31), 2**31 - 1)  # every header value is an int32


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
        if not self.head_dim and self.n_heads > 0:  # n_heads <= 0 is left for check() to name
            self.head_dim = self.dim // self.n_heads
        self.q_dim = self.n_heads * self.head_dim
        self.kv_dim = self.n_kv_heads * self.head_dim

    def check(self) -> None:
        """Refuse numbers that cannot describe a model this engine runs, before anything is sized
        from them: the one rule for a .m header, a model being written and a root's CONFIG frame.
        Raises ValueError naming the field."""
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            low = 0 if name in ("hidden_dim", "n_experts", "moe_hidden_dim") else 1
            if not low <= value <= limit:
                raise ValueError(f"{name} = {value} is out of range ({low}..{limit})")
        for f in dataclasses.fields(self):  # the others: rope and norm settings, the version
            value = getattr(self, f.name)
            if not INT32[0] <= value <= INT32[1]:
                raise ValueError(f"{f.name} = {value} does not fit an int32")
        if self.weight_type not in (FloatType.F32, FloatType.Q40):
            raise ValueError(f"unsupported weight float type {self.weight_type.name} (only F32 and Q40)")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} is odd: RoPE rotates pairs")
        if self.norm_epsilon <= 0:
            raise ValueError(f"norm_epsilon must be positive, got {self.norm_epsilon}")
        if self.is_moe:
            if not self.n_experts or not self.moe_hidden_dim:
                raise ValueError("a qwen3_moe model needs n_experts and moe_hidden_dim")
            if not 0 < self.n_active_experts <= self.n_experts:
                raise ValueError(f"n_active_experts {self.n_active_experts} is not in 1..{self.n_experts}")
            if self.n_layers * self.n_experts > MAX_EXPERT_LAYERS:
                raise ValueError(f"{self.n_layers} layers x {self.n_experts} experts is above the limit of "
                                 f"{MAX_EXPERT_LAYERS}")
        elif not self.hidden_dim:
            raise ValueError("hidden_dim must be positive for a dense model")
        # the activations synchronised between nodes are Q80 blocks of dim; a Q40 matrix is cut
        # into whole blocks along its input: dim (q/k/v, FFN in, lm_head), q_dim (o_proj), hidden
        blocked = {"dim": self.dim}
        if self.weight_type == FloatType.Q40:
            blocked["q_dim (n_heads x head_dim)"] = self.q_dim
            blocked["moe_hidden_dim" if self.is_moe else "hidden_dim"] = (
                self.moe_hidden_dim if self.is_moe else self.hidden_dim)
        for name, value in blocked.items():
            if value % BLOCK_SIZE:
                raise ValueError(f"{name} = {value} is not a multiple of {BLOCK_SIZE}")

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
