"""A node's weights: which rows and columns of every tensor of a .m file its slice covers."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ..config import FloatType, row_bytes
from ..model_file import ModelFile
from .plan import NodeSlice


@dataclass(frozen=True)
class TensorSlice:
    name: str
    type: FloatType
    rows: int
    cols: int
    offset: int  # byte offset of the slice's first row in the model file
    row_stride: int  # bytes between its rows in the file (wider than a row for a column slice)

    @property
    def row_bytes(self) -> int:
        return row_bytes(self.type, self.cols)

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes


def _part(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def node_tensors(model: ModelFile, node: NodeSlice) -> Iterator[TensorSlice]:
    """Every tensor the node needs, in file order, as a place in the model file."""
    c = model.config
    hd = c.head_dim
    rows_of = {
        "q_proj": (node.q_heads[0] * hd, node.q_heads[1] * hd),
        "k_proj": (node.kv_heads[0] * hd, node.kv_heads[1] * hd),
        "v_proj": (node.kv_heads[0] * hd, node.kv_heads[1] * hd),
        "lm_head": node.vocab,
    }
    cols_of = {"o_proj": (node.q_heads[0] * hd, node.q_heads[1] * hd)}
    hidden = node.moe if c.is_moe else node.ffn
    rows_of["gate_proj"] = rows_of["up_proj"] = hidden
    cols_of["down_proj"] = hidden
    for info in model.tensors.values():
        shape = info.shape if len(info.shape) == 2 else (1, info.shape[0])
        stride = info.nbytes // shape[0]
        part = _part(info.name)
        r0, r1 = rows_of.get(part, (0, shape[0]))
        c0, c1 = cols_of.get(part, (0, shape[1]))
        yield TensorSlice(info.name, info.type, r1 - r0, c1 - c0,
                          info.offset + r0 * stride + row_bytes(info.type, c0), stride)


def slice_bytes(model: ModelFile, t: TensorSlice) -> memoryview:
    """The slice as one contiguous buffer (a view into the file when its rows are whole)."""
    import numpy as np  # here only: dllama.cluster.footprint imports this module without numpy

    if t.row_stride == t.row_bytes:
        return model.buffer[t.offset:t.offset + t.nbytes]
    rows = np.ndarray((t.rows, t.row_bytes), dtype=np.uint8, buffer=model.buffer, offset=t.offset,
                      strides=(t.row_stride, 1))
    return memoryview(np.ascontiguousarray(rows)).cast("B")
