"""The OpenAI-compatible HTTP server (`dllama-api`): arrives with its own issue."""
from __future__ import annotations

import sys
from typing import Sequence

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    print("dllama-api: the OpenAI-compatible server arrives with its issue", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
