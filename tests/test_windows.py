"""Maintenance windows (applier/windows.py): pure, the clock is an argument."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from applier.windows import WindowError, in_window, next_window, parse_window

BERLIN = ZoneInfo("Europe/Berlin")


def at(y, mo, d, h, mi, tz=UTC):
    return datetime(y, mo, d, h, mi, tzinfo=tz)


def test_weekly_window_in_its_time_zone():
    w = [parse_window("Sat 01:00-05:00 Europe/Berlin")]
    # 2026-11-28 is a Saturday; Berlin is UTC+1 in November
    assert not in_window(w, at(2026, 11, 28, 0, 30, BERLIN))
    assert in_window(w, at(2026, 11, 28, 1, 0, BERLIN))
    assert in_window(w, at(2026, 11, 28, 3, 59))  # 04:59 Berlin
    assert not in_window(w, at(2026, 11, 28, 4, 0))  # 05:00 Berlin: the end is exclusive
    assert not in_window(w, at(2026, 11, 29, 2, 0, BERLIN))  # Sunday


def test_span_crossing_midnight_belongs_to_its_start_day():
    w = [parse_window("Fri 23:00-02:00")]  # UTC by default
    assert in_window(w, at(2026, 11, 27, 23, 30))  # Friday night
    assert in_window(w, at(2026, 11, 28, 1, 59))  # Saturday early
    assert not in_window(w, at(2026, 11, 28, 2, 0))
    assert not in_window(w, at(2026, 11, 28, 23, 30))  # Saturday night is not a window
    assert not in_window(w, at(2026, 11, 27, 1, 0))  # Friday early is Thursday's span: not one


def test_day_lists_ranges_and_daily():
    assert parse_window("Mon-Fri 02:00-03:00").days == frozenset(range(5))
    assert parse_window("Fri-Mon 02:00-03:00").days == frozenset({4, 5, 6, 0})
    assert parse_window("Sat,Sun 02:00-03:00").days == frozenset({5, 6})
    assert parse_window("daily 00:00-00:00").days == frozenset(range(7))
    assert in_window([parse_window("* 00:00-24:00")], at(2026, 3, 4, 12, 0))


def test_next_window_is_the_open_one_or_the_next_to_open():
    w = [parse_window("Sat 01:00-05:00 Europe/Berlin"), parse_window("Wed 12:00-13:00 UTC")]
    start, end = next_window(w, at(2026, 11, 27, 12, 0))  # Friday noon UTC
    assert (start, end) == (at(2026, 11, 28, 0, 0), at(2026, 11, 28, 4, 0))
    start, end = next_window(w, at(2026, 11, 28, 2, 0))  # inside: the current one
    assert start == at(2026, 11, 28, 0, 0)
    start, _ = next_window(w, at(2026, 11, 28, 5, 0))  # after it: next Wednesday
    assert start == at(2026, 12, 2, 12, 0)
    assert next_window([], at(2026, 1, 1, 0, 0)) is None
    assert in_window([], at(2026, 1, 1, 0, 0))  # no windows: no restriction


def test_daylight_saving_time_is_followed():
    w = [parse_window("Sun 01:00-05:00 Europe/Berlin")]
    # 2026-03-29: Berlin moves from UTC+1 to UTC+2 at 02:00 local
    start, end = next_window(w, at(2026, 3, 28, 12, 0))
    assert start == at(2026, 3, 29, 0, 0) and end == at(2026, 3, 29, 3, 0)  # 3 hours long that night
    start, _ = next_window(w, at(2026, 4, 1, 0, 0))
    assert start == at(2026, 4, 4, 23, 0)  # 01:00 CEST


@pytest.mark.parametrize("text, why", [
    ("Sat 01:00-05:00 Mars/Olympus", "unknown time zone"),
    ("Caturday 01:00-05:00", "not a day"),
    ("Sat 1-5", "not a span"),
    ("Sat 25:00-05:00", "not a valid time"),
    ("Sat", "expected"),
    ("Sat 01:00-05:00 UTC extra", "expected"),
])
def test_bad_windows_say_what_is_wrong(text, why):
    with pytest.raises(WindowError, match=why):
        parse_window(text)


def test_naive_now_is_refused():
    with pytest.raises(ValueError):
        in_window([parse_window("Sat 01:00-05:00")], datetime(2026, 1, 1))
