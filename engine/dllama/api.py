"""`python -m dllama.api` and `import dllama.api`: the `dllama-api` server, which lives in
dllama.server.main; kept for command lines and install checks written before it moved."""
from __future__ import annotations

import sys

from dllama.server.main import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
