"""The engine one process drives: a model file, the native forward pass over it, and the
positions of the sequences its KV cache holds.

One call runs everything: `step(entries)` feeds each entry's tokens to its sequence (a prompt
chunk, or the one token a decoding sequence sampled last) in one forward pass, every weight read
once for all of them, and returns per entry what it asked for: nothing, the last token's logits,
or its 64 best candidates (what generate.py samples from). One node or many: the same call.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np

from . import _core
from .cluster.errors import WorkerLost
from .config import ModelConfig
from .model_file import ModelFile
from .native import bind_tensor, native_config, native_plan
from .sampler import Candidates, effective_temperature, merge_candidates

# how long a root waits for a worker inside a step before naming it lost
STEP_TIMEOUT_MS = 10_000

BUFFER_FLOAT_TYPES = ("q80", "f32")
KV_CACHE_TYPES = {"f32": _core.FloatType.F32, "f16": _core.FloatType.F16}
# Tokens that go through the layers together; each weight is read once per batch. A step with
# more runs in chunks of this many.
DEFAULT_MAX_BATCH = 128
DEFAULT_MAX_SEQ_LEN = 4096
MAX_SEQUENCES = _core.MAX_SEQUENCES
NONE, LOGITS, TOPK = _core.StepOutput.NONE, _core.StepOutput.LOGITS, _core.StepOutput.TOPK
OUTPUTS = (NONE, LOGITS, TOPK)


@dataclass(frozen=True)
class Entry:
    """One sequence's part of a step: its tokens go in at the sequence's position.
    output: NONE (a prompt chunk whose next token is known), LOGITS (the last token's float32
    logits over the whole vocabulary) or TOPK (its 64 best candidates and the softmax normaliser
    at `temperature`: all a sampler needs, and in a cluster far less traffic than every logit)."""

    seq: int
    tokens: Sequence[int]
    output: _core.StepOutput = NONE
    temperature: float = 1.0


StepResult = Union[None, np.ndarray, Candidates]


class Engine:
    """Runs a model one step at a time over up to `max_sequences` sequences, each with its own
    position in the KV cache (allocated up front: max_sequences x max_seq_len positions, F32 or,
    with kv_cache_type="f16", half that).

    With workers: `progress` draws the weight transfer's bar when stderr is a terminal (never
    otherwise); `data_mac=False` leaves the data plane's messages untagged (the benchmark's
    baseline: the handshake and the control plane are authenticated either way). `vocab_limit`: the
    tokenizer's vocabulary when the model's LM head has padding rows past it (Qwen3: 151669 of
    151936); every node gives those rows -inf logits, so neither greedy nor sampling picks them."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        nthreads: int = 1,
        buffer_float_type: str = "q80",
        max_seq_len: int | None = DEFAULT_MAX_SEQ_LEN,
        workers: Sequence[str] = (),
        max_batch: int = DEFAULT_MAX_BATCH,
        max_sequences: int = 1,
        kv_cache_type: str = "f32",
        cluster_key_file: str | os.PathLike | None = None,
        progress: bool = True,
        data_mac: bool = True,
        vocab_limit: int | None = None,
    ) -> None:
        if not isinstance(nthreads, int) or isinstance(nthreads, bool) or not 1 <= nthreads <= 1024:
            raise ValueError(f"nthreads must be an integer between 1 and 1024, got {nthreads!r}")
        if buffer_float_type not in BUFFER_FLOAT_TYPES:
            raise ValueError(f"buffer_float_type must be one of {', '.join(BUFFER_FLOAT_TYPES)}, got {buffer_float_type!r}")
        if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 1):
            raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        if not isinstance(max_sequences, int) or isinstance(max_sequences, bool) or not 1 <= max_sequences <= MAX_SEQUENCES:
            raise ValueError(f"max_sequences must be an integer between 1 and {MAX_SEQUENCES}, got {max_sequences!r}")
        if kv_cache_type not in KV_CACHE_TYPES:
            raise ValueError(f"kv_cache_type must be one of {', '.join(KV_CACHE_TYPES)}, got {kv_cache_type!r}")
        from .cluster.plan import plan_slices
        from .cluster.root import WorkerAddress

        addresses = [w if isinstance(w, WorkerAddress) else WorkerAddress.parse(str(w)) for w in workers]
        self.workers = [str(a) for a in addresses]
        self._core = None
        self._mesh = None
        self._broken: str | None = None
        self.weights_sent = 0  # bytes of weights this root sent to workers (0 when their caches had them)
        self._file = ModelFile.open(model_path)
        try:
            self.config: ModelConfig = self._file.config
            self.buffer_float_type = buffer_float_type
            self.kv_cache_type = kv_cache_type
            self.max_sequences = max_sequences
            self.max_seq_len = min(max_seq_len or self.config.seq_len, self.config.seq_len)
            # the tokenizer's vocabulary when smaller than the model's (0: every id is a token)
            self.vocab_limit = vocab_limit if vocab_limit and vocab_limit < self.config.vocab_size else 0
            self.slices = plan_slices(self.config, [1.0] + [a.weight for a in addresses])
            if addresses:
                self._connect(self.slices, addresses, cluster_key_file, max_batch, progress, data_mac)
            self._core = _core.Transformer(native_config(self.config, self.vocab_limit), native_plan(self.slices[0]), nthreads=nthreads,
                                           max_seq_len=self.max_seq_len, max_batch=max_batch,
                                           max_sequences=max_sequences, kv_cache_type=KV_CACHE_TYPES[kv_cache_type])
            self._bind_weights(self.slices[0])
            if self._mesh is not None:
                self._core.attach_root(self._mesh, buffer_float_type == "q80",
                                       [s.vocab[1] - s.vocab[0] for s in self.slices])
        except BaseException:
            self._core = None
            self._mesh = None
            self._file.close()
            raise
        self.nthreads = nthreads
        self._positions = [0] * max_sequences
        self._last_stats: dict = {}

    def _connect(self, slices, addresses, cluster_key_file, max_batch: int, progress: bool, data_mac: bool) -> None:
        from .cluster import auth
        from .cluster.root import connect_workers

        key = auth.load_key(cluster_key_file, "root")
        cluster = connect_workers(
            self._file, slices, addresses, key=key, q80=self.buffer_float_type == "q80",
            max_seq_len=self.max_seq_len, max_batch=max_batch, max_sequences=self.max_sequences,
            kv_cache_type=self.kv_cache_type, data_mac=data_mac, progress=progress,
            vocab_limit=self.vocab_limit)
        self.weights_sent = cluster.weights_sent
        self._mesh = _core.Mesh(0, cluster.fds, cluster.names, STEP_TIMEOUT_MS,
                                **({"keys": cluster.keys} if data_mac else {}))

    def _bind_weights(self, node) -> None:
        from .cluster.slices import node_tensors

        for t in node_tensors(self._file, node):
            bind_tensor(self._core, t, self._file.buffer, t.offset, t.row_stride)
        self._core.check_bound()

    @property
    def position(self) -> int:
        """How many tokens sequence 0's KV cache holds (the single-sequence callers' position)."""
        return self._positions[0]

    def position_of(self, seq: int) -> int:
        """How many tokens sequence `seq` holds: the position its next token goes to."""
        return self._positions[self._seq(seq)]

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def is_cluster(self) -> bool:
        return self._mesh is not None

    def kv_cache_bytes(self) -> list[int]:
        """The KV cache each node holds (node 0, this one, first): max_sequences x max_seq_len
        positions of its kv heads, every layer, keys and values."""
        from .cluster.footprint import kv_cache_bytes

        return [kv_cache_bytes(self.config, s, self.max_seq_len, self.max_sequences, self.kv_cache_type)
                for s in self.slices]

    def step(self, entries: Sequence[Entry]) -> list[StepResult]:
        """Runs every entry's tokens in one forward pass (each sequence at most once per step) and
        returns per entry: None, the last token's logits [vocab] or its Candidates. A refused
        step (a bad id, a sequence that would overflow its context) changes nothing."""
        seqs, positions, counts, tokens, outputs, temperatures = self._check_entries(entries)
        if self._mesh is None:
            results = self._core.step(seqs, positions, counts, tokens, outputs, temperatures)
        else:
            before = self._mesh.stats()
            try:
                results = self._core.step(seqs, positions, counts, tokens, outputs, temperatures)
            except _core.NetworkError as e:
                self._broken = str(e)
                raise self._lost(str(e)) from None
            after = self._mesh.stats()
            self._last_stats = {
                "sync_ms": (after["sync_seconds"] - before["sync_seconds"]) * 1000,
                "sent_kb": (after["sent"] - before["sent"]) / 1024,
                # of sent_kb: the all-reduce bytes that left while the matmul making the rest ran
                "sent_early_kb": (after["sent_early"] - before["sent_early"]) / 1024,
                "recv_kb": (after["received"] - before["received"]) / 1024,
                "mac_ms": (after["mac_seconds"] - before["mac_seconds"]) * 1000,
            }
        for seq, n in zip(seqs.tolist(), counts.tolist()):
            self._positions[seq] += n
        return [merge_candidates(r) if isinstance(r, list) else r for r in results]

    def forward(self, tokens: Sequence[int], seq: int = 0) -> np.ndarray:
        """One sequence's step: feeds tokens at its position, returns the last one's float32
        logits [vocab]."""
        return self.step([Entry(seq, tokens, LOGITS)])[0]

    def reset(self, seq: int = 0) -> None:
        """Starts sequence `seq` over (its cache is overwritten as it fills again)."""
        self._positions[self._seq(seq)] = 0

    def rewind(self, position: int, seq: int = 0) -> None:
        """Forgets every token of sequence `seq` from `position` on, keeping the cache before it
        (prefix reuse)."""
        now = self._positions[self._seq(seq)]
        if not isinstance(position, int) or isinstance(position, bool) or not 0 <= position <= now:
            raise ValueError(f"can only rewind sequence {seq} to a position between 0 and {now}, got {position!r}")
        self._positions[seq] = position

    def stats(self) -> dict:
        """Figures of the last step beyond timing: sync ms, KB sent and received (a single node
        has no network traffic to report)."""
        return dict(self._last_stats)

    def close(self) -> None:
        if self._core is not None and self._mesh is not None and self._broken is None:
            self._core.detach()
        self._core = None
        self._mesh = None
        self._file.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _lost(self, message: str) -> WorkerLost:
        """The error for a failed step, naming the worker its message is about."""
        return WorkerLost(next((w for w in self.workers if w in message), ""), message)

    def _seq(self, seq: int) -> int:
        if not isinstance(seq, (int, np.integer)) or isinstance(seq, bool) or not 0 <= seq < self.max_sequences:
            raise ValueError(f"sequence {seq!r} is not one of this engine's 0..{self.max_sequences - 1}")
        return int(seq)

    def _check_entries(self, entries: Sequence[Entry]) -> tuple[np.ndarray, ...]:
        """The step as the core takes it: per entry its sequence, position, token count, output
        and temperature, and every entry's tokens end to end; anything a caller got wrong is a
        ValueError before any of it runs."""
        if self._core is None:
            raise ValueError("the engine is closed")
        if self._broken is not None:
            raise self._lost(f"the cluster lost a node earlier: {self._broken}")
        entries = list(entries)
        if not entries:
            raise ValueError("a step needs at least one entry")
        seen: set[int] = set()
        ids = []
        for e in entries:
            seq = self._seq(e.seq)
            if seq in seen:
                raise ValueError(f"sequence {seq} appears twice in one step")
            seen.add(seq)
            if e.output not in OUTPUTS:
                raise ValueError(f"output must be NONE, LOGITS or TOPK, got {e.output!r}")
            t = float(e.temperature)
            if not (np.isfinite(t) and t >= 0):
                raise ValueError(f"temperature must be a finite number >= 0, got {e.temperature!r}")
            ids.append(self._check_tokens(e.tokens, seq))
        return (np.array([e.seq for e in entries], dtype=np.int32),
                np.array([self._positions[e.seq] for e in entries], dtype=np.int32),
                np.array([len(i) for i in ids], dtype=np.int32),
                np.concatenate(ids),
                np.array([int(e.output) for e in entries], dtype=np.int32),
                # the normaliser of a greedy entry is unused: any positive temperature does
                np.array([effective_temperature(float(e.temperature)) or 1.0 for e in entries], dtype=np.float32))

    def _check_tokens(self, tokens: Sequence[int], seq: int) -> np.ndarray:
        try:
            ids = np.asarray(tokens)
        except (TypeError, ValueError) as e:
            raise ValueError(f"tokens must be a sequence of ints: {e}") from None
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("tokens must be a non-empty flat sequence of ints")
        if ids.dtype.kind not in "iu":
            raise ValueError(f"tokens must be ints, got {ids.dtype}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            bad = int(ids[(ids < 0) | (ids >= self.config.vocab_size)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        position = self._positions[seq]
        if position + ids.size > self.max_seq_len:
            raise ValueError(f"{ids.size} tokens at position {position} of sequence {seq} exceed max_seq_len "
                             f"{self.max_seq_len}")
        return ids.astype(np.int32)
