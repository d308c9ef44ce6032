"""What a model costs each node of a cluster: its share of the weights and its KV cache, and the
model file's size, read from the header alone.

Nothing here imports numpy or the native core: ansible/filter_plugins/preflight.py imports it on
an operator's controller that has only Ansible, to check the boards' memory before provisioning.
The rules are the engine's own (the header and layout of model_file.py, the split of plan.py, the
tensors each node binds from slices.py), so the estimate follows any change to them.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace

from ..config import ModelConfig
from ..model_file import (MAX_HEADER_PAIRS, ModelFileError, _layout_infos, header_size, parse_header,
                          tensor_layout)
from .plan import plan_slices
from .slices import node_tensors

# Bytes that always hold a whole header (what an HTTP Range request of a model's URL asks for).
HEADER_PROBE_BYTES = header_size(MAX_HEADER_PAIRS)
# The KV cache holds float32 keys and values (native/forward.cpp: key_cache_, value_cache_).
KV_BYTES = 4
# What a node needs besides weights and KV cache: the Python interpreter with numpy and the
# native core (~35 MiB RSS on x86_64), the forward pass's activation buffers (a few MiB at
# 128-token batches), the API server's modules on the root.
RUNTIME_MARGIN_BYTES = 150 << 20


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

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.runtime

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
    return hsize + sum(t.nbytes for t in tensor_layout(config))


def max_seq_len_of(config: ModelConfig, max_seq_len: int | None) -> int:
    """The positions the KV cache holds: as dllama.engine.Engine caps --max-seq-len."""
    return min(max_seq_len or config.seq_len, config.seq_len)


def node_footprints(header: ModelHeader, weights: Sequence[float], max_seq_len: int | None
                    ) -> list[NodeFootprint]:
    """Every node's footprint, node 0 the root, for nodes with these weights (HOST:PORT@W)."""
    config = header.config
    layout = SimpleNamespace(config=config, tensors=_layout_infos(config, header.header_size))
    positions = max_seq_len_of(config, max_seq_len)
    out = []
    for i, node in enumerate(plan_slices(config, weights)):
        held = sum(t.nbytes for t in node_tensors(layout, node))
        kv_dim = (node.kv_heads[1] - node.kv_heads[0]) * config.head_dim
        out.append(NodeFootprint(held, 2 * config.n_layers * positions * kv_dim * KV_BYTES,
                                 receive_buffer=held if i else 0))
    return out
