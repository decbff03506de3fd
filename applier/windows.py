"""Maintenance windows: weekly spans of local time in a named time zone. Pure: no clock.

Syntax (one string per window, ``[maintenance] windows`` in the config)::

    "<days> <HH:MM>-<HH:MM> [<IANA time zone>]"

``<days>`` is a day (``Mon`` … ``Sun``), a range (``Mon-Fri``, ``Fri-Mon`` wraps), a comma list
of either (``Sat,Sun``), or ``*`` / ``daily``. The time zone defaults to ``UTC``. A span whose
end is not after its start crosses midnight: ``Sat 23:00-02:00`` runs from Saturday 23:00 to
Sunday 02:00 (the day names the *start*). ``00:00-00:00`` (or ``-24:00``) is the whole day.
Times are wall-clock in the zone, so a window follows daylight saving time; a start that falls
in a DST gap begins at the first instant after the gap (zoneinfo's ``fold=0`` reading).

Callers pass ``now`` (an aware datetime); nothing here reads the clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["DAYS", "Window", "WindowError", "in_window", "next_window", "parse_window"]

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_SPAN = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")


class WindowError(ValueError):
    """A window string that does not parse; the message says which part."""


@dataclass(frozen=True)
class Window:
    text: str
    days: frozenset[int]  # 0 = Monday, as datetime.weekday()
    start: int  # minutes after local midnight
    end: int  # minutes after local midnight of the start day (> start; may exceed 1440)
    tz: str

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.tz)

    def spans_around(self, now: datetime) -> list[tuple[datetime, datetime]]:
        """The window's occurrences (UTC start, UTC end) whose start day is within a week of ``now``."""
        zone = self.zone
        local = now.astimezone(zone).date()
        out = []
        for delta in range(-8, 9):
            d = local + timedelta(days=delta)
            if d.weekday() not in self.days:
                continue
            out.append((_at(d, self.start, zone), _at(d, self.end, zone)))
        return out


def _at(d: date, minutes: int, zone: ZoneInfo) -> datetime:
    d = d + timedelta(days=minutes // 1440)
    m = minutes % 1440
    return datetime.combine(d, time(m // 60, m % 60), tzinfo=zone).astimezone(UTC)


def _day(token: str, text: str) -> int:
    t = token.strip().lower()[:3]
    if t not in DAYS or token.strip().lower() not in (t, _full(t)):
        raise WindowError(f"{text!r}: {token!r} is not a day (Mon … Sun)")
    return DAYS.index(t)


def _full(abbr: str) -> str:
    return {"mon": "monday", "tue": "tuesday", "wed": "wednesday", "thu": "thursday", "fri": "friday",
            "sat": "saturday", "sun": "sunday"}[abbr]


def _days(spec: str, text: str) -> frozenset[int]:
    if spec.lower() in ("*", "daily"):
        return frozenset(range(7))
    days: set[int] = set()
    for part in spec.split(","):
        if "-" in part:
            a, b = (_day(x, text) for x in part.split("-", 1))
            n = (b - a) % 7
            days.update((a + i) % 7 for i in range(n + 1))
        else:
            days.add(_day(part, text))
    return frozenset(days)


def parse_window(text: str) -> Window:
    if not isinstance(text, str):
        raise WindowError(f"{text!r} is not a string")
    parts = text.split()
    if len(parts) not in (2, 3):
        raise WindowError(f"{text!r}: expected '<days> <HH:MM>-<HH:MM> [<time zone>]', e.g. 'Sat 01:00-05:00 Europe/Berlin'")
    days = _days(parts[0], text)
    m = _SPAN.match(parts[1])
    if not m:
        raise WindowError(f"{text!r}: {parts[1]!r} is not a span HH:MM-HH:MM")
    h1, m1, h2, m2 = (int(x) for x in m.groups())
    if h1 > 23 or m1 > 59 or h2 > 24 or m2 > 59 or (h2 == 24 and m2):
        raise WindowError(f"{text!r}: {parts[1]!r} is not a valid time of day")
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if end <= start:
        end += 1440  # crosses midnight (or the whole day when equal)
    tz = parts[2] if len(parts) == 3 else "UTC"
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise WindowError(f"{text!r}: unknown time zone {tz!r} (an IANA name such as Europe/Berlin)") from None
    return Window(text, days, start, end, tz)


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(UTC)


def in_window(windows: list[Window] | tuple[Window, ...], now: datetime) -> bool:
    """True when ``now`` is inside one of ``windows``; no windows means no restriction."""
    if not windows:
        return True
    return current_window(windows, now) is not None


def current_window(windows, now: datetime) -> tuple[datetime, datetime] | None:
    t = _utc(now)
    for w in windows:
        for start, end in w.spans_around(t):
            if start <= t < end:
                return start, end
    return None


def next_window(windows, now: datetime) -> tuple[datetime, datetime] | None:
    """The window ``now`` is in, else the next one to open: ``(start, end)`` in UTC.
    ``None`` when no windows are configured (updates may be applied at any time)."""
    if not windows:
        return None
    t = _utc(now)
    cur = current_window(windows, t)
    if cur:
        return cur
    upcoming = [(s, e) for w in windows for s, e in w.spans_around(t) if s > t]
    return min(upcoming) if upcoming else None
