"""dllama-cluster: Qwen3 MoE inference, tensor-parallel across small Linux boards."""
from __future__ import annotations

from .config import Arch, FloatType, ModelConfig

__all__ = ["Arch", "Engine", "FloatType", "ModelConfig"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The engine pulls in the native core; importing it lazily keeps `dllama --help` and the
    # pure-Python parts usable (with a clear error) when the core failed to build.
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(f"module 'dllama' has no attribute {name!r}")
