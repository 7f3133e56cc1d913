"""How a command ends on bad input: one ``error:`` line and an exit status, never a traceback."""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

USAGE_ERROR = 2


def exit_on_error(fn: Callable[..., int | None], *args: Any) -> int:
    """Run ``fn(*args)``; print ``error: <message>`` instead of a traceback and return 2 for bad input
    (ValueError, KeyError, missing files or network), 1 for a diverged training run. ``UNROLLATTN_TRACEBACK=1``
    re-raises (for debugging)."""
    try:
        return int(fn(*args) or 0)
    except (ValueError, KeyError, FileNotFoundError, ConnectionError, FloatingPointError) as err:
        if os.environ.get("UNROLLATTN_TRACEBACK"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 1 if isinstance(err, FloatingPointError) else USAGE_ERROR


__all__ = ["USAGE_ERROR", "exit_on_error"]
