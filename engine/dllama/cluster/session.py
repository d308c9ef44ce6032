"""What the root tells a worker about its part of the cluster, as one JSON object."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from ..config import BLOCK_SIZE, FloatType, ModelConfig, row_bytes
from ..tensors import tensor_count
from .footprint import KV_BYTES, node_manifest, node_slices
from .plan import NodeSlice, kv_heads_of
from .slices import TensorSlice

# bytes a worker accepts to hold: far above any model that fits a board, far below what a
# stranger could make it allocate by lying
MAX_WEIGHT_BYTES = 64 * 1024**3
MAX_NODES = 64
MAX_SEQ_LEN = 1 << 20
MAX_BATCH = 4096
MAX_SEQUENCES = 256  # as the native core's kMaxSequences (dllama._core.MAX_SEQUENCES)


@dataclass
class Session:
    config: ModelConfig
    slice: NodeSlice
    node: int
    nodes: int
    q80: bool
    max_seq_len: int
    max_batch: int
    model_hash: str
    manifest: list[tuple[str, int, int, int]]  # name, float type, rows, cols
    data_mac: bool = True  # the root's choice: every data-plane frame carries a MAC
    max_sequences: int = 1  # sequences the KV cache holds (dllama-api --parallel)
    kv_cache_type: str = "f32"
    vocab_limit: int = 0  # ids at or above are padding rows no node outputs (0: none)

    @property
    def sizes(self) -> list[int]:
        return [rows * row_bytes(FloatType(t), cols) for _, t, rows, cols in self.manifest]

    @property
    def tensors(self) -> list[TensorSlice]:
        """The slices the manifest lists, as the table gives them (kind, layer and expert):
        from_json checked that the manifest is exactly these."""
        return node_slices(self.config, self.slice)

    @property
    def cache_key(self) -> str:
        plan = json.dumps([dataclasses.asdict(self.slice), self.manifest], sort_keys=True)
        return hashlib.blake2b((self.model_hash + plan).encode(), digest_size=20).hexdigest()

    def to_json(self) -> dict:
        cfg = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config) if f.init}
        return {
            "config": {k: int(v) for k, v in cfg.items()},
            "slice": dataclasses.asdict(self.slice),
            "node": self.node,
            "nodes": self.nodes,
            "q80": self.q80,
            "max_seq_len": self.max_seq_len,
            "max_batch": self.max_batch,
            "model_hash": self.model_hash,
            "manifest": self.manifest,
            "data_mac": self.data_mac,
            "max_sequences": self.max_sequences,
            "kv_cache_type": self.kv_cache_type,
            "vocab_limit": self.vocab_limit,
        }

    @classmethod
    def from_json(cls, d: dict) -> Session:
        """Rebuilds and checks what a root sent; anything malformed or not what the plan of a
        valid model gives this node is a ValueError naming the reason. Every number is checked
        before anything is sized from it: a session that passes names only tensors the node binds,
        of the shapes it binds them."""
        try:
            config = ModelConfig(**{str(k): _int(v) for k, v in _of(d["config"], dict).items()})
            s = _of(d["slice"], dict)
            node_slice = NodeSlice(*(_range(s[k]) for k in ("q_heads", "kv_heads", "ffn", "moe", "vocab")))
            manifest = [_entry(e) for e in _of(d["manifest"], list)]
            session = cls(config, node_slice, _int(d["node"]), _int(d["nodes"]), _of(d["q80"], bool),
                          _int(d["max_seq_len"]), _int(d["max_batch"]), _of(d["model_hash"], str), manifest,
                          _of(d.get("data_mac", True), bool), _int(d["max_sequences"]), _of(d["kv_cache_type"], str),
                          _int(d.get("vocab_limit", 0)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed session config ({type(e).__name__}: {e})") from None
        try:
            config.check()
        except ValueError as e:
            raise ValueError(f"model config: {e}") from None
        if not 1 <= session.node < session.nodes <= min(MAX_NODES, config.n_heads):
            raise ValueError(f"node {session.node} of {session.nodes} is out of range "
                             f"(1..nodes-1, at most {min(MAX_NODES, config.n_heads)} nodes)")
        if not 1 <= session.max_seq_len <= min(MAX_SEQ_LEN, config.seq_len):
            raise ValueError(f"max_seq_len {session.max_seq_len} is out of range "
                             f"(1..{min(MAX_SEQ_LEN, config.seq_len)})")
        if not 1 <= session.max_batch <= MAX_BATCH:
            raise ValueError(f"max_batch {session.max_batch} is out of range (1..{MAX_BATCH})")
        if not 1 <= session.max_sequences <= MAX_SEQUENCES:
            raise ValueError(f"max_sequences {session.max_sequences} is out of range (1..{MAX_SEQUENCES})")
        if session.kv_cache_type not in KV_BYTES:
            raise ValueError(f"kv_cache_type {session.kv_cache_type[:20]!r} is not one of {', '.join(KV_BYTES)}")
        if not 0 <= session.vocab_limit <= config.vocab_size:
            raise ValueError(f"vocab_limit {session.vocab_limit} is out of range (0..{config.vocab_size})")
        if len(session.model_hash) > 128:
            raise ValueError("model_hash is longer than 128 characters")
        check_slice(config, node_slice)
        check_manifest(config, node_slice, manifest)
        if sum(session.sizes) > MAX_WEIGHT_BYTES:
            raise ValueError(f"the weights ({sum(session.sizes)} bytes) are larger than a worker accepts "
                             f"({MAX_WEIGHT_BYTES})")
        return session


def check_slice(config: ModelConfig, node: NodeSlice) -> None:
    """The ranges are within the model's dimensions, non-empty where the node computes, cut where
    plan_slices cuts (whole Q40 blocks), the kv heads exactly those its query heads read."""
    unit = BLOCK_SIZE if config.weight_type == FloatType.Q40 else 1
    hd = config.head_dim

    def within(name: str, r: tuple[int, int], total: int, empty: bool = False) -> None:
        lo, hi = r
        if not (0 <= lo <= hi <= total and (empty or lo < hi)):
            raise ValueError(f"slice {name} {list(r)} is not a{'' if empty else ' non-empty'} range of 0..{total}")

    within("q_heads", node.q_heads, config.n_heads)
    if (node.q_heads[0] * hd) % unit or (node.q_heads[1] * hd) % unit:
        raise ValueError(f"slice q_heads {list(node.q_heads)} cuts a Q40 block (head_dim {hd})")
    kv = kv_heads_of(config, node.q_heads)
    if node.kv_heads != kv:
        raise ValueError(f"slice kv_heads {list(node.kv_heads)} are not those its query heads read ({list(kv)})")
    hidden, unused = ("moe", "ffn") if config.is_moe else ("ffn", "moe")
    size = config.moe_hidden_dim if config.is_moe else config.hidden_dim
    within(hidden, getattr(node, hidden), size)
    if any(x % unit for x in getattr(node, hidden)):
        raise ValueError(f"slice {hidden} {list(getattr(node, hidden))} cuts a Q40 block")
    if getattr(node, unused) != (0, 0):
        raise ValueError(f"slice {unused} must be [0, 0] for this model")
    within("vocab", node.vocab, config.vocab_size)


def check_manifest(config: ModelConfig, node: NodeSlice, manifest: list[tuple[str, int, int, int]]) -> None:
    """The manifest is exactly what the node binds for this model and slice (node_manifest): the
    count first, by arithmetic, so a long manifest costs no table of the plan's."""
    want = tensor_count(config)
    if len(manifest) != want:
        raise ValueError(f"the manifest lists {len(manifest)} tensors, the model has {want}")
    for i, (got, expected) in enumerate(zip(manifest, node_manifest(config, node))):
        if got != expected:
            raise ValueError(f"manifest entry {i} is {_shown(got)}, the plan's is {_shown(expected)}")


def _shown(entry: tuple[str, int, int, int]) -> str:
    name, t, rows, cols = entry
    return f"{name[:80]!r} type {t} [{rows}, {cols}]"


def _of(value, kind: type):
    """`value` if it is a `kind` (a JSON true is no int here; a list may be a tuple when the
    session did not cross the wire)."""
    kinds = (list, tuple) if kind is list else kind
    if not isinstance(value, kinds) or (kind is not bool and isinstance(value, bool)):
        raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def _int(value) -> int:
    return _of(value, int)


def _range(value) -> tuple[int, int]:
    r = tuple(_int(x) for x in _of(value, list))
    if len(r) != 2:
        raise ValueError(f"a range is two numbers, got {len(r)}")
    return r


def _entry(value) -> tuple[str, int, int, int]:
    name, t, rows, cols = _of(value, list)
    return _of(name, str), _int(t), _int(rows), _int(cols)
