"""What a stranger's numbers and files may cost a node: a root's CONFIG frame (checked against the
model's shape and the plan, its memory sized before anything is allocated), the slice cache's
files (damaged, truncated while read, shared, bounded), a .m header edited to absurd sizes."""
from __future__ import annotations

import copy
import json
import os
import struct
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from dllama.cluster import cache as cache_module
from dllama.cluster import footprint
from dllama.cluster.cache import SliceCache, digest_of
from dllama.cluster.plan import plan_slices
from dllama.cluster.session import Session
from dllama.cluster.slices import node_tensors
from dllama.config import Arch, FloatType, ModelConfig
from dllama.model_file import ModelFile, ModelFileError, layout_nbytes, tensor_count, tensor_layout
from dllama.testing.checkpoint import make_model_file

MiB = 1 << 20


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-models")
    return {
        "qwen3_moe": make_model_file(root / "moe.m", preset="tiny", arch="qwen3_moe", weights="f32", seed=1),
        "qwen3_q40": make_model_file(root / "qwen3-q40.m", preset="tiny", arch="qwen3", weights="q40", seed=2),
    }


def root_session(path, nodes: int = 3, node: int = 1, max_seq_len: int = 64, max_batch: int = 128) -> Session:
    """The session cluster/root.py sends worker `node`: its slice of the plan, its manifest."""
    with ModelFile.open(path) as model:
        slices = plan_slices(model.config, [1.0] * nodes)
        tensors = list(node_tensors(model, slices[node]))
        return Session(model.config, slices[node], node, nodes, True, max_seq_len, max_batch, model.content_hash(),
                       [(t.name, int(t.type), t.rows, t.cols) for t in tensors])


def over_the_wire(session: Session) -> dict:
    return json.loads(json.dumps(session.to_json()))


# -- the CONFIG frame -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["qwen3_moe", "qwen3_q40"])
@pytest.mark.parametrize("nodes", [2, 3])
def test_what_the_root_sends_is_accepted_as_it_was_sent(models, name, nodes):
    for node in range(1, nodes):
        session = root_session(models[name], nodes, node)
        back = Session.from_json(over_the_wire(session))
        assert back == session and back.data_mac is True
        assert back.cache_key == session.cache_key


def test_data_mac_crosses_the_wire_and_a_missing_key_means_on(models):
    session = root_session(models["qwen3_moe"])
    session.data_mac = False
    d = over_the_wire(session)
    assert d["data_mac"] is False and Session.from_json(d).data_mac is False
    del d["data_mac"]
    assert Session.from_json(d).data_mac is True
    d["data_mac"] = "no"
    with pytest.raises(ValueError, match="malformed session config"):
        Session.from_json(d)


def _set(path: str, value):
    def edit(d):
        *outer, last = path.split(".")
        target = d
        for k in outer:
            target = target[int(k)] if isinstance(target, list) else target[k]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    return edit


REFUSED = {
    "a million layers": (_set("config.n_layers", 10**6), "n_layers = 1000000 is out of range (1..1024)"),
    "dim not a multiple of 32": (_set("config.dim", 100), "dim = 100 is not a multiple of 32"),
    "zero dim": (_set("config.dim", 0), "dim = 0 is out of range"),
    "negative dim": (_set("config.dim", -64), "dim = -64 is out of range"),
    "a dim beyond int32": (_set("config.dim", 2**40), "dim = 1099511627776 is out of range"),
    "a rope theta beyond int32": (_set("config.rope_theta", 2**40), "rope_theta = 1099511627776 does not fit an int32"),
    "a huge hidden dim": (_set("config.moe_hidden_dim", 1 << 24), "moe_hidden_dim = 16777216 is out of range"),
    "zero heads": (_set("config.n_heads", 0), "n_heads = 0 is out of range"),
    "heads not a multiple of kv heads": (_set("config.n_kv_heads", 3), "n_heads 4 is not a multiple of n_kv_heads 3"),
    "1,398,096 experts": (_set("config.n_experts", 1398096), "n_experts = 1398096 is out of range (0..1024)"),
    "more active experts than experts": (_set("config.n_active_experts", 9), "n_active_experts 9 is not in 1..8"),
    "a huge vocabulary": (_set("config.vocab_size", 1 << 30), "vocab_size = 1073741824 is out of range"),
    "an unknown architecture": (_set("config.arch", 7), "malformed session config"),
    "an F16 model": (_set("config.weight_type", int(FloatType.F16)), "unsupported weight float type F16"),
    "a string for a number": (_set("config.n_layers", "2"), "malformed session config"),
    "true for a number": (_set("config.n_layers", True), "malformed session config"),
    "a derived field": (_set("config.q_dim", 128), "malformed session config"),
    "query heads beyond the model's": (_set("slice.q_heads", [2, 5]),
                                       "slice q_heads [2, 5] is not a non-empty range of 0..4"),
    "an empty head range": (_set("slice.q_heads", [2, 2]), "slice q_heads [2, 2] is not a non-empty range"),
    "a reversed range": (_set("slice.vocab", [100, 50]), "slice vocab [100, 50] is not a non-empty range"),
    "a range of three numbers": (_set("slice.vocab", [0, 1, 2]), "malformed session config"),
    "vocab rows beyond the vocabulary": (_set("slice.vocab", [0, 10**9]), "slice vocab [0, 1000000000]"),
    "kv heads its queries do not read": (_set("slice.kv_heads", [1, 2]),
                                         "slice kv_heads [1, 2] are not those its query heads read ([0, 2])"),
    "expert rows beyond the expert": (_set("slice.moe", [0, 64]),
                                      "slice moe [0, 64] is not a non-empty range of 0..32"),
    "a dense range in a MoE model": (_set("slice.ffn", [0, 32]), "slice ffn must be [0, 0]"),
    "a tensor shape not the plan's": (_set("manifest.1.2", 4096),
                                      "manifest entry 1 is 'layers.0.q_proj' type 0 [4096, 64]"),
    "a tensor name not the plan's": (_set("manifest.0.0", "layers.9.q_proj"), "manifest entry 0 is 'layers.9.q_proj'"),
    "a tensor type not the plan's": (_set("manifest.0.1", 2), "manifest entry 0 is 'embed_tokens' type 2"),
    "a manifest one tensor short": (lambda d: d["manifest"].pop(), "the manifest lists 68 tensors, the model has 69"),
    "node 0 (the root)": (_set("node", 0), "node 0 of 3 is out of range"),
    "a node past the last": (_set("node", 3), "node 3 of 3 is out of range"),
    "more nodes than heads": (lambda d: d.update(nodes=5), "node 1 of 5 is out of range"),
    "positions beyond the model's": (_set("max_seq_len", 5000), "max_seq_len 5000 is out of range (1..4096)"),
    "a huge batch": (_set("max_batch", 10**6), "max_batch 1000000 is out of range (1..4096)"),
    "a million sequences": (_set("max_sequences", 10**6), "max_sequences 1000000 is out of range (1..256)"),
    "no sequence": (_set("max_sequences", 0), "max_sequences 0 is out of range (1..256)"),
    "a KV cache type the core has not": (_set("kv_cache_type", "q40"), "kv_cache_type 'q40' is not one of f32, f16"),
    "sequences as text": (_set("max_sequences", "4"), "malformed session config (TypeError"),
    "a vocab limit past the vocabulary": (_set("vocab_limit", 10**6), "vocab_limit 1000000 is out of range (0..151936)"),
    "a negative vocab limit": (_set("vocab_limit", -1), "vocab_limit -1 is out of range (0..151936)"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_session_that_is_not_a_valid_model_s_plan_is_refused(models, case):
    good = over_the_wire(root_session(models["qwen3_moe"], nodes=3, node=1))
    edit, reason = REFUSED[case]
    d = copy.deepcopy(good)
    edit(d)
    with pytest.raises(ValueError) as e:
        Session.from_json(d)
    assert reason in str(e.value), str(e.value)


def test_a_q40_slice_that_cuts_a_block_is_refused(models):
    d = over_the_wire(root_session(models["qwen3_q40"], nodes=2, node=1))
    d["slice"]["ffn"] = [48, 128]
    with pytest.raises(ValueError, match=r"slice ffn \[48, 128\] cuts a Q40 block"):
        Session.from_json(d)


def test_a_million_layers_is_refused_before_anything_is_sized_from_it(models):
    d = over_the_wire(root_session(models["qwen3_moe"]))
    d["config"]["n_layers"] = 10**6
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="n_layers = 1000000"):
            Session.from_json(d)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * MiB, f"refusing it took {peak} bytes"


# -- a session's memory -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["qwen3_moe", "qwen3_q40"])
def test_a_session_s_memory_is_the_footprint_s_worker_peak_plus_its_buffers(models, name):
    path = models[name]
    session = root_session(path, nodes=3, node=2, max_seq_len=256, max_batch=128)
    with open(path, "rb") as f:
        header = footprint.read_header(f.read(footprint.HEADER_PROBE_BYTES), str(path), path.stat().st_size)
    estimate = footprint.node_footprints(header, [1.0] * 3, 256)[2]
    assert sum(session.sizes) == estimate.weights
    need = footprint.session_memory_bytes(session)
    # the footprint's peak (weights twice while they are bound, KV cache, runtime) and the forward
    # pass's buffers for 128 tokens, which a tiny model keeps to a few MiB
    assert estimate.peak < need < estimate.peak + 8 * MiB
    bigger = Session(**{**session.__dict__, "max_batch": 4096})
    assert footprint.session_memory_bytes(bigger) > need + 4096 * 64 * 4 * 3
    # every sequence has its own KV cache, half the size in f16
    kv = footprint.kv_cache_bytes(session.config, session.slice, 256)
    four = footprint.session_memory_bytes(Session(**{**session.__dict__, "max_sequences": 4}))
    assert four >= need + 3 * kv
    half = footprint.session_memory_bytes(Session(**{**session.__dict__, "max_sequences": 4, "kv_cache_type": "f16"}))
    assert half <= four - 2 * kv


def test_memory_above_the_limit_is_refused_naming_both_numbers(models):
    need = footprint.session_memory_bytes(root_session(models["qwen3_moe"]))
    reason = footprint.memory_refusal(need, need // 2)
    assert reason is not None
    assert f"{need / MiB:.1f} MiB" in reason and f"{need // 2 / MiB:.1f} MiB" in reason and "--max-memory" in reason
    assert footprint.memory_refusal(1 * MiB, None) is None
    assert footprint.memory_refusal(1 * MiB, 2 * MiB) is None


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="needs /proc/meminfo")
def test_memory_above_what_the_kernel_has_is_refused():
    available = footprint.mem_available()
    assert available is not None and available > 0
    reason = footprint.memory_refusal(available + (1 << 40), None)
    assert reason is not None and "MemAvailable" in reason and f"{available / MiB:.1f} MiB" in reason


def test_the_memory_of_a_million_layers_is_arithmetic(models):
    good = root_session(models["qwen3_moe"])
    huge = ModelConfig(**{**{k: v for k, v in good.config.__dict__.items() if k not in ("q_dim", "kv_dim")},
                          "n_layers": 10**6})
    session = Session(huge, good.slice, 1, 3, True, 4096, 4096, "x", [])
    tracemalloc.start()
    try:
        need = footprint.session_memory_bytes(session)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert need > 10**6 * 2 * 4096 * 32 * 4  # a KV cache of a million layers
    assert peak < 1 * MiB
    assert "this session needs" in footprint.memory_refusal(need, None)


@pytest.mark.parametrize("text,n", [("6G", 6 << 30), ("512M", 512 << 20), ("1.5G", 3 << 29), ("6GiB", 6 << 30),
                                    ("64k", 64 << 10), ("2T", 2 << 40), ("1048576", 1 << 20), (" 3 G ", 3 << 30)])
def test_sizes_as_people_write_them(text, n):
    assert footprint.parse_bytes(text) == n


@pytest.mark.parametrize("text", ["", "G", "6X", "-1G", "0", "0M", "six", "6 GB extra", "1e9"])
def test_sizes_that_are_not(text):
    with pytest.raises(ValueError, match="size"):
        footprint.parse_bytes(text)


# -- the slice cache --------------------------------------------------------------------------

KEY = "ab" * 20


class Log(list):
    def __call__(self, line: str) -> None:
        self.append(line)


def entry(cache: SliceCache, key: str = KEY, size: int = 1 << 20, seed: int = 0) -> np.ndarray:
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    cache.store(key, data, digest_of(data))
    return data


def files(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


def _json(text: bytes):
    return lambda data, meta: meta.write_bytes(text)


def _flip(data: Path, meta: Path) -> None:
    b = bytearray(data.read_bytes())
    b[len(b) // 3] ^= 0x40
    data.write_bytes(bytes(b))


DAMAGE = {
    "json []": _json(b"[]"),
    "json null": _json(b"null"),
    "json {}": _json(b"{}"),
    "json not JSON": _json(b"\xff{"),
    "json of another size": lambda data, meta: meta.write_text(
        json.dumps({**json.loads(meta.read_text()), "size": 12})),
    "json size a string": lambda data, meta: meta.write_text(
        json.dumps({**json.loads(meta.read_text()), "size": str(1 << 20)})),
    "data longer": lambda data, meta: data.write_bytes(data.read_bytes() + b"x"),
    "data truncated": lambda data, meta: os.truncate(data, 1000),
    "data empty": lambda data, meta: os.truncate(data, 0),
    "a byte flipped": _flip,
    "json missing": lambda data, meta: meta.unlink(),
    "data missing": lambda data, meta: data.unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_entry_is_a_miss_removed_then_stored_again(tmp_path, damage):
    log = Log()
    cache = SliceCache(tmp_path, log)
    want = entry(cache)
    DAMAGE[damage](tmp_path / f"{KEY}.slices", tmp_path / f"{KEY}.json")
    assert cache.load(KEY, want.size) is None
    assert files(tmp_path) == []
    assert len(log) == 1 and "damaged" in log[0] and f"{KEY}.slices" in log[0], log
    assert cache.load(KEY, want.size) is None and len(log) == 1  # a plain miss says nothing
    entry(cache)
    np.testing.assert_array_equal(cache.load(KEY, want.size), want)


def test_a_hit_is_memory_of_its_own_not_a_map_of_the_file(tmp_path):
    cache = SliceCache(tmp_path, Log())
    want = entry(cache)
    got = cache.load(KEY, want.size)
    assert got.flags.owndata and got.flags.writeable
    np.testing.assert_array_equal(got, want)
    with open("/proc/self/maps") as f:
        assert str(tmp_path) not in f.read()
    os.truncate(tmp_path / f"{KEY}.slices", 0)  # under a map this would be SIGBUS on the next read
    assert int(got.astype(np.int64).sum()) == int(want.astype(np.int64).sum())


def _fd_position(path: Path) -> int | None:
    """Where some descriptor of this process reading `path` stands, or None if none is open."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != str(path):
                continue
            with open(f"/proc/self/fdinfo/{fd}") as f:
                return int(next(line for line in f if line.startswith("pos:")).split()[1])
        except (OSError, StopIteration):
            continue
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/fdinfo"), reason="needs /proc/self/fdinfo")
def test_a_file_truncated_while_it_is_read_is_a_damaged_entry(tmp_path, monkeypatch):
    """Another process truncating the file in the middle of the read: a short read, not a crash."""
    monkeypatch.setattr(cache_module, "READ_CHUNK", 64 << 10)  # many reads, so one can be caught between two
    size = 32 << 20
    caught = 0
    for attempt in range(5):
        log = Log()
        cache = SliceCache(tmp_path, log)
        want = entry(cache, size=size, seed=attempt)
        data = tmp_path / f"{KEY}.slices"
        positions = []

        def truncate_mid_read():
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                pos = _fd_position(data)
                if pos is not None and 0 < pos < size:
                    os.truncate(data, size // 2)
                    positions.append(pos)
                    return
                if pos is None and positions == [] and loaded.is_set():
                    return

        loaded = threading.Event()
        thread = threading.Thread(target=truncate_mid_read)
        thread.start()
        try:
            got = cache.load(KEY, size)
        finally:
            loaded.set()
            thread.join(15)
        if not positions:  # the read finished before the other thread saw it: try again
            np.testing.assert_array_equal(got, want)
            continue
        caught += 1
        assert got is None, f"truncated at byte {positions[0]}, yet the load returned data"
        assert "damaged" in log[0] and ("ended after" in log[0] or "digest" in log[0]), log
        assert files(tmp_path) == []
    assert caught, "no attempt caught the read in progress"


def test_the_cache_stays_within_max_bytes_evicting_the_least_recently_used(tmp_path):
    log = Log()
    size = 1 << 16
    cache = SliceCache(tmp_path, log, max_bytes=3 * size + 100)
    keys = ["a1", "b2", "c3"]
    for i, key in enumerate(keys):
        entry(cache, key, size, seed=i)
        for suffix in (".slices", ".json"):  # one second apart, whatever the filesystem's resolution
            os.utime(tmp_path / f"{key}{suffix}", (1_000_000 + i, 1_000_000 + i))
    assert cache.load("a1", size) is not None  # a1 is now the most recently used
    entry(cache, "d4", size, seed=3)
    assert files(tmp_path) == sorted(f"{k}{s}" for k in ("a1", "c3", "d4") for s in (".json", ".slices"))
    assert any("removing b2.slices" in line for line in log), log
    assert sum((tmp_path / f"{k}.slices").stat().st_size for k in ("a1", "c3", "d4")) <= cache.max_bytes
    for i, key in ((0, "a1"), (2, "c3"), (3, "d4")):
        np.testing.assert_array_equal(cache.load(key, size),
                                      np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8))


def test_an_entry_larger_than_the_cache_is_not_kept(tmp_path):
    log = Log()
    cache = SliceCache(tmp_path, log, max_bytes=1 << 16)
    small = entry(cache, "a1", 1 << 10)
    entry(cache, "b2", (1 << 16) + 1)
    assert files(tmp_path) == ["a1.json", "a1.slices"]
    assert "not keeping 65537 bytes" in log[-1] and "65536" in log[-1]
    np.testing.assert_array_equal(cache.load("a1", small.size), small)


def test_discard_removes_an_entry_and_stale_temporary_files_go(tmp_path):
    cache = SliceCache(tmp_path, Log())
    entry(cache, "a1")
    stale, fresh = tmp_path / "a2.slices.x1.tmp", tmp_path / "a3.slices.x2.tmp"
    for p in (stale, fresh):
        p.write_bytes(b"half")
    os.utime(stale, (time.time() - 2 * cache_module.STALE_TEMP_SECONDS,) * 2)
    cache.discard("a1")
    cache.discard("a1")  # already gone: nothing to do
    assert files(tmp_path) == sorted([stale.name, fresh.name])
    entry(cache, "b2")
    assert files(tmp_path) == sorted(["b2.json", "b2.slices", fresh.name])
    with pytest.raises(ValueError, match="malformed cache key"):
        cache.load("../etc/passwd", 1)


def test_workers_sharing_a_cache_directory_never_read_each_other_s_half_entries(tmp_path):
    """Two caches on one directory storing, loading and discarding the same entries at once:
    every load is a miss or the exact bytes, never an error."""
    size = 1 << 18
    wants = {k: np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8) for i, k in enumerate(("a1", "b2"))}
    errors, hits = [], [0]

    def worker(seed: int) -> None:
        cache = SliceCache(tmp_path, Log(), max_bytes=3 * size)
        rng = np.random.default_rng(seed)
        try:
            for _ in range(150):
                key = ("a1", "b2")[rng.integers(2)]
                got = cache.load(key, size)
                if got is None:
                    cache.store(key, wants[key], digest_of(wants[key]))
                else:
                    assert np.array_equal(got, wants[key])
                    hits[0] += 1
                    if rng.integers(10) == 0:
                        cache.discard(key)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert hits[0] > 0
    assert not list(tmp_path.glob("*.tmp"))


# -- the .m header ----------------------------------------------------------------------------

N_EXPERTS_KEY = 7


def _set_header_value(path: Path, key: int, value: int) -> None:
    with open(path, "r+b") as f:
        head = f.read(4096)
        for i in range((struct.unpack_from("<i", head, 4)[0] - 8) // 8):
            if struct.unpack_from("<i", head, 8 + 8 * i)[0] == key:
                f.seek(8 + 8 * i + 4)
                f.write(struct.pack("<i", value))
                return
    raise AssertionError(f"no key {key}")


@pytest.mark.parametrize("experts,reason", [(1_398_096, "n_experts = 1398096 is out of range (0..1024)"),
                                            (1024, "file is short: expected")])
def test_a_header_edited_to_absurd_experts_fails_at_once_and_small(models, tmp_path, experts, reason):
    """The 184-byte edit that cost 31 s and 1.3 GB: refused by the bounds, or (within them) by the
    file size the header implies, computed before any tensor table exists."""
    path = tmp_path / "edited.m"
    path.write_bytes(models["qwen3_moe"].read_bytes())
    _set_header_value(path, N_EXPERTS_KEY, experts)
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(ModelFileError) as e:
            ModelFile.open(path)
        elapsed = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(e.value) and reason in str(e.value), str(e.value)
    assert elapsed < 1.0, f"took {elapsed:.2f} s"
    assert peak < 50 * MiB, f"took {peak >> 20} MiB"


@pytest.mark.parametrize("arch", list(Arch))
@pytest.mark.parametrize("weights", [FloatType.F32, FloatType.Q40])
def test_the_closed_form_size_and_count_are_the_layout_s(arch, weights):
    moe = dict(n_experts=8, n_active_experts=2, moe_hidden_dim=64) if arch == Arch.QWEN3_MOE else {}
    config = ModelConfig(arch=arch, dim=128, hidden_dim=192, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=1000,
                         seq_len=512, weight_type=weights, head_dim=32, **moe)
    config.check()
    layout = tensor_layout(config)
    assert tensor_count(config) == len(layout)
    assert layout_nbytes(config) == sum(t.nbytes for t in layout)
    assert footprint.model_file_size(config, 184) == 184 + sum(t.nbytes for t in layout)


def test_the_real_file_is_the_size_its_header_implies(models):
    for path in models.values():
        with ModelFile.open(path) as m:
            assert footprint.model_file_size(m.config, m.header_size) == path.stat().st_size == m.size
