"""Errors rooted by blame (DESIGN.md invariant 9).

Every error abflip raises on purpose derives from :class:`Error`, and from exactly one
root that says who is to blame and therefore what to do:

- :class:`RepositoryError`: the repository served bad data (bad signature, hash mismatch,
  expired metadata, malformed manifest). Nothing on the device changed; tell the publisher.
- :class:`TransportError`: the network failed (refused, timed out, cut short). Retry later.
- :class:`DeviceError`: the device is wrong (slot too small, ESP missing, booted slot unknown).
- :class:`UserError`: the user's configuration or input is wrong (bad config key, bad version).
- :class:`PolicyError`: the request is well-formed but refused by policy (not newer than the
  floor, wrong hardware, outside a maintenance window).
- :class:`Interrupted`: a signal stopped the command (SIGINT, SIGTERM); its exit code is the
  shell's convention, 128 + the signal number (130, 143).

Library code raises these and never prints or exits; the CLI renders ``diagnostics()`` and
exits with ``exit_code``. Local ``OSError`` that is not understood is left alone.
"""

from __future__ import annotations

__all__ = [
    "Error",
    "InternalError",
    "RepositoryError",
    "TransportError",
    "DeviceError",
    "UserError",
    "PolicyError",
    "Interrupted",
    "EXIT_CODES",
]


class Error(Exception):
    """Base of all abflip errors. ``hint`` says what to do about it."""

    exit_code = 1
    blame = "internal"
    default_hint = ""
    #: recorded as the device's ``last_error``; a refusal of an interactive verb in the wrong
    #: phase (``apply`` with nothing staged) is not (:func:`applier.lifecycle.require`)
    recorded = True

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def diagnostics(self) -> str:
        text = f"error ({self.blame}): {self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text

    def to_json(self) -> dict[str, str]:
        return {"blame": self.blame, "type": type(self).__name__, "message": self.message, "hint": self.hint}


class InternalError(Error):
    """A bug: abflip reached a state its own rules say cannot happen (never the user's fault)."""

    default_hint = "this is a bug in abflip; nothing further was changed. Please report it with this message"


class UserError(Error):
    exit_code = 2
    blame = "user"
    default_hint = "nothing was changed: correct what the message names and run it again (--help lists the options)"


class RepositoryError(Error):
    exit_code = 3
    blame = "repository"
    default_hint = "the repository served data that failed verification; nothing was installed. Tell the publisher"


class TransportError(Error):
    exit_code = 4
    blame = "transport"
    default_hint = "the download failed; check the network and retry (a later run resumes)"


class DeviceError(Error):
    exit_code = 5
    blame = "device"
    default_hint = "check the slot devices, the ESP and the state directory"


class PolicyError(Error):
    exit_code = 6
    blame = "policy"
    default_hint = "nothing was changed"


class Interrupted(Error):
    """A signal stopped the command (Ctrl-C, or systemd stopping the unit): not a failure of
    anything. The CLI makes it from the signal and says where the work stands."""

    blame = "interrupted"
    default_hint = "run the command again: an interrupted abflip command leaves nothing a re-run does not finish"

    def __init__(self, message: str, *, signum: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.signum = signum
        self.exit_code = 128 + signum


EXIT_CODES = {cls.__name__: cls.exit_code for cls in (UserError, RepositoryError, TransportError, DeviceError, PolicyError)}
