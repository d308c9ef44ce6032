"""The cluster data plane against a hostile or careless peer: a real root (`_core.Transformer` +
`_core.Mesh`) or a real worker loop (`Transformer.serve`) on one end of a TCP connection on
127.0.0.1, and the other node played by hand in Python, framing and checking every message with
hashlib.blake2b as the wire rule of native/mac.h says."""
from __future__ import annotations

import hmac
import math
import os
import socket
import struct
from concurrent.futures import ThreadPoolExecutor
from hashlib import blake2b

import numpy as np
import pytest

from dllama import _core
from dllama.cluster.plan import plan_slices
from dllama.cluster.slices import node_tensors
from dllama.native import bind_tensor, native_config, native_plan
from dllama.model_file import ModelFile
from dllama.testing.checkpoint import make_model_file
from hostile_peers import (CANDIDATES, LOGITS, NONE, STEP_ENTRY, STEP_HEADER, STOP_MESSAGE, core_step, read_step,
                           step_message)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
ROOT_KEYS = [b"", KEY]  # the root's (node 0) keys in a two-node cluster
TAG = 16
WORKER = "worker 127.0.0.1:7"  # how the root's mesh names node 1
TOP_K = 64
TOPK = struct.Struct(f"<{TOP_K}i{TOP_K}ffi")  # TopK: ids, logits, log_norm, count (520 bytes)
PROMPT = [9707, 11, 1879, 0, 3838]
VOCAB_END = 151936  # the tiny preset's vocabulary; the worker's slice of two nodes ends there


def tag(key: bytes, sender: int, counter: int, payload: bytes) -> bytes:
    return blake2b(struct.pack("<IQ", sender, counter) + payload, key=key, digest_size=TAG).digest()


def connected_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    return near, far


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed")
        data += chunk
    return bytes(data)


class Peer:
    """One node played by hand: every message it sends carries the tag of its own counter, every
    message it receives is checked against the other node's (bad tags are counted, not raised,
    so a test can ask for them)."""

    def __init__(self, sock: socket.socket, me: int, other: int, key: bytes | None) -> None:
        self.sock, self.me, self.other, self.key = sock, me, other, key
        self.sent = self.received = 0
        self.bad_tags = 0
        sock.settimeout(10)

    def frame(self, payload: bytes, counter: int | None = None) -> bytes:
        """The payload as it goes on the wire (counter: the tag of another message than the next)."""
        if self.key is None:
            return payload
        if counter is None:
            counter, self.sent = self.sent, self.sent + 1
        return payload + tag(self.key, self.me, counter, payload)

    def send(self, payload: bytes) -> None:
        self.sock.sendall(self.frame(payload))

    def recv(self, n: int) -> bytes:
        if self.key is None:
            return recv_exactly(self.sock, n)
        data = recv_exactly(self.sock, n + TAG)
        payload = data[:n]
        if not hmac.compare_digest(data[n:], tag(self.key, self.other, self.received, payload)):
            self.bad_tags += 1
        self.received += 1
        return payload


class ScriptedWorker(Peer):
    """Node 1 of a two-node cluster: takes the root's step and does its half of every all-reduce
    (a zero partial, f32 buffers)."""

    def __init__(self, sock: socket.socket, key: bytes | None, dim: int, layers: int) -> None:
        super().__init__(sock, me=1, other=0, key=key)
        self.dim, self.layers = dim, layers

    def header(self) -> tuple[int, int, int, float]:
        [(_seq, pos, n, output, temperature)], self.tokens = read_step(self.recv)
        return pos, n, output, temperature

    def all_reduces(self, n: int, count: int | None = None) -> None:
        for _ in range(2 * self.layers if count is None else count):
            self.recv(n * self.dim * 4)
            self.send(bytes(n * self.dim * 4))

    def run_step(self, reply: bytes = b"") -> tuple[int, int, int, float]:
        """One whole step; `reply` is what goes back to the root after the layers."""
        h = self.header()
        self.all_reduces(h[1])
        if reply:
            self.send(reply)
        return h


def topk(ids, logits, log_norm: float, count: int | None = None) -> bytes:
    ids, logits = list(ids), list(logits)
    n = len(ids)
    return TOPK.pack(*(ids + [0] * (TOP_K - n)), *(logits + [0.0] * (TOP_K - n)), log_norm,
                     n if count is None else count)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_model_file(tmp_path_factory.mktemp("mac") / "qwen3.m", preset="tiny", arch="qwen3", layers=1,
                           weights="f32", seed=5)
    with ModelFile.open(path) as f:
        yield f


def node_core(model: ModelFile, node: int, nodes: int = 2) -> _core.Transformer:
    slices = plan_slices(model.config, [1.0] * nodes)
    core = _core.Transformer(native_config(model.config), native_plan(slices[node]), nthreads=1, max_seq_len=32,
                             max_batch=8)
    for t in node_tensors(model, slices[node]):
        bind_tensor(core, t, model.buffer, t.offset, t.row_stride)
    core.check_bound()
    return core


class Cluster:
    """A real root over a real TCP connection to a scripted worker."""

    def __init__(self, model: ModelFile, keys: list[bytes] | None = ROOT_KEYS, worker_key: bytes | None = None) -> None:
        slices = plan_slices(model.config, [1.0, 1.0])
        self.worker_vocab = slices[1].vocab
        near, far = connected_pair()
        self.mesh = _core.Mesh(0, [-1, near.detach()], ["root", WORKER], 5000, keys=keys)
        self.core = node_core(model, 0)
        self.core.attach_root(self.mesh, False, [s.vocab[1] - s.vocab[0] for s in slices])
        key = worker_key or (keys[1] if keys else None)
        self.worker = ScriptedWorker(far, key, model.config.dim, model.config.n_layers)
        self.pool = ThreadPoolExecutor(1)

    def step(self, script, tokens, output, temperature=1.0, pos=0):
        """Runs the root's step while the worker plays `script(worker)`; returns both results."""
        played = self.pool.submit(script, self.worker)
        try:
            result = core_step(self.core, tokens, pos, output, temperature)
        finally:
            worker_result = played.result(timeout=20)
        return result, worker_result

    def close(self) -> None:
        self.pool.shutdown()
        self.worker.sock.close()
        self.core = self.mesh = None


@pytest.fixture
def cluster(model):
    c = Cluster(model)
    yield c
    c.close()


@pytest.mark.parametrize("keys", [ROOT_KEYS, None, []], ids=["keys", "None", "no keys"])
def test_a_root_and_a_python_worker_agree_on_every_message_both_ways(model, keys):
    c = Cluster(model, keys)
    keyed = bool(keys)
    try:
        lo, hi = c.worker_vocab
        ids = list(range(hi - TOP_K, hi))[::-1]
        reply = topk(ids, [float(-i) for i in range(TOP_K)], 3.5)
        # a prefill without output, a decode step with candidates, a decode step with logits
        out, h = c.step(lambda w: w.run_step(), [1, 2, 3], NONE)
        assert out is None and h == (0, 3, NONE, 1.0) and list(c.worker.tokens) == [1, 2, 3]
        parts, h = c.step(lambda w: w.run_step(reply), [4], CANDIDATES, temperature=0.5, pos=3)
        assert h == (3, 1, CANDIDATES, 0.5) and list(c.worker.tokens) == [4]
        assert list(parts[1][0]) == ids and parts[1][2] == pytest.approx(3.5)
        assert len(parts[0][0]) == TOP_K and all(0 <= i < lo for i in parts[0][0])
        mine = np.arange(hi - lo, dtype=np.float32)
        logits, _ = c.step(lambda w: w.run_step(mine.tobytes()), [5], LOGITS, pos=4)
        np.testing.assert_array_equal(logits[lo:], mine)
        # 3 steps of a header, tokens and 2 all-reduces each; 2 replies
        messages_to_worker = 3 * (2 + 2 * model.config.n_layers)
        stats = c.mesh.stats()
        if keyed:
            assert c.worker.bad_tags == 0
            assert (c.worker.received, c.worker.sent) == (messages_to_worker, messages_to_worker - 6 + 2)
            assert stats["mac_seconds"] > 0
        else:
            assert stats["mac_seconds"] == 0
        # plain bytes without keys, payload + 16 per message with them, and nothing more on the wire
        payload = 3 * (STEP_HEADER.size + STEP_ENTRY.size) + 4 * 5 + (3 + 1 + 1) * model.config.dim * 4 * 2 * model.config.n_layers
        assert stats["sent"] == payload + (TAG * messages_to_worker if keyed else 0)
        c.worker.sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            c.worker.sock.recv(1)
    finally:
        c.close()


def tamper_reply(w: ScriptedWorker) -> None:
    w.header()
    w.all_reduces(1)
    framed = bytearray(w.frame(topk(range(VOCAB_END - TOP_K, VOCAB_END), [0.0] * TOP_K, 1.0)))
    framed[100] ^= 0x01  # a byte of an id
    w.sock.sendall(framed)


def tamper_all_reduce(w: ScriptedWorker) -> None:
    w.header()
    w.recv(w.dim * 4)
    framed = bytearray(w.frame(bytes(w.dim * 4)))
    framed[-1] ^= 0x80  # the tag itself
    w.sock.sendall(framed)


def replay_all_reduce(w: ScriptedWorker) -> None:
    w.header()
    w.recv(w.dim * 4)
    first = w.frame(bytes(w.dim * 4))
    w.sock.sendall(first)
    w.recv(w.dim * 4)
    w.sock.sendall(first)  # the same bytes again: a valid tag, for the previous message


def reorder_all_reduces(w: ScriptedWorker) -> None:
    w.header()
    payload = bytes(w.dim * 4)
    w.sock.sendall(w.frame(payload, counter=1) + w.frame(payload, counter=0))


@pytest.mark.parametrize("script", [tamper_reply, tamper_all_reduce, replay_all_reduce, reorder_all_reduces])
def test_a_message_that_fails_its_tag_is_a_network_error_naming_the_worker(cluster, script):
    with pytest.raises(_core.NetworkError, match=f"{WORKER}: message failed authentication"):
        cluster.step(script, [7], CANDIDATES)
    assert cluster.worker.bad_tags == 0  # the root's own messages were fine


def test_a_worker_with_another_key_is_refused_at_its_first_message(model):
    def script(w: ScriptedWorker) -> None:
        w.header()
        w.all_reduces(1, count=1)

    c = Cluster(model, worker_key=OTHER_KEY)
    try:
        with pytest.raises(_core.NetworkError, match=f"{WORKER}: message failed authentication"):
            c.step(script, [7], NONE)
        assert c.worker.bad_tags == 3  # and the worker could not take the root's messages either
    finally:
        c.close()


def test_a_plain_worker_cannot_talk_to_a_keyed_root(model):
    c = Cluster(model)
    try:
        def script(w: ScriptedWorker) -> None:  # plain messages, as a worker without keys sends them
            recv_exactly(w.sock, STEP_HEADER.size + TAG + STEP_ENTRY.size + 4 + TAG + w.dim * 4 + TAG)
            w.sock.sendall(bytes(w.dim * 4 + TAG))
        with pytest.raises(_core.NetworkError, match=f"{WORKER}: message failed authentication"):
            c.step(script, [7], NONE)
    finally:
        c.close()


BAD_REPLIES = {
    "count -1": topk([], [], 1.0, count=-1),
    "count 65": topk(range(VOCAB_END - 64, VOCAB_END), [0.0] * 64, 1.0, count=65),
    "count 2**24": topk(range(VOCAB_END - 64, VOCAB_END), [0.0] * 64, 1.0, count=1 << 24),
    "count 63": topk(range(VOCAB_END - 63, VOCAB_END), [0.0] * 63, 1.0),
    "an id of the root's slice": topk([0] + list(range(VOCAB_END - 63, VOCAB_END)), [0.0] * 64, 1.0),
    "an id past the vocabulary": topk([VOCAB_END] + list(range(VOCAB_END - 63, VOCAB_END)), [0.0] * 64, 1.0),
    "a negative id": topk([-5] + list(range(VOCAB_END - 63, VOCAB_END)), [0.0] * 64, 1.0),
    "a NaN logit": topk(range(VOCAB_END - 64, VOCAB_END), [0.0] * 63 + [math.nan], 1.0),
    "a +inf logit": topk(range(VOCAB_END - 64, VOCAB_END), [math.inf] + [0.0] * 63, 1.0),
    "a NaN log_norm": topk(range(VOCAB_END - 64, VOCAB_END), [0.0] * 64, math.nan),
}


@pytest.mark.parametrize("keyed", [True, False])
@pytest.mark.parametrize("what", list(BAD_REPLIES))
def test_a_malformed_top_k_reply_is_a_network_error_naming_the_worker(model, what, keyed):
    c = Cluster(model, ROOT_KEYS if keyed else None)
    try:
        assert c.worker_vocab[1] == VOCAB_END
        with pytest.raises(_core.NetworkError, match=f"{WORKER}: sent a malformed top-k reply"):
            c.step(lambda w: w.run_step(BAD_REPLIES[what]), [7], CANDIDATES)
    finally:
        c.close()


def test_masked_candidates_are_a_good_reply(cluster):
    ids = list(range(VOCAB_END - 64, VOCAB_END))
    parts, _ = cluster.step(lambda w: w.run_step(topk(ids, [-math.inf] * 64, -math.inf)), [7], CANDIDATES)
    assert list(parts[1][0]) == ids and parts[1][2] == -math.inf


@pytest.mark.parametrize("temperature", [math.nan, math.inf, -0.5])
def test_the_root_refuses_a_temperature_out_of_range_before_sending_anything(cluster, temperature):
    with pytest.raises(ValueError, match="temperature"):
        core_step(cluster.core, [7], 0, CANDIDATES, temperature)
    assert cluster.mesh.stats()["sent"] == 0


class ScriptedRoot(Peer):
    def __init__(self, sock: socket.socket, key: bytes | None) -> None:
        super().__init__(sock, me=0, other=1, key=key)


def serve_against(model, script, key: bytes | None = KEY) -> tuple[str, ScriptedRoot]:
    """Runs a real worker loop (node 1) against a Python root playing `script`; returns why it ended."""
    near, far = connected_pair()
    root = ScriptedRoot(far, key)
    keys = None if key is None else [key, b""]
    mesh = _core.Mesh(1, [near.detach(), -1], ["root", "worker"], 5000, keys=keys)
    core = node_core(model, 1)
    with ThreadPoolExecutor(1) as pool, far:
        played = pool.submit(script, root)
        reason = core.serve(mesh, False)
        played.result(timeout=20)
    return reason, root


def test_a_worker_takes_a_keyed_root_and_refuses_a_tampered_step(model):
    def good_then_tampered(r: ScriptedRoot) -> None:
        for message in step_message([7], NONE):
            r.send(message)
        for _ in range(2 * model.config.n_layers):
            r.send(bytes(model.config.dim * 4))
            r.recv(model.config.dim * 4)
        framed = bytearray(r.frame(step_message([8], NONE, pos=1)[0]))
        framed[4] ^= 0x01
        r.sock.sendall(framed)

    reason, root = serve_against(model, good_then_tampered)
    assert reason == "root: message failed authentication (wrong cluster key or tampered traffic)"
    assert root.bad_tags == 0 and root.received == 2 * model.config.n_layers


@pytest.mark.parametrize("key", [KEY, None])
def test_a_worker_ends_on_the_roots_stop(model, key):
    reason, _ = serve_against(model, lambda r: r.send(STOP_MESSAGE), key)
    assert reason == "the root ended the session"


@pytest.mark.parametrize("temperature", [math.nan, math.inf, -1.0])
def test_a_worker_refuses_a_step_with_a_temperature_out_of_range(model, temperature):
    reason, _ = serve_against(model, lambda r: [r.send(m) for m in step_message([7], CANDIDATES, temperature)])
    assert reason == "the root sent a step out of range"


def _header(n_entries: int, n_tokens: int) -> bytes:
    return STEP_HEADER.pack(0x5354504C, 0, n_entries, n_tokens)


BAD_STEPS = {  # a step a worker of one sequence (max_seq_len 32) must refuse, and why
    "more entries than sequences": ([_header(2, 2)], "the root sent a step out of range"),
    "more tokens than the cache holds": ([_header(1, 1 << 30)], "the root sent a step out of range"),
    "no token": ([_header(1, 0)], "the root sent a step out of range"),
    "entries that do not add up": ([_header(1, 2), STEP_ENTRY.pack(0, 0, 1, NONE, 1.0) + bytes(8)],
                                   "the root sent a step whose entries do not add up to its tokens"),
    "a sequence the worker has not": ([_header(1, 1), STEP_ENTRY.pack(5, 0, 1, NONE, 1.0) + bytes(4)],
                                      "the root sent a step this node cannot run: sequence 5 is not in 0..0"),
    "positions past the context": ([_header(1, 1), STEP_ENTRY.pack(0, 32, 1, NONE, 1.0) + bytes(4)],
                                   "the root sent a step this node cannot run: position 32 + 1 tokens exceeds"),
    "an output that is none of the three": ([_header(1, 1), STEP_ENTRY.pack(0, 0, 1, 3, 1.0) + bytes(4)],
                                            "the root sent a step out of range"),
}


@pytest.mark.parametrize("case", list(BAD_STEPS))
def test_a_worker_refuses_a_step_out_of_its_range_before_sizing_anything_from_it(model, case):
    messages, why = BAD_STEPS[case]
    reason, _ = serve_against(model, lambda r: [r.send(m) for m in messages])
    assert reason.startswith(why), reason


@pytest.mark.parametrize("keys, why", [
    ([b"", KEY[:31]], "must be 32 bytes, got 31"),
    ([b"", KEY + b"x"], "must be 32 bytes, got 33"),
    ([KEY, KEY], "own key must be empty"),
    ([b""], "one key per node"),
])
def test_a_mesh_refuses_bad_keys_and_closes_its_sockets(keys, why):
    near, far = connected_pair()
    with far:
        with pytest.raises(ValueError, match=why):
            _core.Mesh(0, [-1, near.detach()], ["root", WORKER], 5000, keys=keys)
        far.settimeout(5)
        assert far.recv(1) == b""  # the mesh closed its end



def test_three_native_nodes_with_keys_compute_what_one_node_does(model):
    """Every pair with its own key: the all-reduces interleave three tagged streams per node."""
    nodes = 3
    pair_keys = {(i, j): os.urandom(32) for i in range(nodes) for j in range(i + 1, nodes)}
    fds = [[-1] * nodes for _ in range(nodes)]
    for i, j in pair_keys:
        a, b = connected_pair()
        fds[i][j], fds[j][i] = a.detach(), b.detach()
    names = ["root"] + [f"worker {i}" for i in range(1, nodes)]
    meshes = [_core.Mesh(i, fds[i], names, 5000, keys=[b"" if i == j else pair_keys[min(i, j), max(i, j)]
                                                          for j in range(nodes)]) for i in range(nodes)]
    cores = [node_core(model, i, nodes) for i in range(nodes)]
    slices = plan_slices(model.config, [1.0] * nodes)
    cores[0].attach_root(meshes[0], False, [s.vocab[1] - s.vocab[0] for s in slices])
    alone = _core.Transformer(native_config(model.config), None, nthreads=1, max_seq_len=32, max_batch=8)
    for t in node_tensors(model, plan_slices(model.config, [1.0])[0]):
        bind_tensor(alone, t, model.buffer, t.offset, t.row_stride)
    alone.check_bound()
    with ThreadPoolExecutor(nodes - 1) as pool:
        served = [pool.submit(cores[i].serve, meshes[i], False) for i in range(1, nodes)]
        logits = _core.StepOutput.LOGITS
        try:
            got = [core_step(cores[0], PROMPT, 0, logits), core_step(cores[0], [11], len(PROMPT), logits)]
        finally:  # the workers' loops end (on Stop, or on their step timeout), so the pool can close
            cores[0].detach()
        reasons = [f.result(timeout=20) for f in served]
    expected = [alone.forward(PROMPT, 0), alone.forward([11], len(PROMPT))]
    for e, g in zip(expected, got):
        assert float(np.max(np.abs(e - g))) / float(e.max() - e.min()) <= 1e-4
    assert reasons == ["the root ended the session"] * (nodes - 1)
    assert all(m.stats()["mac_seconds"] > 0 for m in meshes)
