"""Random-weight Hugging Face checkpoints (and .m files) for tests and benchmarks.

    python -m dllama.testing.checkpoint OUT_DIR --preset tiny --arch qwen3_moe --dtype bf16
    python -m dllama.testing.checkpoint OUT.m --format m --preset bench --layers 8 --weights q40

Weights are normal(0, 0.02) float32 from numpy's seeded Generator, norms 1.0. Each tensor's values
depend only on (seed, its Hugging Face name): they are drawn in blocks of 2**17 values, block b
from `default_rng([seed, crc32(name), b])`. So a checkpoint and a .m file made with the same
arguments hold the same weights, whatever order or chunking wrote them: with dtype f32,
`convert(make_checkpoint(...))` and `make_model_file(...)` give identical bytes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Arch, ModelConfig
from ..convert import config_from_hf, hf_header_keys, hf_tensor_name, llama_permute
from ..model_file import ModelWriter, tensor_layout

STD = 0.02
BLOCK = 1 << 17  # values per independently seeded block (small: many threads per tensor)
_PREFETCH_VALUES = 1 << 24  # make_model_file generates tensors up to this size ahead, in threads
ARCHS = ("qwen3_moe", "qwen3", "llama")
DTYPES = {"f32": ("F32", "float32", 4), "bf16": ("BF16", "bfloat16", 2), "f16": ("F16", "float16", 2)}

# Shapes per preset. `bench` is one Qwen3-30B-A3B layer shape (48 layers in the release).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                 intermediate_size=128, num_hidden_layers=2, vocab_size=151936,
                 max_position_embeddings=4096),
    "bench": dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                  num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                  intermediate_size=6144, num_hidden_layers=8, vocab_size=151936,
                  max_position_embeddings=40960),
    # bench's residual width (so the same all-reduce payloads), everything else as small as 8
    # nodes can split: the cluster's sync with next to no compute (make bench-cluster)
    "sync": dict(hidden_size=2048, num_attention_heads=8, num_key_value_heads=8, head_dim=32,
                 num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
                 intermediate_size=256, num_hidden_layers=8, vocab_size=4096,
                 max_position_embeddings=40960),
}
# Llama 3 defaults: head_dim = hidden_size / heads in the tiny preset, rope scaling on request.
LLAMA3_ROPE_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}
QWEN3_BOS, QWEN3_EOS = 151643, 151645


def hf_config(preset: str = "tiny", arch: str = "qwen3_moe", layers: int | None = None,
              dtype: str = "f32", tie: bool = False, kv_heads: int | None = None,
              head_dim: int | None = None, rope_scaling: bool = False,
              config_style: str = "release") -> dict[str, Any]:
    """The config.json of a preset, in the style of the real releases or of transformers 5."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r} (choose from {', '.join(ARCHS)})")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    if config_style not in ("release", "transformers5"):
        raise ValueError(f"unknown config style {config_style!r} (release or transformers5)")
    if rope_scaling and arch != "llama":
        raise ValueError("--rope-scaling is for llama only (Qwen3 releases use plain RoPE)")
    p = dict(PRESETS[preset])
    if layers is not None:
        p["num_hidden_layers"] = layers
    if kv_heads is not None:
        p["num_key_value_heads"] = kv_heads
    if arch == "llama" and preset == "tiny":
        p["head_dim"] = p["hidden_size"] // p["num_attention_heads"]
    if head_dim is not None:
        p["head_dim"] = head_dim
    llama = arch == "llama"
    theta = 500000.0 if llama else 1000000.0
    scaling = None
    if rope_scaling:  # original_max_position_embeddings must stay below max_position_embeddings
        orig = min(8192, p["max_position_embeddings"] // 2)
        scaling = {**LLAMA3_ROPE_SCALING, "original_max_position_embeddings": orig}
    t5 = config_style == "transformers5"

    cfg: dict[str, Any] = {
        "architectures": [{"qwen3_moe": "Qwen3MoeForCausalLM", "qwen3": "Qwen3ForCausalLM",
                           "llama": "LlamaForCausalLM"}[arch]],
        "model_type": arch,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": QWEN3_BOS,
        "eos_token_id": QWEN3_EOS,
        "hidden_act": "silu",
        "hidden_size": p["hidden_size"],
        "head_dim": p["head_dim"],
        "initializer_range": 0.02,
        "intermediate_size": p["intermediate_size"],
        "max_position_embeddings": p["max_position_embeddings"],
        "num_attention_heads": p["num_attention_heads"],
        "num_hidden_layers": p["num_hidden_layers"],
        "num_key_value_heads": p["num_key_value_heads"],
        "rms_norm_eps": 1e-5 if llama else 1e-6,
        "tie_word_embeddings": tie,
        "use_cache": True,
        "vocab_size": p["vocab_size"],
    }
    if llama:
        cfg.update(mlp_bias=False, pretraining_tp=1)
    else:
        cfg.update(sliding_window=None, use_sliding_window=False,
                   max_window_layers=p["num_hidden_layers"])
    if arch == "qwen3_moe":
        cfg.update(decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                   moe_intermediate_size=p["moe_intermediate_size"],
                   num_experts_per_tok=p["num_experts_per_tok"], output_router_logits=False,
                   router_aux_loss_coef=0.001)
        cfg["num_local_experts" if t5 else "num_experts"] = p["num_experts"]
    if t5:
        cfg["dtype"] = DTYPES[dtype][1]
        cfg["rope_parameters"] = {"rope_theta": theta, "rope_type": "default", **(scaling or {})}
        cfg["transformers_version"] = "5.24.0"
        cfg["pad_token_id"] = None
        if arch == "qwen3":
            cfg["layer_types"] = ["full_attention"] * p["num_hidden_layers"]
    else:
        cfg["torch_dtype"] = DTYPES[dtype][1]
        cfg["rope_theta"] = theta
        cfg["rope_scaling"] = scaling
        cfg["transformers_version"] = "4.51.0"
    return dict(sorted(cfg.items()))


class RandomTensor:
    """normal(0, STD) float32 values of one named tensor, readable by row slices in any order."""

    def __init__(self, seed: int, name: str, shape: tuple[int, ...], pool: ThreadPoolExecutor | None = None):
        self.seed, self.key = seed, zlib.crc32(name.encode())
        self.shape = tuple(shape)
        self.dtype = np.dtype(np.float32)
        self.size = math.prod(self.shape)
        self._cols = math.prod(self.shape[1:])
        self._pool = pool

    def flat(self, start: int, stop: int) -> np.ndarray:
        out = np.empty(stop - start, dtype=np.float32)
        blocks = range(start // BLOCK, (stop - 1) // BLOCK + 1) if stop > start else range(0)

        def fill(b: int) -> None:
            b0, b1 = b * BLOCK, min(self.size, (b + 1) * BLOCK)
            lo, hi = max(start, b0), min(stop, b1)
            rng = np.random.default_rng([self.seed, self.key, b])
            if lo == b0 and hi == b1:
                dst = out[lo - start : hi - start]
                rng.standard_normal(out=dst, dtype=np.float32)
                dst *= np.float32(STD)
            else:
                blk = rng.standard_normal(b1 - b0, dtype=np.float32)
                blk *= np.float32(STD)
                out[lo - start : hi - start] = blk[lo - b0 : hi - b0]

        if self._pool is not None and len(blocks) > 1:
            list(self._pool.map(fill, blocks))
        else:
            for b in blocks:
                fill(b)
        return out

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("RandomTensor supports row slices only")
        r0, r1, _ = index.indices(self.shape[0])
        r1 = max(r0, r1)
        return self.flat(r0 * self._cols, r1 * self._cols).reshape((r1 - r0, *self.shape[1:]))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self.flat(0, self.size).reshape(self.shape)
        return a if dtype is None else a.astype(dtype, copy=False)


class Ones:
    """A norm weight: all 1.0."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape, self.dtype = tuple(shape), np.dtype(np.float32)

    def __getitem__(self, index: Any) -> np.ndarray:
        return np.ones(self.shape, dtype=np.float32)[index]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.ones(self.shape, dtype=dtype or np.float32)


def _is_norm(name: str) -> bool:
    return name.endswith(("norm.weight", "layernorm.weight"))


def _hf_tensors(config: ModelConfig, tie: bool) -> list[tuple[str, tuple[int, ...]]]:
    """(Hugging Face name, shape) of every tensor of the checkpoint, in .m order (per-expert)."""
    out = []
    for spec in tensor_layout(config):
        if spec.name == "lm_head" and tie:
            continue
        out.append((hf_tensor_name(spec.name), spec.shape))
    return out


def _source(seed: int, name: str, shape: tuple[int, ...], pool: ThreadPoolExecutor | None) -> Any:
    return Ones(shape) if _is_norm(name) else RandomTensor(seed, name, shape, pool)


def _encode(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "f32":
        return np.ascontiguousarray(values, dtype="<f4")
    if dtype == "f16":
        return values.astype("<f2")
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)  # bf16, round to nearest even
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype("<u2")


def _write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: str,
                       seed: int, pool: ThreadPoolExecutor | None) -> int:
    """Stream one safetensors file: header (8-byte LE length + JSON padded to 8), then the data."""
    st_dtype, _, itemsize = DTYPES[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        n = math.prod(shape) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, shape in tensors:
                src = _source(seed, name, shape, pool)
                cols = math.prod(shape[1:])
                step = max(1, (1 << 23) // max(cols, 1))
                for r in range(0, shape[0], step):
                    f.write(memoryview(_encode(src[r : r + step], dtype)).cast("B"))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return offset


def _split(tensors: list[tuple[str, tuple[int, ...]]], shards: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split the tensor list into `shards` contiguous, non-empty groups of about equal bytes."""
    shards = min(shards, len(tensors))
    sizes = [math.prod(s) for _, s in tensors]
    target = sum(sizes) / shards
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    acc = 0
    for i, (t, n) in enumerate(zip(tensors, sizes)):
        left = len(tensors) - i  # tensors not yet placed, this one included
        if groups[-1] and len(groups) < shards and (acc >= target * len(groups) or left <= shards - len(groups)):
            groups.append([])
        groups[-1].append(t)
        acc += n
    return groups


def make_checkpoint(out_dir: str | os.PathLike, preset: str = "tiny", arch: str = "qwen3_moe",
                    layers: int | None = None, seed: int = 0, dtype: str = "f32",
                    tie: bool = False, shards: int = 1, kv_heads: int | None = None,
                    head_dim: int | None = None, rope_scaling: bool = False,
                    config_style: str = "release", tokenizer: bool = True) -> Path:
    """Write a random-weight Hugging Face checkpoint into `out_dir`; returns it as a Path.

    config.json (release or transformers5 style), model.safetensors (or `shards` files plus
    model.safetensors.index.json) with per-expert tensor names as the Qwen3 releases store them,
    and the Qwen3 tokenizer files unless `tokenizer=False`.
    """
    cfg = hf_config(preset, arch, layers, dtype, tie, kv_heads, head_dim, rope_scaling, config_style)
    config = config_from_hf(cfg, "f32")
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = _hf_tensors(config, tie)
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        if shards == 1:
            _write_safetensors(out / "model.safetensors", tensors, dtype, seed, pool)
        else:
            groups = _split(tensors, shards)
            weight_map, total = {}, 0
            for k, group in enumerate(groups, 1):
                fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
                total += _write_safetensors(out / fname, group, dtype, seed, pool)
                weight_map.update({name: fname for name, _ in group})
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if tokenizer:
        from . import TOKENIZER_FILES, qwen3_tokenizer_dir

        src = qwen3_tokenizer_dir()
        for f in TOKENIZER_FILES:
            shutil.copyfile(src / f, out / f)
    return out


def make_model_file(out_path: str | os.PathLike, preset: str = "bench", arch: str = "qwen3_moe",
                    layers: int | None = None, seed: int = 0, weights: str = "q40",
                    tie: bool = False, kv_heads: int | None = None, head_dim: int | None = None,
                    rope_scaling: bool = False, progress: bool = False) -> Path:
    """Write the .m file `convert(make_checkpoint(..., dtype="f32"), weights=...)` would give,
    straight from the generator (no Hugging Face files; memory stays at a few chunks)."""
    from ..progress import byte_bar

    cfg = hf_config(preset, arch, layers, "f32", tie, kv_heads, head_dim, rope_scaling)
    config = config_from_hf(cfg, weights)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = ModelWriter(out, config, hf_header_keys(cfg, config))
    layout = writer.layout
    names = [hf_tensor_name("embed_tokens" if t.name == "lm_head" and tie else t.name) for t in layout]
    workers = os.cpu_count() or 1
    # Small tensors (experts, attention) are generated a few ahead, one per worker thread, while
    # the main thread quantizes and writes; large ones (embedding, LM head) are generated in
    # row chunks, each chunk's blocks spread over the workers.
    ahead: dict[int, Any] = {}
    with ThreadPoolExecutor(workers) as pool, writer, byte_bar(writer.size, f"generate {out.name}",
                                                               enabled=progress) as bar:
        for i, spec in enumerate(layout):
            for j in range(i, min(len(layout), i + 2 * workers)):
                t = layout[j]
                if j not in ahead and not _is_norm(names[j]) and math.prod(t.shape) <= _PREFETCH_VALUES:
                    ahead[j] = pool.submit(np.asarray, RandomTensor(seed, names[j], t.shape))
            src = ahead.pop(i).result() if i in ahead else _source(seed, names[i], spec.shape, pool)
            if config.arch == Arch.LLAMA and spec.name.endswith((".q_proj", ".k_proj")):
                n = config.n_heads if spec.name.endswith(".q_proj") else config.n_kv_heads
                src = llama_permute(np.asarray(src), n)
            writer.write(spec.name, src)
            bar.update(spec.nbytes)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dllama.testing.checkpoint",
                                 description="Write a random-weight Hugging Face checkpoint (or .m file).")
    ap.add_argument("out", type=Path, help="output directory (or .m file with --format m)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--arch", choices=ARCHS, default="qwen3_moe")
    ap.add_argument("--layers", type=int, help="number of layers (tiny: 2, bench: 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f32", help="safetensors dtype (default f32)")
    ap.add_argument("--tie", action="store_true", help="tie lm_head to the embedding (no lm_head.weight)")
    ap.add_argument("--shards", type=int, default=1, help="number of safetensors shards")
    ap.add_argument("--kv-heads", type=int, help="override num_key_value_heads")
    ap.add_argument("--head-dim", type=int, help="override head_dim")
    ap.add_argument("--rope-scaling", action="store_true", help="llama3 rope scaling (llama only)")
    ap.add_argument("--config-style", choices=("release", "transformers5"), default="release")
    ap.add_argument("--format", choices=("hf", "m"), default="hf",
                    help="hf: checkpoint directory; m: a .m file written directly")
    ap.add_argument("--weights", choices=("q40", "f32"), default="q40", help="with --format m")
    a = ap.parse_args(argv)
    start = time.monotonic()
    try:
        if a.format == "m":
            out = make_model_file(a.out, a.preset, a.arch, a.layers, a.seed, a.weights, a.tie,
                                  a.kv_heads, a.head_dim, a.rope_scaling, progress=True)
            size = out.stat().st_size
        else:
            out = make_checkpoint(a.out, a.preset, a.arch, a.layers, a.seed, a.dtype, a.tie,
                                  a.shards, a.kv_heads, a.head_dim, a.rope_scaling, a.config_style)
            size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {size / 2**20:.1f} MiB in {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
