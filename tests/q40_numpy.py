"""The Q40 block format in numpy, written from FORMATS.md and the rules in native/kernels.h
(float32 math, fp16 scales through numpy's float16): the reference the native quantizer and the
.m files are checked against."""
from __future__ import annotations

import numpy as np

QK = 32  # values per block
Q40_BYTES = 18


def _inverse(d: np.ndarray) -> np.ndarray:
    """1 / d where d != 0, else 0 (float32, no division-by-zero warning)."""
    return np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)


def _fp16_bytes(d: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # a scale past 65504 becomes inf, as in the kernels
        return d.astype(np.float16).astype("<f2").view(np.uint8).reshape(-1, 2)


def quantize_q40_numpy(x: np.ndarray) -> np.ndarray:
    """m = element of largest magnitude, the positive one when both signs occur (+0 for a zero
    block), d = m / -8, q = min(15, trunc(x / d + 8.5)) in float32; byte j = q[j] | q[j + 16] << 4."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    blocks = x.reshape(-1, QK)
    top, bottom = blocks.max(axis=1), blocks.min(axis=1)
    m = np.where(-bottom > top, bottom, top)
    m = np.where(np.abs(m) > 0, m, np.float32(0)).astype(np.float32)
    d = (m / np.float32(-8)).astype(np.float32)
    q = (blocks * _inverse(d)[:, None] + np.float32(8.5)).astype(np.int32)  # truncates toward 0
    q = np.minimum(q, 15).astype(np.uint8)
    qs = q[:, : QK // 2] | (q[:, QK // 2 :] << 4)
    out = np.concatenate([_fp16_bytes(d), qs], axis=1)
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK * Q40_BYTES)


def _scales(raw: np.ndarray, block_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    blocks = np.ascontiguousarray(raw).reshape(-1, block_bytes)
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (nblocks, 1)
    return blocks, d


def dequantize_q40_numpy(raw: np.ndarray) -> np.ndarray:
    blocks, d = _scales(raw, Q40_BYTES)
    qs = blocks[:, 2:]
    nibbles = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - np.float32(8)
    return (nibbles * d).reshape(*raw.shape[:-1], raw.shape[-1] // Q40_BYTES * QK)
