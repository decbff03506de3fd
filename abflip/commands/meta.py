"""Commands about abflip itself: shell completion and the manual page, both generated from the
command tree typer builds (so neither can fall behind a new command or option).

- ``abflip completion bash|zsh|fish`` prints the shell's completion script; the shell then calls
  ``abflip`` with ``_ABFLIP_COMPLETE`` set, and typer answers from the same tree.
- ``abflip man`` prints ``abflip(1)`` in roff (``abflip man > /usr/local/share/man/man1/abflip.1``;
  ``abflip man | man -l -`` to read it now): every command with its arguments, options,
  defaults and environment variables, then exit status, environment and files.
"""

from __future__ import annotations

from typing import Any

import typer

from ._common import app

SHELLS = ("bash", "zsh", "fish")
COMPLETE_VAR = "_ABFLIP_COMPLETE"

# What the manual says besides the commands (README "Command line", docs/device.md, docs/producer.md).
EXIT_STATUS = (
    ("0", "success"),
    ("1", "internal error (a bug): error (internal)"),
    ("2", "the command line, the configuration or the input is wrong: error (user)"),
    ("3", "the repository served bad data: error (repository)"),
    ("4", "transport failure (network, S3 endpoint): error (transport)"),
    ("5", "device (slots, ESP, state, hooks) or storage (the repository directory or bucket written): "
          "error (device), error (storage)"),
    ("6", "refused by policy (not newer, wrong hardware, outside a maintenance window): error (policy)"),
    ("130, 143", "interrupted by SIGINT or SIGTERM: error (interrupted); the next run resumes"),
)
ENVIRONMENT = (
    ("ABFLIP_ENDPOINT_URL, ABFLIP_REGION, ABFLIP_PROFILE",
     "defaults of --endpoint-url, --region and --profile of every command that takes an s3:// repository; "
     "credentials come from boto3's chain (AWS_ACCESS_KEY_ID, AWS_PROFILE, roles)"),
    ("SOURCE_DATE_EPOCH", "image build: the timestamp of every file; release create: release.json's \"created\""),
)
FILES = (
    ("/etc/abflip/abflip.toml", "the device configuration (--config); every key is in docs/device.md"),
    ("/etc/abflip/root.json", "the trusted TUF root the device was shipped with (repository.trusted_root)"),
    ("/var/lib/abflip/", "the device's state (paths.state_dir): state.json, history.jsonl (abflip history), lock, "
                         "the TUF cache and the staged release"),
    ("/etc/abflip/hooks/", "pre-install.d/, post-install.d/ and health-check.d/ hooks (hooks.dir)"),
)


@app.command("completion")
def completion(shell: str = typer.Argument(..., help="bash, zsh or fish")) -> None:
    """Print the shell completion script: e.g. abflip completion bash > /etc/bash_completion.d/abflip"""
    from typer.completion import get_completion_script

    from metadata.errors import UserError

    from ._common import run

    def go() -> str:
        if shell not in SHELLS:
            raise UserError(f"no completion for shell {shell!r}", hint=f"one of: {', '.join(SHELLS)}")
        return get_completion_script(prog_name="abflip", complete_var=COMPLETE_VAR, shell=shell).strip("\n")

    run(go, False, lambda text: text)


@app.command("man")
def man() -> None:
    """Print the abflip(1) manual page (roff): abflip man | man -l -"""
    import typer.main

    from ._output import say

    say(man_page(typer.main.get_command(app)).rstrip("\n"))


# -- the manual page ---------------------------------------------------------------------------
def _roff(text: str) -> str:
    """Plain text as roff: backslashes escaped; no line may start with a control character."""
    text = text.replace("\\", "\\e")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in text.splitlines())


def _opt(name: str) -> str:
    return "\\fB" + name.replace("-", "\\-") + "\\fR"


def walk(group: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every command under ``group`` (depth first, by name), with its path of names."""
    try:
        from typer import _click as click
    except ImportError:  # older typer: click itself
        import click  # type: ignore[no-redef]

    ctx = click.Context(group, info_name="abflip")
    out = []
    for name in sorted(group.list_commands(ctx)):
        cmd = group.get_command(ctx, name)
        if cmd is None or getattr(cmd, "hidden", False):
            continue
        if hasattr(cmd, "list_commands"):
            out += walk(cmd, (*path, name))
        else:
            out.append(((*path, name), cmd))
    return out


def _params(cmd: Any) -> tuple[list[Any], list[Any]]:
    args = [p for p in cmd.params if not getattr(p, "opts", [""])[0].startswith("-")]
    opts = [p for p in cmd.params if p not in args and not getattr(p, "hidden", False)]
    return args, opts


def _synopsis(path: tuple[str, ...], cmd: Any) -> str:
    args, opts = _params(cmd)
    words = [f"[{a.name.upper()}]" if not a.required else a.name.upper() for a in args]
    return " ".join(["abflip", *path, *words] + (["[OPTIONS]"] if opts else []))


def _option(p: Any) -> list[str]:
    names = ", ".join(_opt(o) for o in [*p.opts, *p.secondary_opts])
    value = "" if getattr(p, "is_flag", False) else " \\fI" + p.name.upper() + "\\fR"
    more = []
    if getattr(p, "required", False):
        more.append("required")
    elif not getattr(p, "is_flag", False) and p.default not in (None, [], ()):
        more.append(f"default: {p.default}")
    if getattr(p, "multiple", False):
        more.append("repeatable")
    if p.envvar:
        more.append(f"env: {p.envvar}")
    text = (p.help or "").strip() + (f" [{'; '.join(more)}]" if more else "")
    return [".TP", names + value, _roff(text)]


def man_page(root: Any) -> str:
    """``abflip(1)`` in roff (man(7) macros), generated from the click command tree ``root``."""
    from .. import __version__

    lines = [f'.TH ABFLIP 1 "" "abflip {__version__}" "abflip manual"',
             ".SH NAME", "abflip \\- atomic A/B OS image updates with TUF and systemd-boot",
             ".SH SYNOPSIS", ".B abflip", "[\\fB\\-\\-verbose\\fR] \\fICOMMAND\\fR [\\fIARGUMENTS\\fR] [\\fIOPTIONS\\fR]",
             ".SH DESCRIPTION",
             _roff("abflip delivers whole operating-system images to A/B devices. The producer commands build an "
                   "image, compress it into verified chunks, sign it into a TUF repository (a directory or S3) and "
                   "move channels; the device commands stream a release into the inactive slot, verify every chunk "
                   "before it is decompressed, add a systemd-boot entry with boot counting, and bless or roll back "
                   "after the reboot."),
             ".PP",
             _roff("Every error prints \"error (BLAME): what\" and a \"hint:\" line on standard error (with --json "
                   "also as JSON on standard output); see EXIT STATUS."),
             ".SH GLOBAL OPTIONS",
             ".TP", _opt("--verbose"),
             _roff("debug logging of every layer on standard error (HTTP requests, TUF, storage, hooks) and the "
                   "traceback of an internal error; before or after the command"),
             ".TP", _opt("--version"), "print abflip's version and exit",
             ".TP", _opt("--help"), "the help of abflip or of any command",
             ".SH COMMANDS"]
    for path, cmd in walk(root):
        lines += [f'.SS "{_roff(_synopsis(path, cmd))}"', _roff((cmd.help or "").strip()).replace("\n\n", "\n.PP\n")]
        args, opts = _params(cmd)
        for a in args:
            lines += [".TP", "\\fI" + a.name.upper() + "\\fR", _roff((getattr(a, "help", None) or "").strip())]
        for p in opts:
            lines += _option(p)
    lines.append(".SH EXIT STATUS")
    for code, what in EXIT_STATUS:
        lines += [".TP", f"\\fB{code}\\fR", _roff(what)]
    lines.append(".SH ENVIRONMENT")
    for name, what in ENVIRONMENT:
        lines += [".TP", f"\\fB{name}\\fR", _roff(what)]
    lines.append(".SH FILES")
    for name, what in FILES:
        lines += [".TP", f"\\fI{name}\\fR", _roff(what)]
    lines += [".SH SEE ALSO", "\\fBsystemd-boot\\fR(7), \\fBbootctl\\fR(1), \\fBsystemd-bless-boot.service\\fR(8); "
              "the project's docs/ (architecture, device, producer, keys, formats)"]
    return "\n".join(line for line in lines if line != "") + "\n"
