"""What the root tells a worker about its part of the cluster, as one JSON object."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from ..config import FloatType, ModelConfig, row_bytes
from .plan import NodeSlice

# bytes a worker accepts to hold: far above any model that fits a board, far below what a
# stranger could make it allocate by lying
MAX_WEIGHT_BYTES = 64 * 1024**3
MAX_TENSORS = 1_000_000


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

    @property
    def sizes(self) -> list[int]:
        return [rows * row_bytes(FloatType(t), cols) for _, t, rows, cols in self.manifest]

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
        }

    @classmethod
    def from_json(cls, d: dict) -> Session:
        """Rebuilds and checks what a root sent; anything malformed is a ValueError."""
        try:
            config = ModelConfig(**{k: int(v) for k, v in d["config"].items()})
            s = d["slice"]
            node_slice = NodeSlice(*(tuple(int(x) for x in s[k]) for k in ("q_heads", "kv_heads", "ffn", "moe", "vocab")))
            manifest = [(str(n), int(t), int(r), int(c)) for n, t, r, c in d["manifest"]]
            session = cls(config, node_slice, int(d["node"]), int(d["nodes"]), bool(d["q80"]), int(d["max_seq_len"]),
                          int(d["max_batch"]), str(d["model_hash"]), manifest)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed session config ({type(e).__name__}: {e})") from None
        if not 1 <= session.node < session.nodes <= 64:
            raise ValueError("node index out of range")
        if not 1 <= session.max_seq_len <= 1 << 20 or not 1 <= session.max_batch <= 4096:
            raise ValueError("max_seq_len or max_batch out of range")
        if len(manifest) > MAX_TENSORS:
            raise ValueError("too many tensors")
        for name, t, rows, cols in manifest:
            if t not in (FloatType.F32, FloatType.Q40) or not 0 < rows <= 1 << 24 or not 0 < cols <= 1 << 24:
                raise ValueError(f"tensor {name[:80]}: bad type or shape")
        if sum(session.sizes) > MAX_WEIGHT_BYTES:
            raise ValueError("the weights are larger than a worker accepts")
        return session
