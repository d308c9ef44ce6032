"""The engine one process drives: a model file, the native forward pass over it, a position."""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from . import _core
from .config import FloatType, ModelConfig, RopeType
from .model_file import ModelFile

BUFFER_FLOAT_TYPES = ("q80", "f32")
# Prompt tokens that go through the layers together; each weight is read once per batch.
DEFAULT_MAX_BATCH = 128
DEFAULT_MAX_SEQ_LEN = 4096


def native_config(config: ModelConfig) -> dict:
    """The model's shape as the native core takes it."""
    scaled = config.rope_type == RopeType.LLAMA3_1 and config.rope_scaling_factor > 0
    return {
        "arch": int(config.arch),
        "dim": config.dim,
        "hidden_dim": config.hidden_dim,
        "n_layers": config.n_layers,
        "n_heads": config.n_heads,
        "n_kv_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "n_experts": config.n_experts,
        "n_active_experts": config.n_active_experts,
        "moe_hidden_dim": config.moe_hidden_dim,
        "vocab_size": config.vocab_size,
        "rope_theta": float(config.rope_theta),
        "rope_style": "rotate_half" if config.effective_rope_type == RopeType.FALCON else "interleaved",
        "rope_scaling_factor": float(config.rope_scaling_factor) if scaled else 0.0,
        "rope_scaling_low_freq_factor": float(config.rope_scaling_low_freq_factor),
        "rope_scaling_high_freq_factor": float(config.rope_scaling_high_freq_factor),
        "rope_scaling_orig_max_seq_len": config.rope_scaling_orig_max_seq_len,
        "norm_eps": config.eps,
        "weight_type": int(config.weight_type),
    }


class Engine:
    """Runs a model one step at a time: `forward(tokens)` feeds tokens at the current position
    (several tokens are one prefill batch) and returns the last token's logits."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        nthreads: int = 1,
        buffer_float_type: str = "q80",
        max_seq_len: int | None = DEFAULT_MAX_SEQ_LEN,
        workers: Sequence[str] = (),
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        if not isinstance(nthreads, int) or isinstance(nthreads, bool) or not 1 <= nthreads <= 1024:
            raise ValueError(f"nthreads must be an integer between 1 and 1024, got {nthreads!r}")
        if buffer_float_type not in BUFFER_FLOAT_TYPES:
            raise ValueError(f"buffer_float_type must be one of {', '.join(BUFFER_FLOAT_TYPES)}, got {buffer_float_type!r}")
        if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 1):
            raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        if workers:
            raise ValueError("this build runs on one node only; --workers arrives with the cluster")

        self._file = ModelFile.open(model_path)
        try:
            self.config: ModelConfig = self._file.config
            self.buffer_float_type = buffer_float_type
            self.max_seq_len = min(max_seq_len or self.config.seq_len, self.config.seq_len)
            self._core = _core.Transformer(
                native_config(self.config), None, nthreads=nthreads, max_seq_len=self.max_seq_len, max_batch=max_batch
            )
            self._bind_weights()
        except BaseException:
            self._core = None
            self._file.close()
            raise
        self.nthreads = nthreads
        self._position = 0

    def _bind_weights(self) -> None:
        buffer = self._file.buffer
        for info in self._file.tensors.values():
            rows, cols = (1, info.shape[0]) if len(info.shape) == 1 else info.shape
            self._core.bind(info.name, buffer, info.offset, rows, cols, info.nbytes // rows, int(info.type))
        self._core.check_bound()

    @property
    def position(self) -> int:
        """How many tokens the KV cache holds: the position the next token goes to."""
        return self._position

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        """Feeds tokens at the current position and returns the last one's float32 logits [vocab]."""
        ids = self._check_tokens(tokens)
        logits = self._core.forward(ids, self._position, True)
        self._position += len(ids)
        return logits

    def feed(self, tokens: Sequence[int]) -> None:
        """Like forward, without computing logits (a prompt whose next token is already known)."""
        ids = self._check_tokens(tokens)
        self._core.forward(ids, self._position, False)
        self._position += len(ids)

    def reset(self) -> None:
        """Starts a new sequence."""
        self._position = 0

    def rewind(self, position: int) -> None:
        """Forgets every token from `position` on, keeping the cache before it (prefix reuse)."""
        if not isinstance(position, int) or not 0 <= position <= self._position:
            raise ValueError(f"can only rewind to a position between 0 and {self._position}, got {position!r}")
        self._position = position

    def stats(self) -> dict:
        """Per-step figures beyond timing; a single node has no network traffic to report."""
        return {}

    def close(self) -> None:
        self._core = None
        self._file.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_tokens(self, tokens: Sequence[int]) -> np.ndarray:
        if self._core is None:
            raise ValueError("the engine is closed")
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
