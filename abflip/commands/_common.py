"""Shared pieces of the command modules: the typer apps, options, and the one error handler."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer

from ._device import DEFAULT_CONFIG
from ._output import report

__all__ = ["app", "image_app", "release_app", "repo_app", "channel_app", "run", "CONFIG_OPT", "JSON_OPT"]

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Atomic A/B OS image updates with TUF and systemd-boot.")
image_app = typer.Typer(no_args_is_help=True, help="Producer: build root filesystem images.")
release_app = typer.Typer(no_args_is_help=True, help="Producer: assemble releases.")
repo_app = typer.Typer(no_args_is_help=True, help="Producer: the TUF repository.")
channel_app = typer.Typer(no_args_is_help=True, help="Producer: channel pointers.")


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        print(f"abflip {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print abflip's version and exit"),
          verbose: bool = typer.Option(False, "--verbose", help="debug logging on stderr (HTTP, TUF, storage, hooks) "
                                                                "and tracebacks; may also follow the command")) -> None:
    """Atomic A/B OS image updates with TUF and systemd-boot."""


app.add_typer(image_app, name="image")
app.add_typer(release_app, name="release")
app.add_typer(repo_app, name="repo")
app.add_typer(channel_app, name="channel")

CONFIG_OPT = typer.Option(DEFAULT_CONFIG, "--config", "-c", help="device configuration file")
JSON_OPT = typer.Option(False, "--json", help="machine-readable output")


def run(fn: Callable[[], Any], as_json: bool, render: Callable[[Any], str], where=None) -> None:
    """Call ``fn``; print its result (JSON or rendered) or its error, and exit with the error's code."""
    if code := report(fn, as_json, render, where):
        raise typer.Exit(code)
