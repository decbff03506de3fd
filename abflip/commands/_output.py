"""What every command prints and how it exits, without typer (the device commands' fast path
in :mod:`abflip.cli` uses it directly; :func:`abflip.commands._common.run` and the streaming
commands of :mod:`.device` wrap it for typer)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from metadata.errors import Error

__all__ = ["report", "stream_events"]


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


def stream_events(fn: Callable[[Any], Any], as_json: bool, render: Callable[[Any], str]) -> int:
    """Run ``fn(progress)``: with ``as_json`` each progress event is a JSON line on stdout and the
    last line is ``{"event": "result", ...}`` or ``{"event": "error", ...}``; else no progress
    and the result rendered (typer's command adds a progress bar on a terminal). The exit code."""
    if not as_json:
        return report(lambda: fn(None), False, render)

    def emit(ev: dict) -> None:
        print(json.dumps(ev, sort_keys=True), flush=True)

    try:
        result = fn(emit)
    except Error as e:
        print(json.dumps({"event": "error", "error": e.to_json()}, sort_keys=True), flush=True)
        print(e.diagnostics(), file=sys.stderr)
        return e.exit_code
    print(json.dumps({"event": "result", "result": result}, sort_keys=True, default=str), flush=True)
    return 0
