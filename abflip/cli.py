"""The ``abflip`` command: thin wrappers that parse, call one function, render.

Commands live in :mod:`abflip.commands` (one module per audience); this module wires them up.

Exit codes: 0 ok; 1 unexpected internal error; 2 user/config error; 3 the repository served
bad data; 4 transport failure; 5 device (or local storage) problem; 6 refused by policy.

Start-up (issue 14): the commands a device runs on every boot and timer tick (``status``,
``boot-check``, ``check``) are parsed here directly when their arguments are plain
(``--config PATH``/``-c PATH``, ``--json``, and check's two flags), and call the same function
typer's command does (:mod:`abflip.commands._device`), without importing typer at all: typer
builds a pydantic adapter for every typed option (~0.1 s), and itself costs ~0.03 s to import.
Anything else (``--help``, ``--config=PATH``, a typo) goes to typer, which owns the messages.
"""

from __future__ import annotations

import sys

# command -> its flags (dest, value) besides --config/-c and --json
_VERSION_FLAGS = {"--allow-downgrade": "allow_downgrade", "--retry-failed": "retry_failed"}
_FAST_FLAGS = {
    "status": {},
    "boot-check": {"--no-bless": "no_bless"},
    "check": _VERSION_FLAGS,
    # the streaming commands, unless a terminal wants typer's progress bar (see _run_fast)
    "download": _VERSION_FLAGS,
    "install": _VERSION_FLAGS,
    "apply": {"--now": "now"},
    "run": {**_VERSION_FLAGS, "--no-reboot": "no_reboot"},
}


# Client libraries of the cloud and hardware signers that securesystemslib.signer imports, each
# behind ``try: import ... except ImportError`` (tuf.api.metadata imports securesystemslib.signer).
# A device only verifies, with public keys (cryptography), so a device command's *process* marks
# them absent: boto3 alone costs ~0.4 s per command on a machine that has it installed. Done
# here, at the process entry, never in library code (an in-process caller keeps its boto3).
SIGNER_ONLY_LIBRARIES = ("boto3", "botocore", "s3transfer", "azure", "google.cloud", "hvac", "pkcs11", "keylet",
                         "sigstore")
DEVICE_COMMANDS = ("status", "check", "download", "apply", "run", "install", "boot-check", "mark-good", "rollback",
                   "reset-state", "provision")


def _without_signer_libraries() -> None:
    for name in SIGNER_ONLY_LIBRARIES:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]  # "import name" raises ImportError


def _fast_args(argv: list[str]) -> tuple[str, dict] | None:
    """``(command, keyword arguments)`` for a plain device command line, else None."""
    if not argv or argv[0] not in _FAST_FLAGS:
        return None
    cmd, flags = argv[0], _FAST_FLAGS[argv[0]]
    kwargs: dict = {}
    rest = iter(argv[1:])
    for arg in rest:
        if arg in ("--config", "-c") and "config" not in kwargs:
            value = next(rest, None)
            if value is None or not value or value.startswith("-"):
                return None
            kwargs["config"] = value
        elif arg == "--json" and "as_json" not in kwargs:
            kwargs["as_json"] = True
        elif arg in flags and flags[arg] not in kwargs:
            kwargs[flags[arg]] = True
        else:
            return None
    return cmd, kwargs


def _run_fast(cmd: str, kwargs: dict) -> None:
    """Run a plain device command without typer and exit; return (to typer) only for a streaming
    command whose progress bar goes to a terminal."""
    as_json = kwargs.pop("as_json", False)
    streaming = cmd not in ("status", "boot-check", "check")
    if streaming and not as_json and sys.stderr.isatty():
        return
    from pathlib import Path

    from .commands import _device as device
    from .commands._output import stream_events

    kwargs["config"] = Path(kwargs["config"]) if "config" in kwargs else device.DEFAULT_CONFIG
    if streaming:
        fn, render = device.STREAMING[cmd](**kwargs)
        sys.exit(stream_events(fn, as_json, render))
    fn = {"status": device.status, "boot-check": device.boot_check, "check": device.check}[cmd]
    sys.exit(fn(**kwargs, as_json=as_json))


def _app():
    from .commands import demo, device, producer, repo  # noqa: F401  (they register their commands)
    from .commands import audit as _audit  # noqa: F401  (repo verify, repo gc)
    from .commands._common import app

    return app


def __getattr__(name: str):
    if name == "app":  # ``from abflip.cli import app`` (tests, typer's testing runner)
        return _app()
    raise AttributeError(name)


def main() -> None:
    if sys.argv[1:2] and sys.argv[1] in DEVICE_COMMANDS:
        _without_signer_libraries()
    if (fast := _fast_args(sys.argv[1:])) is not None:
        _run_fast(*fast)
    _app()()


if __name__ == "__main__":
    main()
