"""abflip demo."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import app, run
from ._output import say


@app.command("demo")
def demo(workdir: Optional[Path] = typer.Option(None, help="keep everything in this directory (new, empty, or an "
                                                                "earlier demo's: it is cleared first)")) -> None:
    """Build, publish and install v1 -> v2 on a simulated device over HTTP on 127.0.0.1."""
    from ..demo import run_demo

    def go() -> dict:
        run_demo(workdir, out=say)
        return {}

    run(go, False, lambda r: "")
