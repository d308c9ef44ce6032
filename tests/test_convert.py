"""The Hugging Face converter and the random checkpoint generator, on tiny checkpoints."""
from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dllama import _core
from dllama.config import Arch, FloatType, RopeType
from dllama.convert import ConvertError, convert, hf_tensor_name, llama_permute, main
from dllama.model_file import ModelFile, tensor_layout
from dllama.testing import TOKENIZER_FILES, qwen3_tokenizer_dir
from dllama.testing.checkpoint import RandomTensor, make_checkpoint, make_model_file
from dllama.testing.checkpoint import main as checkpoint_main


def dequantize_q40(blocks: np.ndarray, n: int) -> np.ndarray:
    """numpy reference: [rows, n/32*18] uint8 -> [rows, n] float32 (FORMATS.md)."""
    b = blocks.reshape(blocks.shape[0], n // 32, 18)
    d = b[..., :2].copy().view("<f2").astype(np.float32)
    qs = b[..., 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32) - 8
    return (q * d).reshape(blocks.shape[0], n)


def assert_q40_close(deq: np.ndarray, want: np.ndarray, what: str) -> None:
    """Within one quantization step d = max|x|/8 of each block (+1% for d's fp16 rounding)."""
    blocks = want.reshape(want.shape[0], -1, 32)
    step = np.abs(blocks).max(-1, keepdims=True) / 8
    err = np.abs(deq.reshape(blocks.shape) - blocks)
    assert (err <= step * 1.01 + 1e-7).all(), f"{what}: max error {err.max()}"


def interleave_rows_reference(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta row h*hd + 2i + j comes from HF row h*hd + j*hd/2 + i, written as a plain loop."""
    hd = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for r in range(hd):
            src = r // 2 if r % 2 == 0 else hd // 2 + r // 2
            out[h * hd + r] = w[h * hd + src]
    return out


def source_tensors(hf_dir) -> dict[str, np.ndarray]:
    """All tensors of an f32/f16 checkpoint via the safetensors library (independent reader)."""
    out = {}
    index = hf_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    for f in files:
        out.update({k: v.astype(np.float32) for k, v in load_file(hf_dir / f).items()})
    return out


def read_header_pairs(path) -> dict[int, int]:
    data = path.read_bytes()[:4096]
    n = (struct.unpack_from("<i", data, 4)[0] - 8) // 8
    return dict(struct.unpack_from("<ii", data, 8 + 8 * i) for i in range(n))


def expected_m_tensor(src: dict[str, np.ndarray], name: str, arch: Arch, n_heads: int,
                      n_kv: int, tied: bool) -> np.ndarray:
    key = hf_tensor_name("embed_tokens" if name == "lm_head" and tied else name)
    w = src[key]
    if arch == Arch.LLAMA and name.endswith(".q_proj"):
        return interleave_rows_reference(w, n_heads)
    if arch == Arch.LLAMA and name.endswith(".k_proj"):
        return interleave_rows_reference(w, n_kv)
    return w


def check_f32(model, src, tied=False):
    with ModelFile.open(model) as mf:
        c = mf.config
        for spec in tensor_layout(c):
            want = expected_m_tensor(src, spec.name, c.arch, c.n_heads, c.n_kv_heads, tied)
            np.testing.assert_array_equal(mf.array(spec.name), want, err_msg=spec.name)


# -- f32 output: exact ------------------------------------------------------------------------

F32_CASES = {
    "qwen3_moe_f32": dict(arch="qwen3_moe", dtype="f32"),
    "qwen3_f16_tied": dict(arch="qwen3", dtype="f16", tie=True),
    "qwen3_head_dim_64_one_kv_head": dict(arch="qwen3", dtype="f32", head_dim=64, kv_heads=1),
    "llama_f32_rope_scaling": dict(arch="llama", dtype="f32", rope_scaling=True),
    "llama_sharded_t5_config": dict(arch="llama", dtype="f16", shards=3, config_style="transformers5"),
    "qwen3_moe_sharded_t5_config": dict(arch="qwen3_moe", dtype="f32", shards=2, config_style="transformers5"),
}


@pytest.mark.parametrize("case", sorted(F32_CASES))
def test_convert_f32_exact(tmp_path, case):
    opts = F32_CASES[case]
    hf = make_checkpoint(tmp_path / "hf", preset="tiny", seed=3, tokenizer=False, **opts)
    if opts.get("shards", 1) > 1:
        index = json.loads((hf / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) == opts["shards"]
    if opts.get("tie"):
        assert "lm_head.weight" not in source_tensors(hf)
    out = convert(hf, tmp_path / "m.m", weights="f32", progress=False)
    check_f32(out, source_tensors(hf), tied=opts.get("tie", False))


def test_header_qwen3_moe(tmp_path):
    hf = make_checkpoint(tmp_path / "hf", arch="qwen3_moe", tokenizer=False)
    out = convert(hf, tmp_path / "m.m", progress=False)
    v = read_header_pairs(out)
    assert v[0] == 0 and v[1] == 0x00ABCD02 and v[2] == 64 and v[3] == 128 and v[4] == 2
    assert v[5] == 4 and v[6] == 2 and v[7] == 8 and v[8] == 2 and v[9] == 151936 and v[10] == 4096
    assert v[11] == 1 and v[12] == 1000000 and v[13] == 2
    assert v[19] == 32 and v[20] == 6 and v[21] == 32
    assert not {14, 15, 16, 17, 18} & set(v)  # no rope scaling: no keys, as its converter


def test_header_llama_rope_scaling(tmp_path):
    hf = make_checkpoint(tmp_path / "hf", arch="llama", rope_scaling=True, tokenizer=False)
    with ModelFile.open(convert(hf, tmp_path / "m.m", weights="f32", progress=False)) as mf:
        c = mf.config
    assert c.arch == Arch.LLAMA and c.rope_type == RopeType.LLAMA3_1 and c.rope_theta == 500000
    assert (c.rope_scaling_factor, c.rope_scaling_low_freq_factor, c.rope_scaling_high_freq_factor,
            c.rope_scaling_orig_max_seq_len) == (8, 1, 4, 2048)
    assert c.head_dim == 16 and c.norm_epsilon == 5 and c.n_experts == 0


def test_header_plain_llama_and_transformers5_style(tmp_path):
    hf = make_checkpoint(tmp_path / "hf", arch="llama", config_style="transformers5", tokenizer=False)
    cfg = json.loads((hf / "config.json").read_text())
    assert "rope_parameters" in cfg and "rope_theta" not in cfg and "dtype" in cfg
    with ModelFile.open(convert(hf, tmp_path / "m.m", weights="f32", progress=False)) as mf:
        assert mf.config.rope_type == RopeType.LLAMA and mf.config.rope_theta == 500000


def test_bf16_source(tmp_path):
    """bf16 values widen exactly: converted floats have zero low halves and round the generator's values."""
    hf = make_checkpoint(tmp_path / "hf", arch="qwen3_moe", dtype="bf16", seed=5, tokenizer=False)
    raw = (hf / "model.safetensors").read_bytes()
    assert b'"BF16"' in raw[: 8 + struct.unpack_from("<Q", raw)[0]]
    out = convert(hf, tmp_path / "m.m", weights="f32", progress=False)
    with ModelFile.open(out) as mf:
        for name in ("layers.0.q_proj", "layers.1.experts.7.down_proj", "layers.0.router", "lm_head"):
            got = mf.array(name)
            assert not (got.view(np.uint32) & 0xFFFF).any(), name
            exact = np.asarray(RandomTensor(5, hf_tensor_name(name), got.shape))
            assert np.all(np.abs(got - exact) <= np.abs(exact) * 2.0**-8), name
        np.testing.assert_array_equal(mf.array("layers.1.q_norm"), np.ones(32, np.float32))


@pytest.mark.slow
def test_bf16_source_matches_torch(tmp_path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    hf = make_checkpoint(tmp_path / "hf", arch="qwen3", dtype="bf16", seed=2, tokenizer=False)
    src = {k: v.float().numpy() for k, v in st_torch.load_file(hf / "model.safetensors").items()}
    check_f32(convert(hf, tmp_path / "m.m", weights="f32", progress=False), src)
    exact = torch.from_numpy(np.asarray(RandomTensor(2, "model.layers.0.mlp.up_proj.weight", (128, 64))))
    np.testing.assert_array_equal(src["model.layers.0.mlp.up_proj.weight"], exact.bfloat16().float().numpy())


# -- q40 output -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3", "llama"])
def test_convert_q40(tmp_path, arch):
    hf = make_checkpoint(tmp_path / "hf", arch=arch, dtype="f32", seed=1, tokenizer=False)
    src = source_tensors(hf)
    out = convert(hf, tmp_path / "m.m", weights="q40", progress=False)
    with ModelFile.open(out) as mf:
        c = mf.config
        assert c.weight_type == FloatType.Q40
        for spec in tensor_layout(c):
            want = expected_m_tensor(src, spec.name, c.arch, c.n_heads, c.n_kv_heads, False)
            got = mf.array(spec.name)
            if spec.type == FloatType.F32:
                np.testing.assert_array_equal(got, want, err_msg=spec.name)
            else:
                assert_q40_close(dequantize_q40(got, spec.shape[1]), want, spec.name)
                np.testing.assert_array_equal(got, _core.quantize_q40(want), err_msg=spec.name)


# -- Llama permutation ------------------------------------------------------------------------

def test_llama_permute_matches_loop_formula():
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)
    np.testing.assert_array_equal(llama_permute(w, 4), interleave_rows_reference(w, 4))
    assert [int(r) for r in llama_permute(w, 4)[:8, 0] // 3] == [0, 4, 1, 5, 2, 6, 3, 7]


def test_llama_permute_turns_rotate_half_rope_into_interleaved_rope():
    """Rotate-half RoPE of W x equals interleaved RoPE of (permuted W) x, read through the same
    permutation: the converted rows work with Meta's interleaved RoPE."""
    rng = np.random.default_rng(0)
    n_heads, hd, dim, pos = 2, 8, 16, 7
    w = rng.standard_normal((n_heads * hd, dim))
    x = rng.standard_normal(dim)
    freqs = 10000.0 ** (-np.arange(0, hd, 2) / hd) * pos
    cos, sin = np.cos(freqs), np.sin(freqs)

    def rope_half(v):  # Hugging Face: pairs (i, i + hd/2)
        v = v.reshape(n_heads, 2, hd // 2)
        a, b = v[:, 0], v[:, 1]
        return np.stack([a * cos - b * sin, b * cos + a * sin], 1).reshape(-1)

    def rope_interleaved(v):  # Meta: pairs (2i, 2i + 1)
        v = v.reshape(n_heads, hd // 2, 2)
        a, b = v[..., 0], v[..., 1]
        return np.stack([a * cos - b * sin, b * cos + a * sin], -1).reshape(-1)

    hf = rope_half(w @ x)
    meta = rope_interleaved(llama_permute(w, n_heads) @ x)
    np.testing.assert_allclose(meta, llama_permute(hf[:, None], n_heads)[:, 0], atol=1e-12)


# -- expert layouts ---------------------------------------------------------------------------

def _fuse_experts(hf, out_dir, n_layers=2, n_experts=8):
    """The same checkpoint with experts as transformers 5 keeps them in memory (and saves them
    with save_original_format=False): gate_up_proj [E, 2H, D] (gate rows first), down_proj [E, D, H]."""
    t = load_file(hf / "model.safetensors")
    for i in range(n_layers):
        p = f"model.layers.{i}.mlp.experts."
        gate = [t.pop(f"{p}{e}.gate_proj.weight") for e in range(n_experts)]
        up = [t.pop(f"{p}{e}.up_proj.weight") for e in range(n_experts)]
        down = [t.pop(f"{p}{e}.down_proj.weight") for e in range(n_experts)]
        t[p + "gate_up_proj"] = np.stack([np.concatenate([g, u]) for g, u in zip(gate, up)])
        t[p + "down_proj"] = np.stack(down)
    out_dir.mkdir()
    save_file(t, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text((hf / "config.json").read_text())
    return out_dir


def test_fused_experts_convert_like_per_expert(tmp_path):
    hf = make_checkpoint(tmp_path / "hf", arch="qwen3_moe", dtype="f32", seed=9, tokenizer=False)
    fused = _fuse_experts(hf, tmp_path / "fused")
    a = convert(hf, tmp_path / "a.m", weights="f32", progress=False).read_bytes()
    b = convert(fused, tmp_path / "b.m", weights="f32", progress=False).read_bytes()
    assert a == b


@pytest.mark.slow
def test_transformers_save_pretrained_layouts(tmp_path):
    """transformers 5 loads our checkpoint; what it saves (per-expert by default, fused with
    save_original_format=False) converts to the same bytes as our checkpoint."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = make_checkpoint(tmp_path / "hf", arch="qwen3_moe", dtype="f32", seed=4, tokenizer=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    model.save_pretrained(tmp_path / "per_expert")
    model.save_pretrained(tmp_path / "fused", save_original_format=False)
    keys = load_file(tmp_path / "fused" / "model.safetensors").keys()
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in load_file(tmp_path / "per_expert" / "model.safetensors")
    want = convert(hf, tmp_path / "a.m", weights="f32", progress=False).read_bytes()
    for d in ("per_expert", "fused"):
        assert convert(tmp_path / d, tmp_path / f"{d}.m", weights="f32", progress=False).read_bytes() == want, d


@pytest.mark.slow
@pytest.mark.parametrize("style", ["release", "transformers5"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3", "llama"])
def test_transformers_loads_generated_checkpoint(tmp_path, arch, style):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = make_checkpoint(tmp_path / "hf", arch=arch, dtype="bf16", config_style=style, seed=6,
                         rope_scaling=arch == "llama", tokenizer=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    cfg = model.config
    assert cfg.model_type == arch and cfg.num_hidden_layers == 2
    if arch == "qwen3_moe":
        assert cfg.num_experts == 8 and cfg.norm_topk_prob is True
    theta = cfg.rope_parameters["rope_theta"]
    assert theta == (500000.0 if arch == "llama" else 1000000.0)
    q = model.state_dict()["model.layers.1.self_attn.q_proj.weight"].numpy()
    exact = torch.from_numpy(np.asarray(RandomTensor(6, "model.layers.1.self_attn.q_proj.weight", q.shape)))
    np.testing.assert_array_equal(q, exact.bfloat16().float().numpy())


# -- the generator and the direct .m writer agree ---------------------------------------------

@pytest.mark.parametrize("arch,weights", [("qwen3_moe", "q40"), ("qwen3", "f32"), ("llama", "q40")])
def test_make_model_file_equals_converted_checkpoint(tmp_path, arch, weights):
    hf = make_checkpoint(tmp_path / "hf", arch=arch, dtype="f32", seed=8, tie=arch == "qwen3", tokenizer=False)
    a = convert(hf, tmp_path / "a.m", weights=weights, progress=False).read_bytes()
    b = make_model_file(tmp_path / "b.m", preset="tiny", arch=arch, seed=8, weights=weights,
                        tie=arch == "qwen3").read_bytes()
    assert a == b


def test_random_tensor_is_independent_of_chunking():
    t = RandomTensor(1, "x", (7, 40000))  # 280000 values: three blocks
    whole = np.asarray(t)
    parts = np.concatenate([t[0:2], t[2:3], t[3:7]])
    np.testing.assert_array_equal(whole, parts)
    assert abs(float(whole.std()) - 0.02) < 0.001 and abs(float(whole.mean())) < 0.001
    assert not np.array_equal(whole, np.asarray(RandomTensor(2, "x", (7, 40000))))


def test_checkpoint_cli_and_tokenizer(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DLLAMA_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "ck"
    assert checkpoint_main([str(out), "--arch", "qwen3", "--layers", "1", "--dtype", "f16", "--seed", "2"]) == 0
    assert "wrote" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["torch_dtype"] == "float16" and cfg["rope_theta"] == 1e6
    for f in TOKENIZER_FILES:
        assert (out / f).read_bytes() == (qwen3_tokenizer_dir() / f).read_bytes()
    tok = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    assert len(tok["model"]["vocab"]) + len(tok["added_tokens"]) == 151669


def test_tokenizer_dir_decompresses_into_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DLLAMA_CACHE_DIR", str(tmp_path / "cache"))
    d = qwen3_tokenizer_dir()
    assert d.is_relative_to(tmp_path / "cache")
    assert {p.name for p in d.iterdir()} == set(TOKENIZER_FILES)
    assert json.loads((d / "tokenizer_config.json").read_text())["chat_template"]
    assert qwen3_tokenizer_dir() == d  # cached


def test_checkpoint_cli_rejects_bad_options(tmp_path, capsys):
    assert checkpoint_main([str(tmp_path / "x"), "--arch", "qwen3", "--rope-scaling"]) == 2
    assert "llama only" in capsys.readouterr().err


# -- errors: ConvertError naming the problem, no output left ----------------------------------

@pytest.fixture(scope="module")
def moe_f32(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("src") / "hf", arch="qwen3_moe", dtype="f32",
                           tokenizer=False)


def copy_checkpoint(src, dst, config=None, tensors=None):
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    if config:
        config(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    t = load_file(src / "model.safetensors")
    if tensors:
        tensors(t)
    save_file(t, dst / "model.safetensors")
    return dst


def expect_convert_error(hf, out_dir, *words):
    out_dir.mkdir(exist_ok=True)
    with pytest.raises(ConvertError) as e:
        convert(hf, out_dir / "out.m", progress=False)
    for w in words:
        assert w in str(e.value), str(e.value)
    assert list(out_dir.iterdir()) == []
    return str(e.value)


def _set(key, value):
    return lambda c: c.__setitem__(key, value)


@pytest.mark.parametrize("edit,words", [
    (_set("model_type", "mistral"), ["model_type", "mistral"]),
    (lambda c: c.pop("hidden_size"), ["hidden_size"]),
    (lambda c: c.pop("num_experts"), ["num_experts", "num_local_experts"]),
    (_set("norm_topk_prob", False), ["norm_topk_prob"]),
    (lambda c: c.pop("norm_topk_prob"), ["norm_topk_prob"]),
    (_set("mlp_only_layers", [1]), ["mlp_only_layers"]),
    (_set("decoder_sparse_step", 2), ["decoder_sparse_step"]),
    (_set("rms_norm_eps", 1e-7), ["rms_norm_eps"]),
    (_set("hidden_act", "gelu"), ["hidden_act", "gelu"]),
    (_set("rope_scaling", {"rope_type": "yarn", "factor": 4.0}), ["yarn"]),
    (_set("moe_intermediate_size", 48), ["moe_intermediate_size", "f32"]),
    (_set("attention_bias", True), ["attention_bias"]),
])
def test_config_errors(tmp_path, moe_f32, edit, words):
    hf = copy_checkpoint(moe_f32, tmp_path / "hf", config=edit)
    expect_convert_error(hf, tmp_path / "out", *words)


def test_missing_tensor(tmp_path, moe_f32):
    name = "model.layers.1.mlp.experts.5.up_proj.weight"
    hf = copy_checkpoint(moe_f32, tmp_path / "hf", tensors=lambda t: t.pop(name))
    expect_convert_error(hf, tmp_path / "out", "missing tensor", name)


def test_missing_lm_head_untied(tmp_path, moe_f32):
    hf = copy_checkpoint(moe_f32, tmp_path / "hf", tensors=lambda t: t.pop("lm_head.weight"))
    expect_convert_error(hf, tmp_path / "out", "lm_head.weight", "tie_word_embeddings")


def test_wrong_shape(tmp_path, moe_f32):
    name = "model.layers.0.self_attn.k_proj.weight"
    hf = copy_checkpoint(moe_f32, tmp_path / "hf",
                         tensors=lambda t: t.__setitem__(name, np.zeros((32, 64), np.float32)))
    expect_convert_error(hf, tmp_path / "out", name, "expected shape [64, 64]", "[32, 64]")


def test_unsupported_dtype(tmp_path, moe_f32):
    name = "model.norm.weight"
    hf = copy_checkpoint(moe_f32, tmp_path / "hf",
                         tensors=lambda t: t.__setitem__(name, np.ones(64, np.int8)))
    expect_convert_error(hf, tmp_path / "out", name, "I8")


def test_no_weights_or_config(tmp_path):
    (tmp_path / "empty").mkdir()
    expect_convert_error(tmp_path / "empty", tmp_path / "out", "config.json")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(
        json.loads((make_checkpoint(tmp_path / "c", arch="qwen3", tokenizer=False) / "config.json").read_text())))
    expect_convert_error(tmp_path / "empty", tmp_path / "out", "model.safetensors")


def test_corrupt_safetensors(tmp_path, moe_f32):
    hf = copy_checkpoint(moe_f32, tmp_path / "hf")
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[: len(data) // 2])
    expect_convert_error(hf, tmp_path / "out", "data_offsets")


def test_sharded_missing_shard_entry(tmp_path):
    hf = make_checkpoint(tmp_path / "hf", arch="llama", shards=2, tokenizer=False)
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_convert_error(hf, tmp_path / "out", "missing tensor model.layers.1.mlp.down_proj.weight")


# -- command line -----------------------------------------------------------------------------

def test_cli_success_and_progress(tmp_path, moe_f32, capsys):
    out = tmp_path / "m.m"
    assert main([str(moe_f32), "-o", str(out), "--weights", "f32"]) == 0
    cap = capsys.readouterr()
    assert f"wrote {out}" in cap.out and "MiB/s" in cap.out
    assert "100%" not in cap.err  # no bar into a captured (non-terminal) stderr: tests/test_progress.py
    with ModelFile.open(out) as mf:
        assert mf.config.weight_type == FloatType.F32


def test_cli_error(tmp_path, capsys):
    assert main([str(tmp_path), "-o", str(tmp_path / "m.m"), "--no-progress"]) == 1
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "m.m").exists()


def test_output_size_is_exact(tmp_path, moe_f32):
    out = convert(moe_f32, tmp_path / "m.m", weights="q40", progress=False)
    with ModelFile.open(out) as mf:
        c = mf.config
        assert mf.header_size == 8 + 8 * 17  # every key but the 5 of rope scaling
        assert out.stat().st_size == mf.header_size + sum(t.nbytes for t in tensor_layout(c))
        assert mf.tensors["lm_head"].nbytes == 151936 * 2 * 18
        assert math.prod(mf.array("embed_tokens").shape) == 151936 * 64


# -- byte for byte what Distributed Llama's converter writes -----------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("arch,dtype,opts,weights", [
    ("qwen3_moe", "f32", {}, "q40"), ("qwen3_moe", "bf16", {}, "q40"), ("qwen3_moe", "bf16", {}, "f32"),
    ("qwen3", "bf16", {"tie": True}, "q40"), ("qwen3", "f32", {}, "f32"),
    ("llama", "f32", {"rope_scaling": True}, "q40"), ("llama", "bf16", {}, "q40"),
])
def test_output_equals_distributed_llama_converter(tmp_path, arch, dtype, opts, weights):
    """Header keys (only those its converter writes, in its order) and every tensor byte."""
    dl_converter = pytest.importorskip("dl_converter")
    hf = make_checkpoint(tmp_path / "hf", arch=arch, dtype=dtype, seed=3, layers=1, tokenizer=False, **opts)
    ours = convert(hf, tmp_path / "m.m", weights=weights, progress=False).read_bytes()
    theirs = dl_converter.convert(hf, {"q40": 2, "f32": 0}[weights])
    hsize = struct.unpack_from("<i", theirs, 4)[0]
    assert ours[:hsize] == theirs[:hsize], (read_header_pairs(tmp_path / "m.m"), theirs[:hsize].hex())
    assert len(ours) == len(theirs)
    assert ours == theirs
    with ModelFile.open(tmp_path / "m.m") as mf:  # and we read what we write
        assert mf.header_size == hsize


def test_header_keys_follow_distributed_llama(tmp_path):
    """No rope-scaling keys without rope scaling (a factor of 0 there breaks its Llama 3 RoPE),
    no MOE_HIDDEN_DIM for a dense model, none of the keys config.json leaves out."""
    hf = make_checkpoint(tmp_path / "hf", arch="llama", tokenizer=False)
    cfg = json.loads((hf / "config.json").read_text())
    del cfg["head_dim"]
    (hf / "config.json").write_text(json.dumps(cfg))
    out = convert(hf, tmp_path / "m.m", weights="f32", progress=False)
    data = out.read_bytes()
    n = (struct.unpack_from("<i", data, 4)[0] - 8) // 8
    keys = [struct.unpack_from("<i", data, 8 + 8 * i)[0] for i in range(n)]
    assert keys == [0, 1, 11, 2, 3, 4, 5, 6, 13, 10, 9, 7, 8, 12, 20]
    with ModelFile.open(out) as mf:
        assert mf.config.head_dim == 16 and mf.config.rope_type == RopeType.LLAMA
