"""What the pipeline prints: progress on stdout, warnings on stderr (process 0 only)."""

from __future__ import annotations

import sys
from typing import Any

from jaxprune.train import parallel


def warn(message: str) -> None:
    """One line on stderr (process 0): something failed that the result does not depend on."""
    if parallel.is_primary():
        print(f"jaxprune: warning: {' '.join(message.split())}", file=sys.stderr, flush=True)


def say(verbose: bool, *args: Any) -> None:
    if verbose and parallel.is_primary():
        print(*args, flush=True)
