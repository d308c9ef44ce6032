"""What a model costs each node of a cluster: its share of the weights and its KV cache, and the
model file's size, read from the header alone.

Nothing here imports numpy or the native core: ansible/filter_plugins/preflight.py imports it on
an operator's controller that has only Ansible, to check the boards' memory before provisioning.
The rules are the engine's own (the header of model_file.py, the tensor table of tensors.py, the
split of plan.py, the tensors each node binds from slices.py), so the estimate follows any change
to them.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from ..config import BLOCK_BYTES, BLOCK_SIZE, FloatType, ModelConfig
from ..model_file import MAX_HEADER_PAIRS, ModelFileError, _layout_infos, header_size, layout_nbytes, parse_header
from .plan import NodeSlice, plan_slices
from .slices import TensorSlice, node_tensors

if TYPE_CHECKING:
    from .session import Session

# Bytes that always hold a whole header (what an HTTP Range request of a model's URL asks for).
HEADER_PROBE_BYTES = header_size(MAX_HEADER_PAIRS)
# Bytes per key or value in the KV cache, by --kv-cache-type (native/forward.cpp: key_cache_,
# value_cache_).
KV_BYTES = {"f32": 4, "f16": 2}
# What a node needs besides weights and KV cache: the Python interpreter with numpy and the
# native core (~35 MiB RSS on x86_64), the forward pass's activation buffers (a few MiB at
# 128-token batches), the API server's modules on the root.
RUNTIME_MARGIN_BYTES = 150 << 20
F32_BYTES = 4
MEMINFO = "/proc/meminfo"


@dataclass(frozen=True)
class ModelHeader:
    """A model as the header describes it: its shape, where its tensors start, its file size."""

    config: ModelConfig
    header_size: int
    file_size: int


@dataclass(frozen=True)
class NodeFootprint:
    """Memory one node of a cluster needs for a model, in bytes.

    `total` is what the node holds while it serves: every tensor slice it binds (Q40 matrices
    are copied into its memory; the root reads F32 tensors such as the embedding in place from
    the file's pages, which this counts too), its KV cache and the runtime. `peak` is more on a
    worker that receives its slice (no cached copy): the received buffer and the copies bound
    from it live side by side until its model is built (cluster/worker.py, Worker.build).
    """

    weights: int
    kv_cache: int
    runtime: int = RUNTIME_MARGIN_BYTES
    receive_buffer: int = 0
    # the forward pass's buffers when counted (a worker sizing a root's session); else the
    # runtime margin covers them (128-token batches)
    activations: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.runtime

    @property
    def peak(self) -> int:
        return self.total + self.receive_buffer


def read_header(data: bytes, where: str, file_size: int | None = None) -> ModelHeader:
    """The first bytes of a .m file (at least the whole header; HEADER_PROBE_BYTES always do) and
    its size in bytes when known; a file size other than the header's layout implies is an error."""
    config, hsize = parse_header(data, where, file_size)
    expected = model_file_size(config, hsize)
    if file_size is not None and file_size != expected:
        kind = "short" if file_size < expected else "long"
        raise ModelFileError(f"{where}: file is {kind}: expected {expected} bytes, file has {file_size} "
                             "(check the download or the header)")
    return ModelHeader(config, hsize, expected)


def model_file_size(config: ModelConfig, hsize: int) -> int:
    """The size of a .m file with this header: the header, then every tensor, unpadded."""
    return hsize + layout_nbytes(config)


def max_seq_len_of(config: ModelConfig, max_seq_len: int | None) -> int:
    """The positions the KV cache holds: as dllama.engine.Engine caps --max-seq-len."""
    return min(max_seq_len or config.seq_len, config.seq_len)


def node_footprints(header: ModelHeader, weights: Sequence[float], max_seq_len: int | None, sequences: int = 1,
                    kv_cache_type: str = "f32") -> list[NodeFootprint]:
    """Every node's footprint, node 0 the root, for nodes with these weights (HOST:PORT@W), a KV
    cache of `sequences` sequences (dllama-api --parallel)."""
    config = header.config
    layout = _table(config, header.header_size)
    positions = max_seq_len_of(config, max_seq_len)
    out = []
    for i, node in enumerate(plan_slices(config, weights)):
        held = sum(t.nbytes for t in node_tensors(layout, node))
        out.append(NodeFootprint(held, kv_cache_bytes(config, node, positions, sequences, kv_cache_type),
                                 receive_buffer=held if i else 0))
    return out


def _table(config: ModelConfig, start: int) -> SimpleNamespace:
    """What node_tensors reads of a ModelFile (its config and tensor table), without a file."""
    return SimpleNamespace(config=config, tensors=_layout_infos(config, start))


def node_slices(config: ModelConfig, node: NodeSlice) -> list[TensorSlice]:
    """Every tensor slice a node binds, in file order, without a file (placed as if the tensors
    began at byte 0)."""
    return list(node_tensors(_table(config, 0), node))


def node_manifest(config: ModelConfig, node: NodeSlice) -> list[tuple[str, int, int, int]]:
    """(name, float type, rows, cols) of every tensor slice a node binds, in file order: what a
    root announces in its CONFIG frame, and so what a worker accepts."""
    return [(t.name, int(t.type), t.rows, t.cols) for t in node_slices(config, node)]


def kv_cache_bytes(config: ModelConfig, node: NodeSlice, positions: int, sequences: int = 1,
                   kv_cache_type: str = "f32") -> int:
    """Keys and values of the node's kv heads, every layer, `positions` tokens of each of
    `sequences` sequences."""
    kv_dim = (node.kv_heads[1] - node.kv_heads[0]) * config.head_dim
    return 2 * config.n_layers * sequences * positions * kv_dim * KV_BYTES[kv_cache_type]


def _q80_bytes(n: int) -> int:
    return n // BLOCK_SIZE * BLOCK_BYTES[FloatType.Q80]


def activation_bytes(config: ModelConfig, node: NodeSlice, *, max_batch: int, positions: int, nodes: int,
                     nthreads: int, sequences: int = 1) -> int:
    """The buffers the native core sizes from max_batch and max_seq_len besides the KV cache
    (native/forward.cpp, Transformer::Transformer; native/cluster.cpp, the all-reduce and the
    worker's step): a root may ask for batches of thousands of tokens, which the runtime margin
    does not cover."""
    b, dim, hd = max_batch, config.dim, config.head_dim
    q = (node.q_heads[1] - node.q_heads[0]) * hd
    kv = (node.kv_heads[1] - node.kv_heads[0]) * hd
    k = config.n_active_experts if config.is_moe else 1
    hidden = (node.moe[1] - node.moe[0]) if config.is_moe else (node.ffn[1] - node.ffn[0])
    outputs = min(b, sequences)  # rows through the final norm and the LM head at once
    floats = b * (3 * dim + 2 * q + 2 * kv + 2 * k * hidden + 2) + nthreads * positions + outputs * dim
    blocks = b * (_q80_bytes(dim) + _q80_bytes(q) + k * _q80_bytes(hidden)) + outputs * _q80_bytes(dim)
    if config.is_moe:
        floats += b * config.n_experts + 2 * b * k * dim  # router scores, expert inputs and outputs
        floats += 3 * b * k  # the routes: expert, weight, slot
    rope = 2 * positions * (hd // 2)  # cos and sin tables
    mesh = b * dim * (nodes + 1) + dim  # all-reduce: F32 rows (Q80 ones are smaller), one per node
    # a step's entries (5 numbers each) and tokens (twice: as received and aligned), its output
    # rows over the node's vocab slice and the reply built from them
    step = sequences * (5 + 2 * positions + 2 * (node.vocab[1] - node.vocab[0]))
    return F32_BYTES * (floats + rope + mesh + step) + blocks


def session_memory_bytes(session: Session, nthreads: int = 1) -> int:
    """What a worker needs at most to serve a root's session: the weights it binds, the buffer they
    arrive in (received or read from its cache; freed once bound), its KV cache for the session's
    max_seq_len, the forward pass's buffers for max_batch and the runtime. Arithmetic on the
    session's numbers only: nothing here is as large as what it sizes."""
    config, node = session.config, session.slice
    held = sum(session.sizes)
    activations = activation_bytes(config, node, max_batch=session.max_batch, positions=session.max_seq_len,
                                   nodes=session.nodes, nthreads=nthreads, sequences=session.max_sequences)
    kv_cache = kv_cache_bytes(config, node, session.max_seq_len, session.max_sequences, session.kv_cache_type)
    return NodeFootprint(held, kv_cache, receive_buffer=held,
                         activations=activations).peak


def mem_available(meminfo: str = MEMINFO) -> int | None:
    """MemAvailable of /proc/meminfo in bytes: what can be allocated without swapping; None where
    the kernel does not say."""
    try:
        with open(meminfo) as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name == "MemAvailable":
                    value, *unit = rest.split()
                    return int(value) * (1024 if unit == ["kB"] else 1)
    except (OSError, ValueError):
        pass
    return None


def cgroup_available(root: str = "/sys/fs/cgroup", cgroup: str = "/proc/self/cgroup") -> int | None:
    """What this process's cgroup may still take under its memory.max (systemd's MemoryMax=), or
    None when it has no limit (or no cgroup v2)."""
    try:
        with open(cgroup) as f:
            path = next((line.split("::", 1)[1].strip() for line in f if line.startswith("0::")), None)
        if path is None:
            return None
        limit = Path(root + path, "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int(Path(root + path, "memory.current").read_text()))
    except (OSError, ValueError):
        return None


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def memory_refusal(needed: int, max_memory: int | None) -> str | None:
    """Why a node must not take on `needed` bytes (one line naming both numbers), or None: more
    than --max-memory allows, or more than the kernel has available now."""
    if max_memory is not None and needed > max_memory:
        return f"this session needs {_mib(needed)} of memory, above this node's --max-memory of {_mib(max_memory)}"
    for available, source in ((mem_available(), "MemAvailable"), (cgroup_available(), "the service's MemoryMax")):
        if available is not None and needed > available:
            return f"this session needs {_mib(needed)} of memory but only {_mib(available)} is available ({source})"
    return None


_BYTES = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str) -> int:
    """A size as people write it: "6G", "512M", "1.5GiB", "1048576" (binary units: G = 2**30).
    ValueError for anything else or for zero."""
    m = _BYTES.fullmatch(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a size (a number with an optional K, M, G or T suffix, e.g. 6G)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise ValueError(f"{text!r}: a size must be positive")
    return n
