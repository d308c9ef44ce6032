"""dllama-cluster: Qwen3 MoE inference, tensor-parallel across small Linux boards."""
from .config import Arch, FloatType, ModelConfig
from .engine import Engine

__all__ = ["Arch", "Engine", "FloatType", "ModelConfig"]
__version__ = "0.1.0"
