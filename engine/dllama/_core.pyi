"""Types of dllama._core, the native core built from native/binding.cpp: the Q40 block format for
the converter, one node's forward pass (`Transformer`) and the cluster's data plane (`Mesh`).
dllama.native builds its typed inputs from the engine's objects."""

from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

MAX_SEQUENCES: int
"""Sequences one KV cache holds at most."""

def kernel_name() -> str:
    """The kernel set chosen for this CPU: "generic", "avx2" or "neon" (DLLAMA_KERNELS=generic
    forces the portable one)."""

def quantize_q40(x: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """Float32 rows (the last dimension a multiple of 32) as Q40 blocks, 18 bytes per 32 values."""

def measure_read_bandwidth(bytes: int = 1073741824, nthreads: int = 1, repeats: int = 5) -> float:
    """Bytes per second that nthreads threads stream from memory (best of repeats)."""

class NetworkError(ConnectionError):
    """A peer of the mesh failed: closed, timed out, or sent a message that failed its checks."""

class _Enum:
    """What every pybind11 enum here has."""

    __members__: ClassVar[dict[str, Any]]
    def __init__(self, value: int) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def __ne__(self, other: object) -> bool: ...
    def __hash__(self) -> int: ...
    def __index__(self) -> int: ...
    def __int__(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...

class Arch(_Enum):
    """A model architecture, as a .m header's ARCH_TYPE numbers it."""

    LLAMA: ClassVar[Arch]
    QWEN3: ClassVar[Arch]
    QWEN3_MOE: ClassVar[Arch]

class FloatType(_Enum):
    """How a tensor's values are stored, as a .m header's WEIGHT_FLOAT_TYPE numbers it."""

    F32: ClassVar[FloatType]
    F16: ClassVar[FloatType]
    Q40: ClassVar[FloatType]
    Q80: ClassVar[FloatType]

class RopeStyle(_Enum):
    """Which pairs RoPE rotates: neighbours (Meta's Llama) or the halves of a head."""

    INTERLEAVED: ClassVar[RopeStyle]
    ROTATE_HALF: ClassVar[RopeStyle]

class TensorKind(_Enum):
    """A weight the forward pass reads; dllama.tensors.KINDS names its tensors (`core`)."""

    EMBEDDING: ClassVar[TensorKind]
    WQ: ClassVar[TensorKind]
    WK: ClassVar[TensorKind]
    WV: ClassVar[TensorKind]
    WO: ClassVar[TensorKind]
    GATE: ClassVar[TensorKind]
    DOWN: ClassVar[TensorKind]
    UP: ClassVar[TensorKind]
    ROUTER: ClassVar[TensorKind]
    EXPERT_GATE: ClassVar[TensorKind]
    EXPERT_DOWN: ClassVar[TensorKind]
    EXPERT_UP: ClassVar[TensorKind]
    Q_NORM: ClassVar[TensorKind]
    K_NORM: ClassVar[TensorKind]
    ATTN_NORM: ClassVar[TensorKind]
    FFN_NORM: ClassVar[TensorKind]
    FINAL_NORM: ClassVar[TensorKind]
    LM_HEAD: ClassVar[TensorKind]

class StepOutput(_Enum):
    """What a cluster step returns."""

    NONE: ClassVar[StepOutput]
    LOGITS: ClassVar[StepOutput]
    TOPK: ClassVar[StepOutput]

class ModelConfig:
    """The model's shape as the core takes it (dllama.native.native_config builds it from a
    dllama.config.ModelConfig); the Transformer checks it."""

    def __init__(
        self,
        *,
        arch: Arch,
        dim: int,
        hidden_dim: int,
        n_layers: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        vocab_size: int,
        n_experts: int,
        n_active_experts: int,
        moe_hidden_dim: int,
        rope_theta: float,
        rope_style: RopeStyle,
        rope_scaling_factor: float,
        rope_scaling_low_freq_factor: float,
        rope_scaling_high_freq_factor: float,
        rope_scaling_orig_max_seq_len: int,
        norm_eps: float,
        weight_type: FloatType,
        vocab_limit: int = 0,
    ) -> None: ...
    @property
    def arch(self) -> Arch: ...
    @property
    def dim(self) -> int: ...
    @property
    def hidden_dim(self) -> int: ...
    @property
    def n_layers(self) -> int: ...
    @property
    def n_heads(self) -> int: ...
    @property
    def n_kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def vocab_limit(self) -> int: ...
    @property
    def n_experts(self) -> int: ...
    @property
    def n_active_experts(self) -> int: ...
    @property
    def moe_hidden_dim(self) -> int: ...
    @property
    def rope_theta(self) -> float: ...
    @property
    def rope_style(self) -> RopeStyle: ...
    @property
    def rope_scaling_factor(self) -> float: ...
    @property
    def rope_scaling_low_freq_factor(self) -> float: ...
    @property
    def rope_scaling_high_freq_factor(self) -> float: ...
    @property
    def rope_scaling_orig_max_seq_len(self) -> int: ...
    @property
    def norm_eps(self) -> float: ...
    @property
    def weight_type(self) -> FloatType: ...

class SlicePlan:
    """The half-open ranges of every sharded dimension one node owns (dllama.native.native_plan
    builds it from a dllama.cluster.plan.NodeSlice); the Transformer checks them."""

    def __init__(
        self,
        *,
        q_heads: tuple[int, int],
        kv_heads: tuple[int, int],
        ffn: tuple[int, int],
        moe: tuple[int, int],
        vocab: tuple[int, int],
    ) -> None: ...
    @property
    def q_heads(self) -> tuple[int, int]: ...
    @property
    def kv_heads(self) -> tuple[int, int]: ...
    @property
    def ffn(self) -> tuple[int, int]: ...
    @property
    def moe(self) -> tuple[int, int]: ...
    @property
    def vocab(self) -> tuple[int, int]: ...

class Mesh:
    """One connected socket per other node of a cluster (this node's own entry -1)."""

    def __init__(
        self,
        node: int,
        fds: list[int],
        names: list[str],
        timeout_ms: int = 10000,
        keys: list[bytes] | None = None,
    ) -> None:
        """Takes ownership of the sockets. keys: None or [] for plain messages, else one per node
        (b'' for this node, 32 bytes shared with each other node): every message then carries a
        16-byte keyed BLAKE2b tag, and one that fails it is a NetworkError naming its sender."""
    def stats(self) -> dict[str, float]:
        """Totals so far: "sent" and "received" (bytes), "sent_early" (of sent: all-reduce bytes sent
        before their partial was complete, while the matmul making the rest ran), "sync_seconds",
        "mac_seconds"."""

class Transformer:
    """One node's forward pass over its slice of the model."""

    def __init__(
        self,
        config: ModelConfig,
        plan: SlicePlan | None = None,
        nthreads: int = 1,
        max_seq_len: int = 4096,
        max_batch: int = 128,
        max_sequences: int = 1,
        kv_cache_type: FloatType = FloatType.F32,
    ) -> None:
        """plan None: the whole model on this node. The KV cache (max_sequences sequences of
        max_seq_len positions, F32 or F16) is allocated here."""
    def bind(
        self,
        kind: TensorKind,
        layer: int,
        expert: int,
        buffer: Buffer,
        offset: int,
        rows: int,
        cols: int,
        row_stride: int,
        type: FloatType,
    ) -> None:
        """Binds one weight, named by its kind, layer and expert (0 where the kind has none): an F32
        one is read in place (the buffer is kept alive), a Q40 one copied into packed memory of
        the core's own. dllama.native.bind_tensor binds a slice the table describes."""
    def check_bound(self) -> None:
        """Raises ValueError naming the first weight not bound yet."""
    def forward(
        self, tokens: npt.ArrayLike, pos: int, logits: bool = True, seq: int = 0
    ) -> npt.NDArray[np.float32] | None:
        """One sequence's tokens at pos..; the last one's logits over this node's vocab slice."""
    def attach_root(self, mesh: Mesh, q80: bool, vocab_slices: list[int]) -> None:
        """Makes this the root of a cluster: steps then run on every node of the mesh."""
    def detach(self) -> None:
        """Tells the workers the session ended and leaves the cluster."""
    def step(
        self,
        seqs: npt.ArrayLike,
        positions: npt.ArrayLike,
        counts: npt.ArrayLike,
        tokens: npt.ArrayLike,
        outputs: npt.ArrayLike,
        temperatures: npt.ArrayLike,
    ) -> list[npt.NDArray[np.float32] | list[tuple[npt.NDArray[np.int32], npt.NDArray[np.float32], float]] | None]:
        """One step over several sequences, on this node alone or (attached) on every node: entry e
        feeds counts[e] of the tokens to sequence seqs[e] at positions[e]. Per entry: None (NONE),
        its logits over the whole vocabulary (LOGITS), or per node its top-64 candidate ids, their
        logits and log(sum(exp(logit / temperature))) over its slice (TOPK)."""
    def serve(self, mesh: Mesh, q80: bool) -> str:
        """A worker's loop: runs the root's steps until the session ends; returns why it ended."""
