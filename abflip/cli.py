"""The ``abflip`` command: thin wrappers that parse, call one function, render.

Commands live in :mod:`abflip.commands` (one module per audience); this module wires them up.

Exit codes: 0 ok; 1 unexpected internal error; 2 user/config error; 3 the repository served
bad data; 4 transport failure; 5 device (or local storage) problem; 6 refused by policy.

Start-up (issue 14): the commands a device runs on every boot and timer tick (``status``,
``boot-check``, ``mark-good``, ``check``, ``run``, ...), its first boot's ``provision`` and the
operator's ``rollback`` are parsed here directly when their arguments are plain (``--config
PATH``/``-c PATH``, ``--json``, the command's own flags, provision's RELEASE and ``--slot X``),
and call the same function typer's command does (:mod:`abflip.commands._device`), without
importing typer at all: typer builds a pydantic adapter for every typed option (~0.1 s), and
itself costs ~0.03 s to import. On the reference device under QEMU (TCG) typer's way took
``mark-good`` 22 s instead of 8 (abflip-bless.service runs it on every boot).
Anything else (``--help``, ``--config=PATH``, a typo) goes to typer; what it refuses is printed
in the documented form (``error (user): ...``), never as typer's box.

The process entry (:func:`main`) also owns what is process-wide: SIGINT and SIGTERM end a
command with its error printed (exit 130/143), ``--verbose`` turns on debug logging, and a
closed stdout (``| head``) is a quiet, normal end (:mod:`abflip.commands._output`).
"""

from __future__ import annotations

import sys

# command -> its flags (dest, value) besides --config/-c and --json
_VERSION_FLAGS = {"--allow-downgrade": "allow_downgrade", "--retry-failed": "retry_failed"}
_FAST_FLAGS = {
    "status": {},
    "boot-check": {"--no-bless": "no_bless"},
    "mark-good": {"--no-health": "no_health"},
    "rollback": {},
    "check": _VERSION_FLAGS,
    # the streaming commands, unless a terminal wants typer's progress bar (see _run_fast)
    "download": _VERSION_FLAGS,
    "install": _VERSION_FLAGS,
    "apply": {"--now": "now"},
    "run": {**_VERSION_FLAGS, "--no-reboot": "no_reboot"},
    "provision": {"--force": "force"},
}
# command -> its options that take a value (option -> dest), and its one argument (dest)
_FAST_VALUES = {"provision": {"--slot": "slot"}}
_FAST_ARGUMENT = {"provision": "release"}
_STREAMING = ("download", "install", "apply", "run", "provision")


# Client libraries of the cloud and hardware signers that securesystemslib.signer imports, each
# behind ``try: import ... except ImportError`` (tuf.api.metadata imports securesystemslib.signer).
# A device only verifies, with public keys (cryptography), so a device command's *process* marks
# them absent: boto3 alone costs ~0.4 s per command on a machine that has it installed. Done
# here, at the process entry, never in library code (an in-process caller keeps its boto3).
SIGNER_ONLY_LIBRARIES = ("boto3", "botocore", "s3transfer", "azure", "google.cloud", "hvac", "pkcs11", "keylet",
                         "sigstore")
DEVICE_COMMANDS = ("status", "check", "download", "apply", "run", "install", "boot-check", "mark-good", "rollback",
                   "reset-state", "provision", "history")


def _without_signer_libraries() -> None:
    for name in SIGNER_ONLY_LIBRARIES:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]  # "import name" raises ImportError


def _fast_args(argv: list[str]) -> tuple[str, dict] | None:
    """``(command, keyword arguments)`` for a plain device command line, else None."""
    if not argv or argv[0] not in _FAST_FLAGS:
        return None
    cmd, flags = argv[0], _FAST_FLAGS[argv[0]]
    values = {"--config": "config", "-c": "config", **_FAST_VALUES.get(cmd, {})}
    argument = _FAST_ARGUMENT.get(cmd)
    kwargs: dict = {}
    rest = iter(argv[1:])
    for arg in rest:
        if arg in values and values[arg] not in kwargs:
            value = next(rest, None)
            if value is None or not value or value.startswith("-"):
                return None
            kwargs[values[arg]] = value
        elif arg == "--json" and "as_json" not in kwargs:
            kwargs["as_json"] = True
        elif arg in flags and flags[arg] not in kwargs:
            kwargs[flags[arg]] = True
        elif argument and argument not in kwargs and arg and not arg.startswith("-"):
            kwargs[argument] = arg
        else:
            return None
    if argument and argument not in kwargs:
        return None  # typer says what is missing
    return cmd, kwargs


def _run_fast(cmd: str, kwargs: dict) -> None:
    """Run a plain device command without typer and exit; return (to typer) only for a streaming
    command whose progress bar goes to a terminal."""
    as_json = kwargs.pop("as_json", False)
    streaming = cmd in _STREAMING
    if streaming and not as_json and sys.stderr.isatty():
        return
    from pathlib import Path

    from .commands import _device as device
    from .commands._output import stream_events

    kwargs["config"] = Path(kwargs["config"]) if "config" in kwargs else device.DEFAULT_CONFIG
    if streaming:
        fn, render, where = device.STREAMING[cmd](**kwargs)
        sys.exit(stream_events(fn, as_json, render, where))
    fn = {"status": device.status, "boot-check": device.boot_check, "mark-good": device.mark_good,
          "rollback": device.rollback, "check": device.check}[cmd]
    sys.exit(fn(**kwargs, as_json=as_json))


def _app():
    from .commands import demo, device, producer, repo  # noqa: F401  (they register their commands)
    from .commands import audit as _audit  # noqa: F401  (repo verify, repo gc)
    from .commands import meta as _meta  # noqa: F401  (completion, man)
    from .commands._common import app

    return app


def __getattr__(name: str):
    if name == "app":  # ``from abflip.cli import app`` (tests, typer's testing runner)
        return _app()
    raise AttributeError(name)


def _verbose(argv: list[str]) -> list[str]:
    """``--verbose`` anywhere before ``--``: debug logging of every layer on stderr (HTTP
    requests, TUF, storage, hooks), and tracebacks of internal errors. Taken out of the
    arguments here, so it works before or after the command and on the fast path."""
    end = argv.index("--") if "--" in argv else len(argv)
    if "--verbose" not in argv[:end]:
        return argv
    import logging

    from .commands import _output

    _output.VERBOSE = True
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="abflip: %(name)s: %(message)s")
    for noisy in ("botocore", "s3transfer", "markdown_it"):  # their DEBUG is every hook and parser step
        logging.getLogger(noisy).setLevel(logging.INFO)
    return [a for a in argv[:end] if a != "--verbose"] + argv[end:]


def _usage_error(e, argv: list[str]) -> int:
    """A command line typer/click refused, in the documented form (``error (user): ...``, JSON
    under ``--json``; a JSON-lines error event for the streaming commands)."""
    from metadata.errors import UserError

    from .commands._output import print_error

    ctx = getattr(e, "ctx", None)
    path = ctx.command_path if ctx is not None else "abflip"
    msg = e.format_message().strip().rstrip(".")
    param = getattr(e, "param", None)
    if param is not None and getattr(param, "param_type_name", None) == "argument":  # 'release_dir' -> RELEASE_DIR
        msg = msg.replace(f"'{param.name}'", param.name.upper())
    if msg[:1].isupper() and not msg[1:2].isupper():
        msg = msg[0].lower() + msg[1:]
    err = UserError(f"{path}: {msg}", hint=f"'{path} --help' lists its arguments and options")
    streaming = ctx is not None and ctx.info_name in ("download", "apply", "run", "install", "provision")
    return print_error(err, "--json" in argv, event=streaming)


def _typer(argv: list[str]) -> int:
    """Everything but the fast path: typer parses, the command runs and prints (its errors
    through :mod:`.commands._output`); what typer itself refuses is printed here."""
    import os

    import typer

    try:
        from typer._click import exceptions as click  # typer vendors click (0.2x)
    except ImportError:  # older typer: click itself
        from click import exceptions as click  # type: ignore[no-redef]

    app = _app()
    if "_ABFLIP_COMPLETE" in os.environ:  # the shell asks (abflip completion SHELL): typer answers
        from typer.completion import completion_init

        completion_init()
    was_devnull = _is_devnull(1)
    try:
        rv = app(args=argv, prog_name="abflip", standalone_mode=False)
    except click.NoArgsIsHelpError:
        return 2  # the help was printed (abflip, abflip repo, ... without a command)
    except click.ClickException as e:
        return _usage_error(e, argv)
    except SystemExit as e:
        # rich's and typer's answer to a closed stdout (`abflip --help | head`): stdout onto
        # /dev/null, exit 1. A normal end here.
        if e.code == 1 and (_stdout_broken() or (_is_devnull(1) and not was_devnull)):
            return 0
        raise
    except typer.Abort:  # Ctrl-C at a prompt
        from metadata.errors import Interrupted

        from .commands._output import print_error

        return print_error(Interrupted("interrupted (SIGINT)", signum=2), "--json" in argv)
    return rv if isinstance(rv, int) else 0


def _is_devnull(fd: int) -> bool:
    import os

    try:
        return os.path.samestat(os.fstat(fd), os.stat(os.devnull))
    except OSError:
        return False


def _stdout_broken() -> bool:
    """Is stdout a pipe whose reader has gone (poll says POLLERR)?"""
    import select

    try:
        p = select.poll()
        p.register(1, select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in p.poll(0))
    except (OSError, ValueError):
        return False


def main() -> None:
    from .commands._output import catch_signals, internal_error, print_error, stdout_gone

    catch_signals()
    argv = _verbose(sys.argv[1:])
    if argv[:1] and argv[0] in DEVICE_COMMANDS:
        _without_signer_libraries()
    try:
        if (fast := _fast_args(argv)) is not None:
            _run_fast(*fast)
        code = _typer(argv)
    except BrokenPipeError:
        if not _stdout_broken():
            raise
        stdout_gone()  # `abflip --help | head`: a normal end
        code = 0
    except KeyboardInterrupt as e:  # a signal outside any command (while typer parses or imports)
        code = 128 + getattr(e, "signum", 2)  # 130 for SIGINT, 143 for SIGTERM
    except Exception as e:
        code = print_error(internal_error(e), "--json" in argv)
    sys.exit(code)


if __name__ == "__main__":
    main()
