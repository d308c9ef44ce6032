"""Test helpers shipped with the package: the real Qwen3 tokenizer and random-weight checkpoints.

    qwen3_tokenizer_dir()      a directory with tokenizer.json + tokenizer_config.json
    make_checkpoint(...)       a random Hugging Face checkpoint (dllama.testing.checkpoint)
    make_model_file(...)       the same weights written straight to a .m file
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from ..dl_tokenizer import cache_root

DATA_DIR = Path(__file__).resolve().parent / "data"
_TOKENIZER_SRC = DATA_DIR / "qwen3-tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def qwen3_tokenizer_dir() -> Path:
    """A directory holding the real Qwen3 `tokenizer.json` and `tokenizer_config.json`.

    The package carries tokenizer.json gzip-compressed; the first call decompresses it into
    `$DLLAMA_CACHE_DIR` or `$XDG_CACHE_HOME/dllama` or `~/.cache/dllama` (falling back to the
    system temp dir when that is not writable), in a directory named after the archive's hash,
    so an updated archive never meets a stale copy. Safe against concurrent callers.
    """
    if all((_TOKENIZER_SRC / f).is_file() for f in TOKENIZER_FILES):
        return _TOKENIZER_SRC
    archive = _TOKENIZER_SRC / "tokenizer.json.gz"
    config = _TOKENIZER_SRC / "tokenizer_config.json"
    h = hashlib.blake2b(archive.read_bytes(), digest_size=8)
    h.update(config.read_bytes())
    name = f"qwen3-tokenizer-{h.hexdigest()}"
    for root in (cache_root(), Path(tempfile.gettempdir()) / "dllama"):
        target = root / name
        if all((target / f).is_file() for f in TOKENIZER_FILES):
            return target
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=name + ".", dir=root))
        except OSError:
            continue
        try:
            with gzip.open(archive, "rb") as src, open(tmp / "tokenizer.json", "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            shutil.copyfile(config, tmp / "tokenizer_config.json")
            try:
                os.rename(tmp, target)  # atomic; fails if another process got there first
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                if not all((target / f).is_file() for f in TOKENIZER_FILES):
                    continue
            return target
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            continue
    raise OSError("cannot decompress the Qwen3 tokenizer: no writable cache directory")


def __getattr__(name: str):  # lazy: importing dllama.testing must not pull in numpy writers
    if name in ("make_checkpoint", "make_model_file", "PRESETS"):
        from . import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["qwen3_tokenizer_dir", "make_checkpoint", "make_model_file", "TOKENIZER_FILES", "DATA_DIR"]
