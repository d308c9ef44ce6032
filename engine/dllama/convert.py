"""Convert a Hugging Face checkpoint (Qwen3 MoE, Qwen3, Llama 3) into a Distributed Llama `.m` file.

    dllama convert HF_DIR -o MODEL.m --weights q40|f32

Reads config.json as the model releases write it (`num_experts`, `rope_theta`, `rope_scaling`,
`torch_dtype`) or as transformers 5 `save_pretrained` does (`num_local_experts`,
`rope_parameters`, `dtype`), and the weights from `model.safetensors` or the shards listed in
`model.safetensors.index.json` (F32, F16 or BF16). Experts may be stored one tensor per expert
(`mlp.experts.{e}.gate_proj.weight`, the releases and transformers 5's default) or fused
(`mlp.experts.gate_up_proj` [E, 2*H, D] with gate rows first, `mlp.experts.down_proj` [E, D, H],
transformers 5 with `save_original_format=False`). Tensors stream one at a time, read through
mmap and converted in row chunks, so memory stays far below the model's size.
"""
from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import re
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .config import Arch, FloatType, HiddenAct, ModelConfig, RopeType
from .json_file import read_json_object
from .model_file import ModelFileError, ModelWriter, header_keys, tensor_layout

ARCHS = {"qwen3_moe": Arch.QWEN3_MOE, "qwen3": Arch.QWEN3, "llama": Arch.LLAMA}
WEIGHT_TYPES = {"q40": FloatType.Q40, "f32": FloatType.F32}
_MISSING = object()


class ConvertError(ValueError):
    """A checkpoint that cannot be converted; the message names the field, tensor or file."""


# --------------------------------------------------------------------------------------------
# config.json -> ModelConfig

def load_hf_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
    try:
        return read_json_object(Path(hf_dir) / "config.json", ConvertError)
    except FileNotFoundError:
        raise ConvertError(f"{hf_dir}: no config.json (is this a Hugging Face model directory?)") from None


def _field(hf: dict[str, Any], *names: str, default: Any = _MISSING) -> Any:
    """The first of `names` present (and not null) in config.json; a missing field is an error."""
    for n in names:
        if hf.get(n) is not None:
            return hf[n]
    if default is _MISSING:
        raise ConvertError(f"config.json has no {' / '.join(repr(n) for n in names)} field")
    return default


def _integral(value: Any, name: str) -> int:
    v = float(value)
    if not v.is_integer():
        raise ConvertError(f"config.json {name} = {value} is not an integer; the .m header stores "
                           "integers only")
    return int(v)


def _rope(hf: dict[str, Any], model_type: str) -> tuple[int, RopeType, dict[str, int]]:
    """(rope_theta, rope type, llama3 scaling fields) from either config.json style."""
    params = hf.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ConvertError(f"config.json rope_parameters is not an object: {params!r}")
    params = params or {}
    if params and "rope_type" not in params and "rope_theta" not in params:
        raise ConvertError("config.json rope_parameters per layer type is not supported: "
                           f"{sorted(params)}")
    scaling = params if params else (hf.get("rope_scaling") or {})
    theta = float(_field(hf, "rope_theta", default=params.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    fields: dict[str, int] = {}
    if model_type == "llama":
        if kind == "default":
            rope_type = RopeType.LLAMA
        elif kind == "llama3":
            rope_type = RopeType.LLAMA3_1
            names = {
                "rope_scaling_factor": "factor",
                "rope_scaling_low_freq_factor": "low_freq_factor",
                "rope_scaling_high_freq_factor": "high_freq_factor",
                "rope_scaling_orig_max_seq_len": "original_max_position_embeddings",
            }
            for ours, theirs in names.items():
                if scaling.get(theirs) is None:
                    raise ConvertError(f"config.json llama3 rope scaling has no {theirs!r} field")
                fields[ours] = _integral(scaling[theirs], f"rope scaling {theirs}")
        else:
            raise ConvertError(f"config.json rope scaling type {kind!r} is not supported "
                               "(llama: default or llama3)")
    else:
        if kind != "default":
            raise ConvertError(f"config.json rope scaling type {kind!r} is not supported for "
                               f"{model_type} (only unscaled RoPE)")
        # Distributed Llama's converter writes no ROPE_TYPE without rope scaling, so the file says
        # the default (LLAMA); Qwen3 rotates halves whatever it says (effective_rope_type).
        rope_type = RopeType.LLAMA
    return int(theta), rope_type, fields


def _norm_epsilon(eps: Any) -> int:
    eps = float(eps)
    if eps > 0:
        n = round(-math.log10(eps))
        if n in (5, 6) and abs(10.0**-n - eps) <= 1e-3 * eps:
            return n
    raise ConvertError(f"config.json rms_norm_eps = {eps} cannot be stored: the .m header holds "
                       "1e-5 or 1e-6")


def config_from_hf(hf: dict[str, Any], weights: str | FloatType = "q40") -> ModelConfig:
    """The .m header for a Hugging Face config.json (either the release or the transformers 5 style)."""
    model_type = hf.get("model_type")
    if model_type not in ARCHS:
        raise ConvertError(f"unsupported model_type {model_type!r} (supported: {', '.join(ARCHS)})")
    if isinstance(weights, str):
        if weights.lower() not in WEIGHT_TYPES:
            raise ConvertError(f"unsupported weights {weights!r} (use q40 or f32)")
        weight_type = WEIGHT_TYPES[weights.lower()]
    else:
        weight_type = FloatType(weights)

    act = _field(hf, "hidden_act", "hidden_activation", default="silu")
    if act != "silu":
        raise ConvertError(f"config.json hidden_act {act!r} is not supported (only silu)")
    for flag in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if hf.get(flag):
            raise ConvertError(f"config.json {flag} = true is not supported")
    if any(t != "full_attention" for t in hf.get("layer_types") or []):
        raise ConvertError("config.json layer_types other than full_attention are not supported")

    dim = int(_field(hf, "hidden_size"))
    n_heads = int(_field(hf, "num_attention_heads"))
    n_kv_heads = int(_field(hf, "num_key_value_heads", default=n_heads))
    head_dim = int(_field(hf, "head_dim", default=dim // n_heads if n_heads else 0))
    theta, rope_type, scaling = _rope(hf, model_type)
    kw: dict[str, Any] = dict(
        arch=ARCHS[model_type],
        dim=dim,
        n_layers=int(_field(hf, "num_hidden_layers")),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        vocab_size=int(_field(hf, "vocab_size")),
        seq_len=int(_field(hf, "max_position_embeddings")),
        hidden_act=HiddenAct.SILU,
        rope_theta=theta,
        rope_type=rope_type,
        norm_epsilon=_norm_epsilon(_field(hf, "rms_norm_eps")),
        weight_type=weight_type,
        **scaling,
    )
    if model_type == "qwen3_moe":
        kw["hidden_dim"] = int(_field(hf, "intermediate_size", default=0))
        kw["n_experts"] = int(_field(hf, "num_experts", "num_local_experts"))
        kw["n_active_experts"] = int(_field(hf, "num_experts_per_tok"))
        kw["moe_hidden_dim"] = int(_field(hf, "moe_intermediate_size"))
        if int(_field(hf, "decoder_sparse_step", default=1)) != 1:
            raise ConvertError(f"config.json decoder_sparse_step = {hf['decoder_sparse_step']} is not "
                               "supported (every layer must be MoE: 1)")
        if hf.get("mlp_only_layers"):
            raise ConvertError(f"config.json mlp_only_layers = {hf['mlp_only_layers']} is not "
                               "supported (must be empty)")
        if hf.get("norm_topk_prob") is not True:
            raise ConvertError(f"config.json norm_topk_prob = {hf.get('norm_topk_prob')} is not "
                               "supported (the engine renormalises the top-k weights: true)")
        if not 0 < kw["n_active_experts"] <= kw["n_experts"]:
            raise ConvertError(f"config.json num_experts_per_tok = {kw['n_active_experts']} not in "
                               f"1..{kw['n_experts']}")
    else:
        kw["hidden_dim"] = int(_field(hf, "intermediate_size"))
        # unused by a dense model, but Distributed Llama's converter writes it when present
        kw["moe_hidden_dim"] = int(_field(hf, "moe_intermediate_size", default=0))

    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size"):
        if kw[name] <= 0:
            raise ConvertError(f"config.json gives {name} = {kw[name]}")
    if head_dim % 2:
        raise ConvertError(f"head_dim {head_dim} is odd; RoPE rotates pairs")
    if n_heads % n_kv_heads:
        raise ConvertError(f"num_attention_heads {n_heads} is not a multiple of "
                           f"num_key_value_heads {n_kv_heads}")
    if weight_type == FloatType.Q40:
        rows = {"hidden_size": dim, "num_attention_heads * head_dim": n_heads * head_dim}
        if model_type == "qwen3_moe":
            rows["moe_intermediate_size"] = kw["moe_hidden_dim"]
        else:
            rows["intermediate_size"] = kw["hidden_dim"]
        for name, n in rows.items():
            if n % 32:
                raise ConvertError(f"Q40 needs rows of whole 32-value blocks but {name} = {n}; "
                                   "use --weights f32")
    try:
        return ModelConfig(**kw)
    except ValueError as e:
        raise ConvertError(f"config.json: {e}") from None


def absent_header_keys(hf: dict[str, Any]) -> tuple[int, ...]:
    """The optional .m header keys whose config.json field is missing (or null): Distributed
    Llama's converter leaves those keys out, so we do too (model_file.header_keys)."""
    params = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
    sources = {12: hf.get("rope_theta", params.get("rope_theta")), 19: hf.get("head_dim"),
               20: hf.get("rms_norm_eps"), 21: hf.get("moe_intermediate_size")}
    return tuple(k for k, v in sources.items() if v is None)


def hf_header_keys(hf: dict[str, Any], config: ModelConfig) -> tuple[int, ...]:
    """The header keys, in order, Distributed Llama's converter writes for this config.json."""
    return header_keys(config, absent_header_keys(hf))


# --------------------------------------------------------------------------------------------
# names

def hf_tensor_name(name: str) -> str:
    """The Hugging Face name of a .m tensor (per-expert layout for MoE experts)."""
    if name in ("embed_tokens", "norm"):
        return f"model.{name}.weight"
    if name == "lm_head":
        return "lm_head.weight"
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if not m:
        raise KeyError(name)
    i, rest = m.groups()
    p = f"model.layers.{i}."
    if rest in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
        return f"{p}self_attn.{rest}.weight"
    if rest == "router":
        return f"{p}mlp.gate.weight"
    if rest in ("gate_proj", "down_proj", "up_proj") or rest.startswith("experts."):
        return f"{p}mlp.{rest}.weight"
    if rest in ("input_layernorm", "post_attention_layernorm"):
        return f"{p}{rest}.weight"
    raise KeyError(name)


def llama_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """q/k rows from Hugging Face's rotate-half order to Meta's interleaved order.

    Within each head of hd rows, output row 2i + j is input row j*hd/2 + i (j in 0, 1), i.e. rows
    go 0, hd/2, 1, hd/2+1, ...: the inverse of convert_llama_weights_to_hf.py's permute.
    """
    rows, cols = w.shape
    hd = rows // n_heads
    return np.ascontiguousarray(
        w.reshape(n_heads, 2, hd // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols))


# --------------------------------------------------------------------------------------------
# safetensors reading (numpy; bf16 included)

_ST_DTYPES = {"F32": ("<f4", "f32"), "F16": ("<f2", "f16"), "BF16": ("<u2", "bf16"), "F64": ("<f8", "f64")}


def to_float32(raw: np.ndarray, kind: str) -> np.ndarray:
    """Stored values (bf16 as uint16) as float32; f32 stays a view when it can."""
    if kind == "bf16":
        u = raw.astype(np.uint32)
        u <<= 16
        return u.view(np.float32)
    return np.asarray(raw, dtype=np.float32)


class Rows:
    """A tensor read row chunk by row chunk as float32 (what ModelWriter.write accepts)."""

    def __init__(self, raw: np.ndarray, kind: str):
        self.raw, self.kind = raw, kind
        self.shape = raw.shape
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, index: Any) -> np.ndarray:
        return to_float32(self.raw[index], self.kind)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = to_float32(self.raw, self.kind)
        return a if dtype is None else a.astype(dtype, copy=False)


class SafetensorsFile:
    """One .safetensors file mapped read-only: an 8-byte LE header length, a JSON header, data."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except OSError as e:
            raise ConvertError(f"{self.path}: cannot open ({e.strerror})") from None
        if size < 8 or self._mmap is None:
            raise ConvertError(f"{self.path}: not a safetensors file ({size} bytes)")
        (n,) = struct.unpack_from("<Q", self._mmap, 0)
        if n > min(size - 8, 100 << 20):
            raise ConvertError(f"{self.path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(bytes(self._mmap[8 : 8 + n]))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConvertError(f"{self.path}: bad safetensors header: {e}") from None
        header.pop("__metadata__", None)
        self.entries: dict[str, dict[str, Any]] = header
        self._data = 8 + n
        self._size = size

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def raw(self, name: str) -> tuple[np.ndarray, str]:
        """(stored values as a numpy view into the mapping, kind) where kind is f32/f16/bf16/f64."""
        e = self.entries[name]
        if e.get("dtype") not in _ST_DTYPES:
            raise ConvertError(f"{self.path}: tensor {name} has dtype {e.get('dtype')}; "
                               f"supported: {', '.join(_ST_DTYPES)}")
        np_dtype, kind = _ST_DTYPES[e["dtype"]]
        shape = tuple(int(s) for s in e["shape"])
        begin, end = (int(x) for x in e["data_offsets"])
        count = math.prod(shape)
        if end - begin != count * np.dtype(np_dtype).itemsize or self._data + end > self._size:
            raise ConvertError(f"{self.path}: tensor {name}: data_offsets {[begin, end]} do not fit "
                               f"shape {list(shape)} {e['dtype']} in a {self._size}-byte file")
        arr = np.frombuffer(self._mmap, dtype=np_dtype, count=count, offset=self._data + begin)
        return arr.reshape(shape), kind

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # views still alive; unmapped when collected
            self._mmap = None


class Checkpoint:
    """The tensors of a Hugging Face model directory: model.safetensors or an indexed set of shards."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConvertError(f"{index}: cannot read the shard index: {e!r}") from None
            self._where = {str(k): str(v) for k, v in weight_map.items()}
        elif single.is_file():
            self._where = {k: single.name for k in self._open(single.name).keys()}
        else:
            raise ConvertError(f"{self.dir}: no model.safetensors or model.safetensors.index.json")

    def _open(self, filename: str) -> SafetensorsFile:
        if filename not in self._files:
            self._files[filename] = SafetensorsFile(self.dir / filename)
        return self._files[filename]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def raw(self, name: str, shape: tuple[int, ...]) -> tuple[np.ndarray, str]:
        """The stored tensor, checked against the shape config.json implies."""
        if name not in self._where:
            raise ConvertError(f"{self.dir}: missing tensor {name}")
        f = self._open(self._where[name])
        if name not in f.entries:
            raise ConvertError(f"{f.path}: missing tensor {name} (the shard index lists it here)")
        if f.shape(name) != tuple(shape):
            raise ConvertError(f"tensor {name}: expected shape {list(shape)} from config.json, "
                               f"checkpoint has {list(f.shape(name))}")
        return f.raw(name)

    def rows(self, name: str, shape: tuple[int, ...]) -> Rows:
        return Rows(*self.raw(name, shape))

    def source_bytes(self) -> int:
        return sum((self.dir / f).stat().st_size for f in set(self._where.values()) if (self.dir / f).is_file())

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


# --------------------------------------------------------------------------------------------
# conversion

def _sources(ckpt: Checkpoint, config: ModelConfig, hf: dict[str, Any]):
    """Yield (spec, source) in .m order; source is what ModelWriter.write takes."""
    tied = bool(hf.get("tie_word_embeddings", False))
    fused: dict[int, bool] = {}
    H, D = config.moe_hidden_dim, config.dim
    for spec in tensor_layout(config):
        name = spec.name
        m = re.fullmatch(r"layers\.(\d+)\.experts\.(\d+)\.(\w+)", name)
        if m:
            i, e, kind = int(m.group(1)), int(m.group(2)), m.group(3)
            p = f"model.layers.{i}.mlp.experts."
            if i not in fused:
                fused[i] = (p + "gate_up_proj") in ckpt and (p + "0.gate_proj.weight") not in ckpt
            if fused[i]:
                if kind == "down_proj":
                    raw, k = ckpt.raw(p + "down_proj", (config.n_experts, D, H))
                    yield spec, Rows(raw[e], k)
                else:  # gate_up_proj [E, 2H, D]: forward does linear(x, w).chunk(2) -> gate, up
                    raw, k = ckpt.raw(p + "gate_up_proj", (config.n_experts, 2 * H, D))
                    yield spec, Rows(raw[e, :H] if kind == "gate_proj" else raw[e, H:], k)
                continue
        hf_name = hf_tensor_name("embed_tokens" if name == "lm_head" and tied else name)
        if name == "lm_head" and not tied and hf_name not in ckpt:
            raise ConvertError(f"{ckpt.dir}: missing tensor lm_head.weight "
                               "(and config.json does not set tie_word_embeddings)")
        src = ckpt.rows(hf_name, spec.shape)
        if config.arch == Arch.LLAMA and name.endswith((".q_proj", ".k_proj")):
            n = config.n_heads if name.endswith(".q_proj") else config.n_kv_heads
            yield spec, llama_permute(np.asarray(src), n)
        else:
            yield spec, src


def convert(hf_dir: str | os.PathLike, out_path: str | os.PathLike, weights: str = "q40",
            progress: bool = True) -> Path:
    """Convert the checkpoint in `hf_dir` to a .m file at `out_path`; returns the output path.

    Raises ConvertError naming the field, tensor or file at fault; no output is left behind then.
    """
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    hf = load_hf_config(hf_dir)
    config = config_from_hf(hf, weights)
    if out_path.is_dir():
        raise ConvertError(f"{out_path} is a directory; give the output file name")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoint(hf_dir)
    try:
        from .progress import byte_bar

        writer = ModelWriter(out_path, config, hf_header_keys(hf, config))
        with writer, byte_bar(writer.size, f"convert {out_path.name}", enabled=progress) as bar:
            bar.update(writer.bytes_written)
            for spec, src in _sources(ckpt, config, hf):
                writer.write(spec.name, src)
                bar.update(spec.nbytes)
    except ModelFileError as e:
        raise ConvertError(str(e)) from None
    finally:
        ckpt.close()
    return out_path


# --------------------------------------------------------------------------------------------
# command line: mounted by the dllama CLI as `dllama convert`

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", type=Path, help="Hugging Face model directory "
                        "(config.json + model.safetensors or sharded safetensors)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the .m file to write")
    parser.add_argument("--weights", choices=sorted(WEIGHT_TYPES), default="q40",
                        help="storage of the weight matrices (default: q40)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    start = time.monotonic()
    try:
        out = convert(args.hf_dir, args.output, weights=args.weights, progress=not args.no_progress)
    except (ConvertError, OSError) as e:
        print(f"dllama convert: error: {e}", file=sys.stderr)
        return 1
    seconds = time.monotonic() - start
    size = out.stat().st_size
    shown = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
    print(f"wrote {out}: {shown} in {seconds:.1f} s ({size / 2**20 / max(seconds, 1e-9):.0f} MiB/s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dllama convert", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
