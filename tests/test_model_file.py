"""The .m model file: header, layout, round trips, and every kind of bad file."""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from dllama.config import Arch, FloatType, ModelConfig, RopeType
from dllama.model_file import (
    MAGIC,
    ModelFile,
    ModelFileError,
    ModelWriter,
    expected_file_size,
    header_bytes,
    header_keys,
    parse_header,
    tensor_layout,
)
from q40_numpy import dequantize_q40_numpy


def tiny_config(arch: Arch, weight_type: FloatType = FloatType.F32, **kw) -> ModelConfig:
    base = dict(arch=arch, dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2,
                vocab_size=160, seq_len=256, weight_type=weight_type, norm_epsilon=6,
                rope_theta=1000000, head_dim=32 if arch != Arch.LLAMA else 0,
                rope_type=RopeType.LLAMA if arch == Arch.LLAMA else RopeType.FALCON)
    if arch == Arch.QWEN3_MOE:
        base.update(n_experts=4, n_active_experts=2, moe_hidden_dim=32)
    base.update(kw)
    return ModelConfig(**base)


def random_tensors(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t.name: rng.standard_normal(t.shape, dtype=np.float32) for t in tensor_layout(config)}


def write_model(path, config: ModelConfig, tensors: dict[str, np.ndarray]):
    with ModelWriter(path, config) as w:
        for spec in w.layout:
            w.write(spec.name, tensors[spec.name])
    return path


def assert_q40_close(deq: np.ndarray, want: np.ndarray, what: str) -> None:
    """Each value within one quantization step of its block: d = max|x| / 8, stored as fp16
    (relative error up to 2**-11, times at most 8 steps), so allow 1% over one step."""
    blocks = want.reshape(want.shape[0], -1, 32)
    step = np.abs(blocks).max(-1, keepdims=True) / 8
    err = np.abs(deq.reshape(blocks.shape) - blocks)
    assert (err <= step * 1.01 + 1e-7).all(), f"{what}: max error {err.max()} vs step {step.max()}"


@pytest.fixture(params=list(Arch), ids=lambda a: a.name.lower())
def arch(request):
    return request.param


# -- layout and header ------------------------------------------------------------------------

def test_layout_order_moe():
    c = tiny_config(Arch.QWEN3_MOE)
    names = [t.name for t in tensor_layout(c)]
    assert names[:10] == [
        "embed_tokens", "layers.0.q_proj", "layers.0.k_proj", "layers.0.v_proj", "layers.0.o_proj",
        "layers.0.router", "layers.0.experts.0.gate_proj", "layers.0.experts.0.down_proj",
        "layers.0.experts.0.up_proj", "layers.0.experts.1.gate_proj"]
    i = names.index("layers.0.experts.3.up_proj")
    assert names[i + 1 : i + 6] == ["layers.0.q_norm", "layers.0.k_norm", "layers.0.input_layernorm",
                                    "layers.0.post_attention_layernorm", "layers.1.q_proj"]
    assert names[-2:] == ["norm", "lm_head"]


def test_layout_shapes_and_types():
    c = tiny_config(Arch.QWEN3_MOE, FloatType.Q40)
    t = {s.name: s for s in tensor_layout(c)}
    assert t["embed_tokens"].shape == (160, 64) and t["embed_tokens"].type == FloatType.F32
    assert t["layers.0.q_proj"].shape == (128, 64) and t["layers.0.q_proj"].type == FloatType.Q40
    assert t["layers.0.k_proj"].shape == (64, 64)
    assert t["layers.0.o_proj"].shape == (64, 128)
    assert t["layers.0.router"].shape == (4, 64) and t["layers.0.router"].type == FloatType.F32
    assert t["layers.1.experts.2.down_proj"].shape == (64, 32)
    assert t["layers.1.experts.2.down_proj"].type == FloatType.Q40
    assert t["layers.0.q_norm"].shape == (32,) and t["layers.0.q_norm"].type == FloatType.F32
    assert t["lm_head"].type == FloatType.Q40
    assert t["layers.0.q_proj"].nbytes == 128 * 2 * 18


def test_layout_dense_llama_has_no_qk_norm():
    names = [t.name for t in tensor_layout(tiny_config(Arch.LLAMA))]
    assert "layers.0.q_norm" not in names and "layers.0.router" not in names
    assert names[5:10] == ["layers.0.gate_proj", "layers.0.down_proj", "layers.0.up_proj",
                           "layers.0.input_layernorm", "layers.0.post_attention_layernorm"]


def test_header_bytes_keys_in_distributed_llama_order():
    """Its converter's order; no rope scaling keys without llama3 scaling (a factor of 0 there
    breaks its RoPE), ROPE_TYPE only when not the default."""
    c = tiny_config(Arch.QWEN3_MOE, FloatType.Q40)
    h = header_bytes(c)
    magic, size = struct.unpack_from("<ii", h)
    assert magic == MAGIC == 0x0A00ABCD and size == len(h) == 8 + 18 * 8
    pairs = [struct.unpack_from("<ii", h, 8 + 8 * i) for i in range(18)]
    assert [k for k, _ in pairs] == [0, 1, 11, 2, 3, 4, 5, 6, 13, 10, 9, 7, 8, 12, 18, 19, 20, 21]
    v = dict(pairs)
    assert v[1] == 0x00ABCD02 and v[2] == 64 and v[7] == 4 and v[13] == 2 and v[19] == 32
    assert v[20] == 6 and v[21] == 32 and v[18] == 1 and v[11] == 1
    assert parse_header(h)[0] == c


def test_a_header_with_every_key_as_we_wrote_them_before_still_reads():
    """Files written before the header followed Distributed Llama's converter: all 22 keys, in key
    order, unused ones 0."""
    c = tiny_config(Arch.QWEN3_MOE, FloatType.Q40)
    h = header_bytes(c, tuple(range(22)))
    assert len(h) == 8 + 22 * 8
    parsed, size = parse_header(h)
    assert size == len(h) and parsed == c


def test_header_defaults_for_missing_keys():
    pairs = {1: 0x00ABCD00, 2: 64, 3: 96, 4: 1, 5: 4, 9: 160, 10: 128, 13: 0}
    h = struct.pack("<ii", MAGIC, 8 + 8 * len(pairs)) + b"".join(
        struct.pack("<ii", k, v) for k, v in sorted(pairs.items(), reverse=True))  # any key order
    c, size = parse_header(h)
    assert size == len(h)
    assert c.head_dim == 16 and c.n_kv_heads == 4 and c.norm_epsilon == 5
    assert c.rope_type == RopeType.LLAMA and c.n_experts == 0 and c.moe_hidden_dim == 0


# -- round trips ------------------------------------------------------------------------------

def test_round_trip_f32(tmp_path, arch):
    c = tiny_config(arch)
    tensors = random_tensors(c)
    path = write_model(tmp_path / "m.m", c, tensors)
    assert path.stat().st_size == expected_file_size(c)
    assert not (tmp_path / "m.m.tmp").exists()
    with ModelFile.open(path) as mf:
        assert mf.config == c
        assert list(mf.tensors) == [t.name for t in tensor_layout(c)]
        for name, want in tensors.items():
            got = mf.array(name)
            assert got.dtype == np.float32 and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
            assert bytes(mf.tensor_bytes(name)) == want.astype("<f4").tobytes()
        first = mf.tensors["embed_tokens"]
        assert first.offset == mf.header_size == 8 + 8 * len(header_keys(c))


def test_round_trip_q40(tmp_path, arch):
    c = tiny_config(arch, FloatType.Q40)
    tensors = random_tensors(c, seed=1)
    path = write_model(tmp_path / "q.m", c, tensors)
    with ModelFile.open(path) as mf:
        assert mf.config.weight_type == FloatType.Q40
        for spec in tensor_layout(c):
            got, want = mf.array(spec.name), tensors[spec.name]
            if spec.type == FloatType.F32:
                np.testing.assert_array_equal(got, want)
                continue
            assert got.dtype == np.uint8 and got.shape == (spec.shape[0], spec.shape[1] // 32 * 18)
            deq = dequantize_q40_numpy(got)
            assert_q40_close(deq, want, spec.name)


def test_writer_accepts_prequantized_q40(tmp_path):
    c = tiny_config(Arch.LLAMA, FloatType.Q40)
    rng = np.random.default_rng(2)
    raw = {}
    with ModelWriter(tmp_path / "p.m", c) as w:
        for spec in w.layout:
            if spec.type == FloatType.Q40:
                raw[spec.name] = rng.integers(0, 256, (spec.shape[0], spec.shape[1] // 32 * 18), dtype=np.uint8)
            else:
                raw[spec.name] = rng.standard_normal(spec.shape, dtype=np.float32)
            w.write(spec.name, raw[spec.name])
    with ModelFile.open(tmp_path / "p.m") as mf:
        for name, want in raw.items():
            np.testing.assert_array_equal(mf.array(name), want)


def test_writer_converts_other_float_dtypes(tmp_path):
    c = tiny_config(Arch.QWEN3)
    tensors = {k: v.astype(np.float16) for k, v in random_tensors(c).items()}
    write_model(tmp_path / "h.m", c, tensors)
    with ModelFile.open(tmp_path / "h.m") as mf:
        np.testing.assert_array_equal(mf.array("layers.1.o_proj"), tensors["layers.1.o_proj"].astype(np.float32))


# -- writer errors leave nothing behind -------------------------------------------------------

def test_writer_wrong_order_names_both(tmp_path):
    c = tiny_config(Arch.QWEN3)
    t = random_tensors(c)
    with pytest.raises(ModelFileError, match=r"expected tensor 'layers.0.q_proj' next, got 'layers.0.k_proj'"):
        with ModelWriter(tmp_path / "o.m", c) as w:
            w.write("embed_tokens", t["embed_tokens"])
            w.write("layers.0.k_proj", t["layers.0.k_proj"])
    assert list(tmp_path.iterdir()) == []


def test_writer_wrong_shape_names_tensor(tmp_path):
    c = tiny_config(Arch.QWEN3)
    with pytest.raises(ModelFileError, match=r"'embed_tokens'.*expected shape \[160, 64\], got \[64, 160\]"):
        with ModelWriter(tmp_path / "s.m", c) as w:
            w.write("embed_tokens", np.zeros((64, 160), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_writer_incomplete_file_is_removed(tmp_path):
    c = tiny_config(Arch.QWEN3)
    t = random_tensors(c)
    with pytest.raises(ModelFileError, match=r"only 1 of .* tensors written; next expected 'layers.0.q_proj'"):
        with ModelWriter(tmp_path / "i.m", c) as w:
            w.write("embed_tokens", t["embed_tokens"])
    assert list(tmp_path.iterdir()) == []


def test_writer_exception_in_caller_removes_temp(tmp_path):
    c = tiny_config(Arch.QWEN3)
    with pytest.raises(RuntimeError, match="boom"):
        with ModelWriter(tmp_path / "e.m", c) as w:
            assert w.tmp_path.exists()
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_keeps_previous_file_on_failure(tmp_path):
    c = tiny_config(Arch.QWEN3)
    (tmp_path / "keep.m").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with ModelWriter(tmp_path / "keep.m", c):
            raise RuntimeError("fail")
    assert (tmp_path / "keep.m").read_bytes() == b"old"


# -- bad files --------------------------------------------------------------------------------

@pytest.fixture
def good_file(tmp_path):
    c = tiny_config(Arch.QWEN3_MOE)
    return write_model(tmp_path / "good.m", c, random_tensors(c))


def patch(path, offset: int, fmt: str, *values) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def key_offset(path, key: int) -> int:
    h = path.read_bytes()[:4096]
    for i in range((struct.unpack_from("<i", h, 4)[0] - 8) // 8):
        if struct.unpack_from("<i", h, 8 + 8 * i)[0] == key:
            return 8 + 8 * i
    raise AssertionError(key)


def expect_error(path, *words: str) -> str:
    with pytest.raises(ModelFileError) as e:
        ModelFile.open(path)
    msg = str(e.value)
    assert str(path) in msg
    for w in words:
        assert w in msg, msg
    return msg


def test_bad_magic(good_file):
    patch(good_file, 0, "<I", 0x12345678)
    expect_error(good_file, "not a dllama model file", "0x12345678")


@pytest.mark.parametrize("magic", [0x00ABCD00, 0x00ABCD01])
def test_old_magic(good_file, magic):
    patch(good_file, 0, "<I", magic)
    expect_error(good_file, "unsupported old format")


def test_unknown_key(good_file):
    patch(good_file, key_offset(good_file, 21), "<i", 77)
    expect_error(good_file, "unknown header key 77")


@pytest.mark.parametrize("value,name", [(1, "F16"), (3, "Q80"), (9, "9")])
def test_unsupported_weight_type(good_file, value, name):
    patch(good_file, key_offset(good_file, 13) + 4, "<i", value)
    expect_error(good_file, f"unsupported weight float type {name}")


def test_unknown_arch(good_file):
    patch(good_file, key_offset(good_file, 1) + 4, "<I", 0x00ABCD09)
    expect_error(good_file, "unknown ARCH_TYPE 0x00ABCD09")


def test_short_file(good_file):
    size = good_file.stat().st_size
    os.truncate(good_file, size - 5)
    expect_error(good_file, "short", f"expected {size} bytes, file has {size - 5}")


def test_long_file(good_file):
    size = good_file.stat().st_size
    with open(good_file, "ab") as f:
        f.write(b"\0" * 3)
    expect_error(good_file, "long", f"expected {size} bytes, file has {size + 3}")


@pytest.mark.parametrize("keep", [0, 4, 7, 100])
def test_truncated_header(good_file, keep):
    os.truncate(good_file, keep)
    expect_error(good_file, "truncated header")


@pytest.mark.parametrize("size", [-8, 4, 13, 8 + 8 * 100000, 2**31 - 1])
def test_bad_header_size(good_file, size):
    patch(good_file, 4, "<i", size)
    with pytest.raises(ModelFileError, match="headerSize|truncated header"):
        ModelFile.open(good_file)


def test_header_size_larger_than_file(tmp_path):
    path = tmp_path / "h.m"
    path.write_bytes(struct.pack("<ii", MAGIC, 8 + 8 * 22) + b"\0" * 16)
    expect_error(path, "truncated header")


def test_absurd_dimensions(good_file):
    patch(good_file, key_offset(good_file, 7) + 4, "<i", 2**30)  # N_EXPERTS
    expect_error(good_file, "n_experts = 1073741824 is out of range (0..1024)")


def test_missing_required_key(tmp_path):
    pairs = {1: 0x00ABCD00, 2: 64, 3: 96, 4: 1, 5: 4, 9: 160, 10: 128}  # no WEIGHT_FLOAT_TYPE
    path = tmp_path / "k.m"
    path.write_bytes(struct.pack("<ii", MAGIC, 8 + 8 * len(pairs))
                     + b"".join(struct.pack("<ii", k, v) for k, v in pairs.items()))
    expect_error(path, "WEIGHT_FLOAT_TYPE")


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.m", "cannot open")


def test_directory_is_not_a_model(tmp_path):
    expect_error(tmp_path, "not a regular file")


def test_q40_needs_whole_blocks(tmp_path):
    c = tiny_config(Arch.LLAMA, FloatType.Q40, hidden_dim=100)
    with pytest.raises(ModelFileError, match="multiple of 32"):
        ModelWriter(tmp_path / "b.m", c)


# -- mmap -------------------------------------------------------------------------------------

def _anon_rss_bytes() -> int:
    """Anonymous resident memory: what copies cost (mapped file pages are RssFile, shared)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def test_tensors_are_views_into_the_mapping(good_file):
    with ModelFile.open(good_file) as mf:
        arr = mf.array("layers.1.experts.3.up_proj")
        assert not arr.flags.owndata and not arr.flags.writeable
        whole = np.frombuffer(mf.buffer, dtype=np.uint8)
        assert np.shares_memory(arr, whole)
        with pytest.raises((TypeError, ValueError)):
            arr[0, 0] = 1.0
        assert mf.tensor_bytes("norm").readonly


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_open_does_not_read_the_whole_file(tmp_path):
    # a 149 MiB file (F32 embedding + lm_head of 151936 x 128): opening it, reading tensors and
    # hashing it must not copy the file into this process's memory
    c = ModelConfig(arch=Arch.QWEN3, dim=128, hidden_dim=128, n_layers=1, n_heads=4, n_kv_heads=2,
                    vocab_size=151936, seq_len=64, weight_type=FloatType.F32)
    path = tmp_path / "big.m"
    ones = np.ones((151936, 128), np.float32)
    with ModelWriter(path, c) as w:
        for spec in w.layout:
            w.write(spec.name, ones if spec.shape == ones.shape else np.ones(spec.shape, np.float32))
    del ones
    size = path.stat().st_size
    assert size > 140 << 20
    before = _anon_rss_bytes()
    with ModelFile.open(path) as mf:
        norm = mf.array("norm")
        assert float(norm.sum()) == 128.0
        assert float(mf.array("lm_head")[-1].sum()) == 128.0
        assert len(mf.tensor_bytes("embed_tokens")) == 151936 * 128 * 4
        h1 = mf.content_hash()
        grown = _anon_rss_bytes() - before
        del norm
    assert grown < 16 << 20, f"RSS grew by {grown >> 20} MiB for a {size >> 20} MiB file"
    with ModelFile.open(path) as mf:
        assert mf.content_hash() == h1


def test_content_hash_is_stable_and_sensitive(tmp_path, good_file):
    with ModelFile.open(good_file) as mf:
        h = mf.content_hash()
        full = mf.content_hash(full=True)
        assert len(h) == 32 and h != full
        norm_off = mf.tensors["norm"].offset
    with ModelFile.open(good_file) as mf:
        assert mf.content_hash() == h and mf.content_hash(full=True) == full
    patch(good_file, norm_off, "<f", 42.0)  # inside the last MiB: sampled
    with ModelFile.open(good_file) as mf:
        assert mf.content_hash() != h and mf.content_hash(full=True) != full


def test_close_with_live_views(good_file):
    mf = ModelFile.open(good_file)
    arr = mf.array("norm")
    want = arr.copy()
    mf.close()
    np.testing.assert_array_equal(arr, want)  # still readable: the mapping lives on with the view
    with pytest.raises(ModelFileError, match="closed"):
        mf.array("norm")
    mf.close()  # idempotent
