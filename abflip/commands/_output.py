"""What every command prints and how it exits, without typer (the device commands' fast path
in :mod:`abflip.cli` uses it directly; :func:`abflip.commands._common.run` wraps it for typer)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from metadata.errors import Error

__all__ = ["report"]


def report(fn: Callable[[], Any], as_json: bool, render: Callable[[Any], str]) -> int:
    """Call ``fn``; print its result (JSON or rendered) or its error; the exit code (0: ok)."""
    try:
        result = fn()
    except Error as e:
        if as_json:
            print(json.dumps({"error": e.to_json()}, indent=1))
        print(e.diagnostics(), file=sys.stderr)
        return e.exit_code
    if as_json:
        print(json.dumps(result, indent=1, sort_keys=True, default=str))
    elif text := render(result):
        print(text)
    return 0
