"""Semantic versions (semver.org 2.0.0): parse and order. Pure; no I/O."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from .errors import UserError

__all__ = ["Version"]

_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?\Z"  # \Z: "$" would also match before a final newline
)
MAX_LENGTH = 64


@functools.total_ordering
@dataclass(frozen=True)
class Version:
    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()
    build: str = ""

    @classmethod
    def parse(cls, text: str) -> Version:
        """Parse ``text`` or raise :class:`UserError` (callers re-root it when it came from a repository)."""
        if not isinstance(text, str) or len(text) > MAX_LENGTH or not (m := _SEMVER.fullmatch(text)):
            raise UserError(f"{text!r} is not a semantic version (MAJOR.MINOR.PATCH[-PRE][+BUILD])",
                            hint="use a version like 1.4.0 or 2.0.0-rc.1")
        pre = tuple(m.group(4).split(".")) if m.group(4) else ()
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3)), pre, m.group(5) or "")

    def __str__(self) -> str:
        s = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            s += "-" + ".".join(self.prerelease)
        if self.build:
            s += "+" + self.build
        return s

    def _key(self) -> tuple:
        # semver 11: a version without pre-release ranks above one with; build metadata is ignored.
        pre = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.prerelease)
        return (self.major, self.minor, self.patch, 1 if not self.prerelease else 0, pre)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Version) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __lt__(self, other: Version) -> bool:
        return self._key() < other._key()
