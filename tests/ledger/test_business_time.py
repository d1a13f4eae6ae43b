from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.business_time import BusinessCalendar, add_business_duration, business_duration

NEW_YORK = ZoneInfo("America/New_York")
LONDON = ZoneInfo("Europe/London")
NINE_TO_FIVE = (((9 * 60, 17 * 60),),) * 5 + ((), ())
ALWAYS_OPEN = (((0, 1440),),) * 7
HOUR = timedelta(hours=1)


def calendar(
    zone: str,
    hours: tuple[tuple[tuple[int, int], ...], ...] = NINE_TO_FIVE,
    holidays: frozenset[date] = frozenset(),
) -> BusinessCalendar:
    return BusinessCalendar(zone, hours, holidays)


# Days on which the clocks change in 2026: (zone, local date, hours in that day).
DST_DAYS = [
    ("America/New_York", date(2026, 3, 8), 23),
    ("America/New_York", date(2026, 11, 1), 25),
    ("Europe/London", date(2026, 3, 29), 23),
    ("Europe/London", date(2026, 10, 25), 25),
]


@pytest.mark.parametrize(("zone", "day", "hours"), DST_DAYS)
def test_always_open_day_length_follows_dst(zone: str, day: date, hours: int) -> None:
    tz = ZoneInfo(zone)
    start = datetime.combine(day, datetime.min.time(), tzinfo=tz)
    end = datetime.combine(day + timedelta(days=1), datetime.min.time(), tzinfo=tz)
    assert business_duration(calendar(zone, ALWAYS_OPEN), start, end) == hours * HOUR


@pytest.mark.parametrize(("zone", "day", "hours"), DST_DAYS)
def test_night_shift_across_dst(zone: str, day: date, hours: int) -> None:
    # Open from midnight to 06:00 local time: the change falls inside the window.
    shift = calendar(zone, (((0, 360),),) * 7)
    tz = ZoneInfo(zone)
    start = datetime.combine(day, datetime.min.time(), tzinfo=tz)
    assert (
        business_duration(shift, start, start + 2 * timedelta(days=1))
        == (6 + 6 + hours - 24) * HOUR
    )
    due = add_business_duration(shift, start, 6 * HOUR)
    # The window contains 5 hours when the clocks go forward (6 hours end at 01:00 the next
    # night) and 7 when they go back (6 hours end at 05:00 the same night).
    if hours == 23:
        expected = datetime.combine(day + timedelta(days=1), datetime.min.time(), tzinfo=tz) + HOUR
    else:
        expected = datetime(day.year, day.month, day.day, 5, tzinfo=tz)
    assert due == expected


@pytest.mark.parametrize(("zone", "day", "hours"), DST_DAYS)
def test_office_hours_keep_wall_times_across_dst(zone: str, day: date, hours: int) -> None:
    tz = ZoneInfo(zone)
    office = calendar(zone)
    # The Friday before the Sunday of the change, 16:00, plus 3 business hours: Monday 11:00.
    friday = day - timedelta(days=2)
    start = datetime(friday.year, friday.month, friday.day, 16, tzinfo=tz)
    due = add_business_duration(office, start, 3 * HOUR)
    monday = day + timedelta(days=1)
    assert due == datetime(monday.year, monday.month, monday.day, 11, tzinfo=tz)
    assert business_duration(office, start, due) == 3 * HOUR
    assert due - start == (67 + hours - 24) * HOUR


def test_holiday_is_skipped() -> None:
    office = calendar("America/New_York", holidays=frozenset({date(2026, 7, 3)}))
    thursday = datetime(2026, 7, 2, 16, tzinfo=NEW_YORK)
    due = add_business_duration(office, thursday, 2 * HOUR)
    assert due == datetime(2026, 7, 6, 10, tzinfo=NEW_YORK)
    assert business_duration(office, thursday, due) == 2 * HOUR


def test_start_outside_hours_waits_for_opening() -> None:
    office = calendar("Europe/London")
    saturday = datetime(2026, 6, 6, 12, tzinfo=LONDON)
    assert add_business_duration(office, saturday, HOUR) == datetime(2026, 6, 8, 10, tzinfo=LONDON)
    assert business_duration(office, saturday, datetime(2026, 6, 8, 9, tzinfo=LONDON)) == timedelta(
        0
    )


def test_duration_ending_at_closing_time() -> None:
    office = calendar("Europe/London")
    start = datetime(2026, 6, 8, 9, tzinfo=LONDON)
    assert add_business_duration(office, start, 8 * HOUR) == datetime(2026, 6, 8, 17, tzinfo=LONDON)


def test_reversed_interval_measures_zero() -> None:
    office = calendar("Europe/London")
    start = datetime(2026, 6, 8, 12, tzinfo=LONDON)
    assert business_duration(office, start, start - HOUR) == timedelta(0)


def test_negative_duration_rejected() -> None:
    with pytest.raises(ValueError, match="negative"):
        add_business_duration(calendar("Europe/London"), datetime(2026, 1, 1, tzinfo=UTC), -HOUR)


def test_calendar_of_holidays_only_gives_up() -> None:
    start = date(2026, 1, 1)
    every_day = frozenset(start + timedelta(days=n) for n in range(4000))
    closed = calendar("Europe/London", holidays=every_day)
    with pytest.raises(ValueError, match="no opening time left"):
        add_business_duration(closed, datetime(2026, 1, 1, tzinfo=UTC), HOUR)


@pytest.mark.parametrize(
    "hours",
    [
        (((9 * 60, 17 * 60),),) * 6,
        ((),) * 7,
        (((600, 500),),) + ((),) * 6,
        (((60, 120), (100, 200)),) + ((),) * 6,
        (((0, 1500),),) + ((),) * 6,
    ],
)
def test_invalid_weekly_hours_rejected(hours: tuple[tuple[tuple[int, int], ...], ...]) -> None:
    with pytest.raises(ValueError):
        calendar("Europe/London", hours)


# Property tests over random calendars in zones with DST (Lord Howe moves by 30 minutes).
ZONES = ["America/New_York", "Europe/London", "Australia/Lord_Howe"]


@st.composite
def calendars(draw: st.DrawFn) -> BusinessCalendar:
    week = []
    for _ in range(7):
        cuts = sorted(draw(st.sets(st.integers(0, 48), max_size=6)))
        windows = tuple((cuts[i] * 30, cuts[i + 1] * 30) for i in range(0, len(cuts) - 1, 2))
        week.append(windows)
    if not any(week):
        week[0] = ((9 * 60, 17 * 60),)
    holidays = draw(st.frozensets(st.dates(date(2025, 12, 20), date(2027, 1, 10)), max_size=40))
    return BusinessCalendar(draw(st.sampled_from(ZONES)), tuple(week), holidays)


instants = st.datetimes(
    min_value=datetime(2026, 1, 1), max_value=datetime(2026, 12, 31), timezones=st.just(UTC)
)
durations = st.integers(0, 400 * 3600 * 10**6).map(lambda us: timedelta(microseconds=us))


@settings(max_examples=300, deadline=None)
@given(calendar=calendars(), points=st.lists(instants, min_size=3, max_size=3))
def test_measure_additive_and_not_negative(
    calendar: BusinessCalendar, points: list[datetime]
) -> None:
    a, b, c = sorted(points)
    assert business_duration(calendar, a, b) >= timedelta(0)
    assert business_duration(calendar, c, a) == timedelta(0)
    assert business_duration(calendar, a, c) == business_duration(
        calendar, a, b
    ) + business_duration(calendar, b, c)


@settings(max_examples=200, deadline=None)
@given(calendar=calendars(), points=st.lists(instants, min_size=4, max_size=4))
def test_measure_unchanged_by_split_point(
    calendar: BusinessCalendar, points: list[datetime]
) -> None:
    a, d = min(points), max(points)
    first, second = points[1], points[2]
    one = business_duration(calendar, a, first) + business_duration(calendar, first, d)
    two = business_duration(calendar, a, second) + business_duration(calendar, second, d)
    assert one == two


@settings(max_examples=300, deadline=None)
@given(calendar=calendars(), start=instants, duration=durations)
def test_add_then_measure_round_trips(
    calendar: BusinessCalendar, start: datetime, duration: timedelta
) -> None:
    due = add_business_duration(calendar, start, duration)
    assert due >= start
    assert business_duration(calendar, start, due) == duration
    # The due time is the first instant with that much opening time behind it.
    if duration > timedelta(0):
        assert business_duration(calendar, start, due - timedelta(microseconds=1)) < duration
