"""A node's weights: which rows and columns of every tensor of a .m file its slice covers."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ..config import FloatType, row_bytes
from ..model_file import ModelFile
from ..tensors import Kind, held_part
from .plan import NodeSlice


@dataclass(frozen=True)
class TensorSlice:
    """The part of one tensor a node holds, and which weight of the model it is."""

    name: str
    type: FloatType
    rows: int
    cols: int
    offset: int  # byte offset of the slice's first row in the model file
    row_stride: int  # bytes between its rows in the file (wider than a row for a column slice)
    kind: Kind
    layer: int | None
    expert: int | None

    @property
    def row_bytes(self) -> int:
        return row_bytes(self.type, self.cols)

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes


def node_tensors(model: ModelFile, node: NodeSlice) -> Iterator[TensorSlice]:
    """Every tensor the node needs, in file order, as a place in the model file (the parts the
    table in dllama.tensors gives it)."""
    for info in model.tensors.values():
        (r0, r1), (c0, c1) = held_part(info.kind, model.config, node)
        stride = info.nbytes // (info.shape[0] if len(info.shape) == 2 else 1)
        yield TensorSlice(info.name, info.type, r1 - r0, c1 - c0, info.offset + r0 * stride + row_bytes(info.type, c0),
                          stride, info.kind, info.layer, info.expert)


def slice_bytes(model: ModelFile, t: TensorSlice) -> memoryview:
    """The slice as one contiguous buffer (a view into the file when its rows are whole)."""
    import numpy as np  # here only: dllama.cluster.footprint imports this module without numpy

    if t.row_stride == t.row_bytes:
        return model.buffer[t.offset:t.offset + t.nbytes]
    rows = np.ndarray((t.rows, t.row_bytes), dtype=np.uint8, buffer=model.buffer, offset=t.offset,
                      strides=(t.row_stride, 1))
    return memoryview(np.ascontiguousarray(rows)).cast("B")
