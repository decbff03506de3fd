"""The ``abflip`` command: thin wrappers that parse, call one function, render.

Commands live in :mod:`abflip.commands` (one module per audience); this module wires them up.

Exit codes: 0 ok; 1 unexpected internal error; 2 user/config error; 3 the repository served
bad data; 4 transport failure; 5 device (or local storage) problem; 6 refused by policy.
"""

from __future__ import annotations

from .commands import demo, device, producer, repo  # noqa: F401  (they register their commands)
from .commands import audit as _audit  # noqa: F401  (repo verify, repo gc)
from .commands._common import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
