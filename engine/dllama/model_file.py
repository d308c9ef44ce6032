"""Distributed Llama `.m` model files: header, tensor table, memory-mapped reading, safe writing.

Layout (shared/FORMATS.md is the authority; everything little-endian):

    | int32 magic 0x0A00ABCD | int32 headerSize | (int32 key, int32 value) * n | tensors ... |
      headerSize = 8 + 8 * n, so tensors start at byte headerSize; no padding between tensors.

Tensors come in the fixed order `tensor_layout()` returns (dllama.tensors, the one table of them).
Matrices are stored in the header's WEIGHT_FLOAT_TYPE (F32 or Q40 here), vectors, the embedding
and the MoE router always in F32.
"""
from __future__ import annotations

import hashlib
import math
import mmap
import os
import stat
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import BLOCK_SIZE, Arch, FloatType, HiddenAct, ModelConfig, RopeType, row_bytes
from .tensors import TensorSpec, layout_nbytes, tensor_count, tensor_layout

# numpy is imported where arrays are made: headers, layouts and sizes need none (dllama.cluster.footprint
# reads them on an Ansible controller that has no numpy).
if TYPE_CHECKING:
    import numpy as np

MAGIC = 0x0A00ABCD
OLD_MAGICS = (0x00ABCD00, 0x00ABCD01)
MAX_HEADER_PAIRS = 256  # a real header has at most 22 pairs; more than this is a corrupt file

# Header keys, in FORMATS.md order: key number -> ModelConfig field.
HEADER_KEYS: dict[int, str] = {
    0: "version",
    1: "arch",
    2: "dim",
    3: "hidden_dim",
    4: "n_layers",
    5: "n_heads",
    6: "n_kv_heads",
    7: "n_experts",
    8: "n_active_experts",
    9: "vocab_size",
    10: "seq_len",
    11: "hidden_act",
    12: "rope_theta",
    13: "weight_type",
    14: "rope_scaling_factor",
    15: "rope_scaling_low_freq_factor",
    16: "rope_scaling_high_freq_factor",
    17: "rope_scaling_orig_max_seq_len",
    18: "rope_type",
    19: "head_dim",
    20: "norm_epsilon",
    21: "moe_hidden_dim",
}
KEY_NAMES: dict[int, str] = {
    0: "VERSION", 1: "ARCH_TYPE", 2: "DIM", 3: "HIDDEN_DIM", 4: "N_LAYERS", 5: "N_HEADS",
    6: "N_KV_HEADS", 7: "N_EXPERTS", 8: "N_ACTIVE_EXPERTS", 9: "VOCAB_SIZE", 10: "SEQ_LEN",
    11: "HIDDEN_ACT", 12: "ROPE_THETA", 13: "WEIGHT_FLOAT_TYPE", 14: "ROPE_SCALING_FACTOR",
    15: "ROPE_SCALING_LOW_FREQ_FACTOR", 16: "ROPE_SCALING_HIGH_FREQ_FACTOR",
    17: "ROPE_SCALING_ORIG_MAX_SEQ_LEN", 18: "ROPE_TYPE", 19: "HEAD_DIM", 20: "NORM_EPSILON",
    21: "MOE_HIDDEN_DIM",
}
# Keys a file must carry; the others default as in ModelConfig (HEAD_DIM = DIM / N_HEADS).
REQUIRED_KEYS = (1, 2, 3, 4, 5, 9, 10, 13)
SUPPORTED_WEIGHT_TYPES = (FloatType.F32, FloatType.Q40)


class ModelFileError(ValueError):
    """A .m file that cannot be read or written; the message names the file and the problem."""


@dataclass(frozen=True)
class TensorInfo(TensorSpec):
    """A tensor placed in a file: its spec plus its byte offset from the start of the file."""

    offset: int


# The keys Distributed Llama's converter (converter/convert-hf.py, loadConfig + writeHeader)
# writes, in its order: the pairs always present, then each optional group it writes only when
# the checkpoint's config.json has the field. A key left out means the reader's default.
DL_KEY_ORDER = (0, 1, 11, 2, 3, 4, 5, 6, 13, 10, 9, 7, 8, 12, 14, 15, 16, 17, 18, 19, 20, 21)
ROPE_SCALING_KEYS = (14, 15, 16, 17, 18)  # its converter writes them only with llama3 rope scaling
OPTIONAL_KEYS = (12, *ROPE_SCALING_KEYS, 19, 20, 21)


def header_keys(config: ModelConfig, absent: tuple[int, ...] = ()) -> tuple[int, ...]:
    """The keys a header for `config` holds, in Distributed Llama's order: no rope scaling keys
    unless the rope is llama3.1-scaled (no ROPE_TYPE either when it is the default, LLAMA), no
    MOE_HIDDEN_DIM for a dense model that has none, and none of `absent` (optional keys whose
    config.json field is missing, as its converter does)."""
    skip = set(absent)
    if not skip <= set(OPTIONAL_KEYS):
        raise ValueError(f"keys {sorted(skip - set(OPTIONAL_KEYS))} are always written")
    if config.rope_type != RopeType.LLAMA3_1:
        skip.update(ROPE_SCALING_KEYS[:-1])
    if config.rope_type == RopeType.LLAMA:
        skip.add(ROPE_SCALING_KEYS[-1])
    if not config.moe_hidden_dim:
        skip.add(21)
    return tuple(k for k in DL_KEY_ORDER if k not in skip)


def header_size(n_pairs: int = len(HEADER_KEYS)) -> int:
    return 8 + 8 * n_pairs


def expected_file_size(config: ModelConfig, keys: tuple[int, ...] | None = None) -> int:
    """Exact size in bytes of a .m file written for this config with these header keys."""
    return header_size(len(header_keys(config) if keys is None else keys)) + layout_nbytes(config)


def header_bytes(config: ModelConfig, keys: tuple[int, ...] | None = None) -> bytes:
    """The header as we write it: magic, headerSize, then `keys` (default: header_keys(config))."""
    pairs = []
    for key in header_keys(config) if keys is None else keys:
        value = int(getattr(config, HEADER_KEYS[key]))
        if not -(2**31) <= value < 2**31:
            raise ModelFileError(f"{KEY_NAMES[key]} = {value} does not fit the header's int32")
        pairs.append((key, value))
    data = b"".join(struct.pack("<ii", k, v) for k, v in pairs)
    return struct.pack("<ii", MAGIC, 8 + len(data)) + data


def _check_config(config: ModelConfig, where: str) -> None:
    """ModelConfig.check (the one rule for a model's shape), its complaint naming the file."""
    try:
        config.check()
    except ValueError as e:
        raise ModelFileError(f"{where}: {e}") from None


def parse_header(data: bytes | memoryview, where: str = "<header>", file_size: int | None = None
                 ) -> tuple[ModelConfig, int]:
    """Parse a .m header from the first bytes of a file; returns (config, headerSize).

    `where` names the file in error messages; `file_size`, when given, bounds headerSize.
    """
    data = memoryview(data)
    if len(data) < 8:
        raise ModelFileError(f"{where}: truncated header ({len(data)} bytes, need at least 8)")
    magic, size = struct.unpack_from("<ii", data, 0)
    magic &= 0xFFFFFFFF
    if magic in OLD_MAGICS:
        raise ModelFileError(f"{where}: unsupported old format (magic 0x{magic:08X}); "
                             "convert the model again with a current converter")
    if magic != MAGIC:
        raise ModelFileError(f"{where}: not a dllama model file (magic 0x{magic:08X})")
    if size < 8 or (size - 8) % 8 or (size - 8) // 8 > MAX_HEADER_PAIRS:
        raise ModelFileError(f"{where}: bad headerSize {size} (must be 8 + 8 * pairs, "
                             f"at most {MAX_HEADER_PAIRS} pairs)")
    if file_size is not None and size > file_size:
        raise ModelFileError(f"{where}: truncated header (headerSize {size}, file has {file_size} bytes)")
    if len(data) < size:
        raise ModelFileError(f"{where}: truncated header (headerSize {size}, got {len(data)} bytes)")
    values: dict[int, int] = {}
    for i in range((size - 8) // 8):
        key, value = struct.unpack_from("<ii", data, 8 + 8 * i)
        if key not in HEADER_KEYS:
            raise ModelFileError(f"{where}: unknown header key {key} (value {value})")
        if key in values:
            raise ModelFileError(f"{where}: header key {key} ({KEY_NAMES[key]}) appears twice")
        values[key] = value
    for key in REQUIRED_KEYS:
        if key not in values:
            raise ModelFileError(f"{where}: header has no {KEY_NAMES[key]} (key {key})")

    wt = values[13]
    if wt not in (int(t) for t in SUPPORTED_WEIGHT_TYPES):
        name = FloatType(wt).name if wt in FloatType._value2member_map_ else str(wt)
        raise ModelFileError(f"{where}: unsupported weight float type {name} "
                             "(only F32 and Q40 files are supported)")
    arch = values[1] & 0xFFFFFFFF
    if arch not in Arch._value2member_map_:
        raise ModelFileError(f"{where}: unknown ARCH_TYPE 0x{arch:08X}")
    enum_keys = {11: (HiddenAct, "HIDDEN_ACT"), 18: (RopeType, "ROPE_TYPE")}
    for key, (cls, name) in enum_keys.items():
        if key in values and values[key] not in cls._value2member_map_:
            raise ModelFileError(f"{where}: unknown {name} value {values[key]}")

    kwargs: dict[str, Any] = {HEADER_KEYS[k]: v for k, v in values.items()}
    kwargs["arch"] = arch
    kwargs.setdefault("n_kv_heads", kwargs["n_heads"])
    config = ModelConfig(**kwargs)
    _check_config(config, where)
    return config, size


def _layout_infos(config: ModelConfig, start: int) -> OrderedDict[str, TensorInfo]:
    infos: OrderedDict[str, TensorInfo] = OrderedDict()
    offset = start
    for t in tensor_layout(config):
        infos[t.name] = TensorInfo(t.name, t.shape, t.type, t.kind, t.layer, t.expert, offset)
        offset += t.nbytes
    return infos


class ModelFile:
    """A .m file opened read-only through mmap; tensors are views into the mapping, never copies.

    Use `ModelFile.open(path)` (or as a context manager). Views handed out by `tensor_bytes` and
    `array` stay valid after `close()`: the mapping is unmapped once the last view is gone.
    """

    def __init__(self, path: str | os.PathLike, mm: mmap.mmap, config: ModelConfig, hsize: int):
        self.path = Path(path)
        self._mmap: mmap.mmap | None = mm
        self.config = config
        self.header_size = hsize
        self.buffer = memoryview(mm)
        self.tensors = _layout_infos(config, hsize)
        self.size = len(mm)

    @classmethod
    def open(cls, path: str | os.PathLike) -> ModelFile:
        where = str(path)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise ModelFileError(f"{where}: cannot open ({e.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ModelFileError(f"{where}: not a regular file")
            size = st.st_size
            if size < 8:
                raise ModelFileError(f"{where}: truncated header (file has {size} bytes)")
            try:
                mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise ModelFileError(f"{where}: cannot memory-map the file ({e})") from None
        finally:
            os.close(fd)
        try:
            head = mm[: min(size, header_size(MAX_HEADER_PAIRS))]
            config, hsize = parse_header(head, where, size)
            expected = hsize + layout_nbytes(config)  # before any per-tensor table is built
            if expected != size:
                kind = "short" if size < expected else "long"
                raise ModelFileError(f"{where}: file is {kind}: expected {expected} bytes, "
                                     f"file has {size} (check the download or the header)")
        except BaseException:
            mm.close()
            raise
        return cls(path, mm, config, hsize)

    # -- access ----------------------------------------------------------------------------
    def _info(self, name: str) -> TensorInfo:
        if self._mmap is None:
            raise ModelFileError(f"{self.path}: file is closed")
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {name!r} in this model") from None

    def tensor_bytes(self, name: str) -> memoryview:
        """The tensor's raw bytes as stored (a read-only view into the mapping)."""
        t = self._info(name)
        return self.buffer[t.offset : t.offset + t.nbytes]

    def array(self, name: str) -> np.ndarray:
        """A read-only numpy view: float32 of the tensor's shape for F32, uint8 [rows, row_bytes] for Q40."""
        import numpy as np

        t = self._info(name)
        if t.type == FloatType.F32:
            n = math.prod(t.shape)
            return np.frombuffer(self.buffer, dtype="<f4", count=n, offset=t.offset).reshape(t.shape)
        rows = math.prod(t.shape[:-1])
        return np.frombuffer(self.buffer, dtype=np.uint8, count=t.nbytes, offset=t.offset).reshape(
            rows, t.nbytes // rows)

    def header(self) -> bytes:
        """The header bytes exactly as stored in the file."""
        return bytes(self.buffer[: self.header_size])

    def content_hash(self, full: bool = False) -> str:
        """A stable hex digest identifying this file's content, for caching weight slices.

        The default covers: the header bytes, the file size, the first and the last MiB of the
        file, and 1024 evenly spaced 4 KiB pages in between (about 6 MiB read whatever the model
        size, so it is fast on an SD card). Two files that differ only in bytes outside those
        samples hash alike; converted models differ nearly everywhere, so in practice they do not.
        `full=True` hashes every byte (slow for large models) and gives a different digest.
        """
        if self._mmap is None:
            raise ModelFileError(f"{self.path}: file is closed")
        h = hashlib.blake2b(digest_size=16, person=b"dllama-m-full" if full else b"dllama-m-v1")
        h.update(struct.pack("<Q", self.size))
        h.update(self.buffer[: self.header_size])
        if full:
            step = 64 << 20
            for off in range(0, self.size, step):
                h.update(self.buffer[off : off + step])
            return h.hexdigest()
        edge, page, n_pages = 1 << 20, 4096, 1024
        h.update(self.buffer[:edge])
        h.update(self.buffer[max(0, self.size - edge) :])
        span = max(0, self.size - page)
        for i in range(n_pages):
            off = span * i // (n_pages - 1)
            h.update(self.buffer[off : off + page])
        return h.hexdigest()

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        if self._mmap is None:
            return
        mm, self._mmap = self._mmap, None
        try:
            self.buffer.release()
        except BufferError:
            pass  # numpy views made from it are still alive
        try:
            mm.close()
        except BufferError:
            pass  # numpy views still use the mapping; it is unmapped when they are collected

    def __enter__(self) -> ModelFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        c = self.config
        return (f"ModelFile({str(self.path)!r}, {c.arch.name.lower()}, {c.n_layers} layers, "
                f"{c.weight_type.name}, {self.size} bytes)")


# --------------------------------------------------------------------------------------------
# writing

_CHUNK_VALUES = 1 << 23  # values per chunk when converting or quantizing (32 MiB of float32)


def _quantize_q40(x: np.ndarray) -> np.ndarray:
    import numpy as np

    from . import _core  # the native core; imported only when something is quantized

    return np.asarray(_core.quantize_q40(np.ascontiguousarray(x, dtype=np.float32)))


class ModelWriter:
    """Writes a .m file tensor by tensor, in layout order, to `path + ".tmp"`, then renames it.

        with ModelWriter("model.m", config) as w:
            for spec in w.layout:
                w.write(spec.name, array)

    `array` is a numpy array of the spec's shape (any float dtype; converted in row chunks), an
    already-quantized uint8 array [rows, row_bytes] for Q40 tensors, or any object with `.shape`,
    `.dtype` and row slicing `obj[a:b]` returning float values (read in row chunks, so a
    memory-mapped or generated source is never copied whole). On a clean exit the file is checked
    complete, fsynced and renamed into place; on any exception the temp file is deleted.
    `keys` are the header keys in file order (default `header_keys(config)`).
    """

    def __init__(self, path: str | os.PathLike, config: ModelConfig,
                 keys: tuple[int, ...] | None = None):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.config = config
        _check_config(config, str(self.path))
        self.keys = header_keys(config) if keys is None else keys
        self.layout = tensor_layout(config)
        self.size = expected_file_size(config, self.keys)
        self._next = 0
        self._file: Any = None
        self.bytes_written = 0

    def __enter__(self) -> ModelWriter:
        self._file = open(self.tmp_path, "wb")  # noqa: SIM115 - closed in __exit__
        try:
            self._put(header_bytes(self.config, self.keys))
        except BaseException:
            self._abort()
            raise
        return self

    def _put(self, data: bytes | memoryview | np.ndarray) -> None:
        mv = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        self._file.write(mv)
        self.bytes_written += len(mv)

    @property
    def next_name(self) -> str | None:
        return self.layout[self._next].name if self._next < len(self.layout) else None

    def write(self, name: str, array: Any) -> None:
        """Write the next tensor; `name` must be the one the layout expects next."""
        import numpy as np

        if self._file is None:
            raise ModelFileError(f"{self.path}: write() outside the `with ModelWriter(...)` block")
        expected = self.next_name
        if expected is None:
            raise ModelFileError(f"{self.path}: all {len(self.layout)} tensors already written, got {name!r}")
        if name != expected:
            raise ModelFileError(f"{self.path}: expected tensor {expected!r} next, got {name!r}")
        spec = self.layout[self._next]
        shape = tuple(int(s) for s in array.shape)
        dtype = np.dtype(array.dtype)
        if spec.type == FloatType.Q40 and dtype == np.uint8:
            rows = math.prod(spec.shape[:-1])
            want = (rows, row_bytes(spec.type, spec.shape[-1]))
            if shape != want:
                raise ModelFileError(f"{self.path}: tensor {name!r}: expected quantized shape "
                                     f"{list(want)}, got {list(shape)}")
            self._put(np.ascontiguousarray(array))
        else:
            if shape != spec.shape:
                raise ModelFileError(f"{self.path}: tensor {name!r}: expected shape "
                                     f"{list(spec.shape)}, got {list(shape)}")
            if dtype.kind != "f":
                raise ModelFileError(f"{self.path}: tensor {name!r}: expected float values, got {dtype}")
            self._write_floats(spec, array)
        self._next += 1

    def _write_floats(self, spec: TensorSpec, array: Any) -> None:
        import numpy as np

        if len(spec.shape) == 1:
            self._put(np.ascontiguousarray(np.asarray(array[:], dtype="<f4")))
            return
        rows, cols = spec.shape[0], math.prod(spec.shape[1:])
        step = max(1, _CHUNK_VALUES // cols)
        for r in range(0, rows, step):
            chunk = np.ascontiguousarray(np.asarray(array[r : r + step], dtype="<f4"))
            if spec.type == FloatType.Q40:
                chunk = _quantize_q40(chunk)
            self._put(chunk)

    def _abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.tmp_path.unlink(missing_ok=True)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            if self._next != len(self.layout):
                raise ModelFileError(f"{self.path}: only {self._next} of {len(self.layout)} tensors "
                                     f"written; next expected {self.next_name!r}")
            if self.bytes_written != self.size:  # a bug here, not in the caller
                raise ModelFileError(f"{self.path}: wrote {self.bytes_written} bytes, "
                                     f"expected {self.size}")
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            os.replace(self.tmp_path, self.path)
        except BaseException:
            self._abort()
            raise
        try:
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass  # some filesystems cannot fsync a directory; the file itself is synced


__all__ = [
    "MAGIC", "HEADER_KEYS", "KEY_NAMES", "ModelFileError", "TensorSpec", "TensorInfo",
    "tensor_layout", "tensor_count", "layout_nbytes", "header_keys", "header_bytes", "parse_header", "expected_file_size", "ModelFile",
    "ModelWriter", "BLOCK_SIZE",
]
