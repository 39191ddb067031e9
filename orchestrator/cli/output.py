"""What every command prints through: the consoles, JSON without NaN, the user-error type."""

from __future__ import annotations

import json
import math
from typing import Any

from rich.console import Console

console = Console()
err_console = Console(stderr=True)


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(v: Any) -> Any:
    """JSON has no NaN: report missing figures as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def print_json(obj: dict[str, Any]) -> None:
    print(json.dumps({k: _clean(v) for k, v in obj.items()}, default=_json_default))
