"""The engine one process drives: a model file, the native forward pass over it, a position."""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from . import _core
from .cluster.errors import WorkerLost
from .config import ModelConfig
from .model_file import ModelFile
from .native import bind_tensor, native_config, native_plan
from .sampler import Candidates, Sampler, candidates, merge_candidates

# how long a root waits for a worker inside a step before naming it lost
STEP_TIMEOUT_MS = 10_000

BUFFER_FLOAT_TYPES = ("q80", "f32")
# Prompt tokens that go through the layers together; each weight is read once per batch.
DEFAULT_MAX_BATCH = 128
DEFAULT_MAX_SEQ_LEN = 4096
NONE, LOGITS, TOPK = _core.StepOutput.NONE, _core.StepOutput.LOGITS, _core.StepOutput.TOPK


class Engine:
    """Runs a model one step at a time: `forward(tokens)` feeds tokens at the current position
    (several tokens are one prefill batch) and returns the last token's logits.

    With workers: `progress` draws the weight transfer's bar when stderr is a terminal (never
    otherwise); `data_mac=False` leaves the data plane's messages untagged (the benchmark's
    baseline: the handshake and the control plane are authenticated either way)."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        nthreads: int = 1,
        buffer_float_type: str = "q80",
        max_seq_len: int | None = DEFAULT_MAX_SEQ_LEN,
        workers: Sequence[str] = (),
        max_batch: int = DEFAULT_MAX_BATCH,
        cluster_key_file: str | os.PathLike | None = None,
        progress: bool = True,
        data_mac: bool = True,
    ) -> None:
        if not isinstance(nthreads, int) or isinstance(nthreads, bool) or not 1 <= nthreads <= 1024:
            raise ValueError(f"nthreads must be an integer between 1 and 1024, got {nthreads!r}")
        if buffer_float_type not in BUFFER_FLOAT_TYPES:
            raise ValueError(f"buffer_float_type must be one of {', '.join(BUFFER_FLOAT_TYPES)}, got {buffer_float_type!r}")
        if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 1):
            raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
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
            self.max_seq_len = min(max_seq_len or self.config.seq_len, self.config.seq_len)
            slices = plan_slices(self.config, [1.0] + [a.weight for a in addresses])
            if addresses:
                self._connect(slices, addresses, cluster_key_file, max_batch, progress, data_mac)
            self._core = _core.Transformer(native_config(self.config), native_plan(slices[0]), nthreads=nthreads,
                                           max_seq_len=self.max_seq_len, max_batch=max_batch)
            self._bind_weights(slices[0])
            if self._mesh is not None:
                self._core.attach_root(self._mesh, buffer_float_type == "q80", [s.vocab[1] - s.vocab[0] for s in slices])
        except BaseException:
            self._core = None
            self._mesh = None
            self._file.close()
            raise
        self.nthreads = nthreads
        self._position = 0
        self._last_stats: dict = {}

    def _connect(self, slices, addresses, cluster_key_file, max_batch: int, progress: bool, data_mac: bool) -> None:
        from .cluster import auth
        from .cluster.root import connect_workers

        key = auth.load_key(cluster_key_file, "root")
        cluster = connect_workers(
            self._file, slices, addresses, key=key, q80=self.buffer_float_type == "q80",
            max_seq_len=self.max_seq_len, max_batch=max_batch, data_mac=data_mac, progress=progress)
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
        """How many tokens the KV cache holds: the position the next token goes to."""
        return self._position

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def is_cluster(self) -> bool:
        return self._mesh is not None

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        """Feeds tokens at the current position and returns the last one's float32 logits [vocab]."""
        return self._step(tokens, LOGITS)

    def feed(self, tokens: Sequence[int]) -> None:
        """Like forward, without computing logits (a prompt whose next token is already known)."""
        self._step(tokens, NONE)

    def forward_candidates(self, tokens: Sequence[int], temperature: float) -> Candidates:
        """Like forward, returning only the 64 best candidates and the softmax normaliser at this
        temperature: all a sampler needs, and in a cluster far less traffic than every logit."""
        if not self.is_cluster:
            return candidates(self._step(tokens, LOGITS), temperature)
        return merge_candidates(self._step(tokens, TOPK, temperature))

    def next_token(self, tokens: Sequence[int], sampler: Sampler) -> int:
        """Feeds tokens and samples the next one, moving as little data as the node count allows."""
        if not self.is_cluster:
            return sampler.sample(self._step(tokens, LOGITS))
        return sampler.sample_candidates(*self.forward_candidates(tokens, sampler.temperature))

    def _step(self, tokens: Sequence[int], output: _core.StepOutput, temperature: float = 1.0):
        ids = self._check_tokens(tokens)
        if self._mesh is None:
            result = self._core.forward(ids, self._position, output != NONE)
        else:
            before = self._mesh.stats()
            try:
                result = self._core.step(ids, self._position, output, temperature)
            except _core.NetworkError as e:
                self._broken = str(e)
                raise self._lost(str(e)) from None
            after = self._mesh.stats()
            self._last_stats = {
                "sync_ms": (after["sync_seconds"] - before["sync_seconds"]) * 1000,
                "sent_kb": (after["sent"] - before["sent"]) / 1024,
                "recv_kb": (after["received"] - before["received"]) / 1024,
                "mac_ms": (after["mac_seconds"] - before["mac_seconds"]) * 1000,
            }
        self._position += len(ids)
        return result

    def reset(self) -> None:
        """Starts a new sequence."""
        self._position = 0

    def rewind(self, position: int) -> None:
        """Forgets every token from `position` on, keeping the cache before it (prefix reuse)."""
        if not isinstance(position, int) or not 0 <= position <= self._position:
            raise ValueError(f"can only rewind to a position between 0 and {self._position}, got {position!r}")
        self._position = position

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

    def _check_tokens(self, tokens: Sequence[int]) -> np.ndarray:
        if self._core is None:
            raise ValueError("the engine is closed")
        if self._broken is not None:
            raise self._lost(f"the cluster lost a node earlier: {self._broken}")
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
        if self._position + ids.size > self.max_seq_len:
            raise ValueError(
                f"{ids.size} tokens at position {self._position} exceed max_seq_len {self.max_seq_len}"
            )
        return ids.astype(np.int32)
