"""What every command prints and how it exits, without typer (the device commands' fast path
in :mod:`abflip.cli` uses it directly; :func:`abflip.commands._common.run` and the streaming
commands of :mod:`.device` wrap it for typer).

Every way a command can end is printed here, in the documented form (README "Command line"):
a result; an abflip :class:`~metadata.errors.Error` (``error (<blame>): ...`` and ``hint:``,
JSON under ``--json``); a signal (SIGINT, SIGTERM: :class:`~metadata.errors.Interrupted`, exit
130/143, saying where the work stands); anything else (``error (internal)``, exit 1, the
traceback only with ``--verbose``). A reader that closes stdout early (``| head``) is a normal
end: the rest of the output goes nowhere and the command finishes its work.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from metadata.errors import Error, Interrupted

__all__ = ["report", "stream_events", "print_error", "say", "Stopped", "catch_signals", "stdout_gone", "internal_error",
           "VERBOSE"]

#: Set by the CLI's ``--verbose``: internal errors print their traceback too.
VERBOSE = False


class Stopped(KeyboardInterrupt):
    """Raised in the main thread by SIGINT or SIGTERM (see :func:`catch_signals`): a
    KeyboardInterrupt, so what unwinds for Ctrl-C unwinds for systemd's stop as well."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, _frame: object) -> None:
    # once: cleanup after the first signal is not interrupted by a second
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Stopped(signum)


def catch_signals() -> None:
    """SIGINT and SIGTERM raise :class:`Stopped` in the main thread: files are closed, the device
    lock released and the command's error printed, instead of a traceback (SIGINT) or a silent
    death (SIGTERM). Never in library code: the process entry calls it."""
    signal.signal(signal.SIGINT, _raise_stopped)
    signal.signal(signal.SIGTERM, _raise_stopped)


def stdout_gone() -> None:
    """stdout's reader went away (``abflip status --json | head -c 300``): a normal end for a CLI.
    What is still to be printed goes to /dev/null (also what Python flushes at exit)."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError):
        pass


def say(text: str, *, err: bool = False) -> None:
    """Print a line (flushed); a closed stdout is not an error (:func:`stdout_gone`)."""
    try:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)
    except BrokenPipeError:
        if not err:
            stdout_gone()


def interrupted(e: KeyboardInterrupt, where: Callable[[str], Interrupted] | None = None) -> Interrupted:
    """The error of a command stopped by a signal; ``where(signal name)`` says where its work stands."""
    signum = getattr(e, "signum", signal.SIGINT)
    name = signal.Signals(signum).name
    if where is not None:
        try:
            return where(name)
        except Exception:  # the state cannot be read: the plain message below still holds
            pass
    return Interrupted(f"interrupted ({name})", signum=signum)


def internal_error(e: BaseException) -> Error:
    """An exception abflip did not expect: a bug. One line (the traceback with ``--verbose``)."""
    if VERBOSE:
        import traceback

        traceback.print_exception(e, file=sys.stderr)
    return Error(f"{type(e).__name__}: {e}", hint="this is a bug in abflip: run the command again with --verbose for "
                                                   "the traceback, and report it")


def print_error(e: Error, as_json: bool, *, event: bool = False) -> int:
    """Print ``e`` (JSON on stdout with ``as_json``: ``{"error": ...}``, or a JSON-lines
    ``{"event": "error", ...}`` with ``event``; the text on stderr always); its exit code."""
    if as_json:
        say(json.dumps({"event": "error", "error": e.to_json()}, sort_keys=True) if event
               else json.dumps({"error": e.to_json()}, indent=1))
    say(e.diagnostics(), err=True)
    return e.exit_code


def report(fn: Callable[[], Any], as_json: bool, render: Callable[[Any], str],
           where: Callable[[str], Interrupted] | None = None) -> int:
    """Call ``fn``; print its result (JSON or rendered) or its error; the exit code (0: ok).
    ``where``: what an interrupted ``fn`` left (see :func:`interrupted`)."""
    try:
        result = fn()
    except Error as e:
        return print_error(e, as_json)
    except KeyboardInterrupt as e:
        return print_error(interrupted(e, where), as_json)
    except Exception as e:  # the CLI's top: whatever escaped is reported, not dumped
        return print_error(internal_error(e), as_json)
    if as_json:
        say(json.dumps(result, indent=1, sort_keys=True, default=str))
    elif text := render(result):
        say(text)
    return 0


def stream_events(fn: Callable[[Any], Any], as_json: bool, render: Callable[[Any], str],
                  where: Callable[[str], Interrupted] | None = None) -> int:
    """Run ``fn(progress)``: with ``as_json`` each progress event is a JSON line on stdout and the
    last line is ``{"event": "result", ...}`` or ``{"event": "error", ...}``; else no progress
    and the result rendered (typer's command adds a progress bar on a terminal). The exit code."""
    if not as_json:
        return report(lambda: fn(None), False, render, where)

    def emit(ev: dict) -> None:
        say(json.dumps(ev, sort_keys=True))

    try:
        result = fn(emit)
    except Error as e:
        return print_error(e, True, event=True)
    except KeyboardInterrupt as e:
        return print_error(interrupted(e, where), True, event=True)
    except Exception as e:
        return print_error(internal_error(e), True, event=True)
    say(json.dumps({"event": "result", "result": result}, sort_keys=True, default=str))
    return 0
