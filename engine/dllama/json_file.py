"""A JSON file that must hold one object (a checkpoint's config.json, tokenizer_config.json),
read with errors that name the file: the one rule for the converter and both tokenizer readers."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(path: Path, error: type[Exception] = ValueError) -> dict[str, Any]:
    """The object in `path`. A missing file raises FileNotFoundError (each caller says what
    it was looking for); an unreadable file, bad JSON or another JSON value raises `error`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: cannot read: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: not a JSON object")
    return data
