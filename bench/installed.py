"""The environment an installed abflip runs in, for the benchmarks that time its processes.

pip compiles a package's modules when it installs it (as the device image's ``/opt/abflip``
has them: ``ci/image-install.sh``); a source checkout under ``PYTHONDONTWRITEBYTECODE=1``, as
this project's CI machines are, compiles abflip's modules again in every process (about 0.05 s
of CPU for an install). :func:`installed_env` gives the benchmark's processes a bytecode cache of
their own (``PYTHONPYCACHEPREFIX`` in the benchmark's work directory, written once here), so
they start as an installed abflip does; ``cached=False`` keeps the environment as it is.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("abflip", "applier", "metadata")  # what a device's abflip imports (builder/ is the producer's)


def installed_env(work: Path, cached: bool = True) -> dict[str, str]:
    """``os.environ`` for a timed abflip process; with ``cached`` its bytecode compiled into
    ``work/pycache`` first (as pip does at install)."""
    env = dict(os.environ)
    if not cached:
        return env
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    subprocess.run([sys.executable, "-m", "compileall", "-q", *(str(ROOT / p) for p in PACKAGES)], env=env,
                   check=True, stdout=subprocess.DEVNULL)
    return env
