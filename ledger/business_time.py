"""Business time: durations that count only a calendar's opening hours.

A calendar has weekly opening hours in wall-clock time of one IANA time zone, and whole-day
holidays. Opening hours are turned into instants with zoneinfo for each date, so a day on
which the clocks change has 23 or 25 hours and the business hours inside it keep their wall
times. Durations are `timedelta`s, exact to the microsecond, so adding a business duration
and measuring it again returns the same duration.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import cached_property
from zoneinfo import ZoneInfo

MINUTES_PER_DAY = 24 * 60
# add_business_duration gives up when a target lies this many days past its start: a
# calendar whose hours are all holidays would otherwise loop for ever.
MAX_SEARCH_DAYS = 3700
# Dates whose intervals one calendar keeps; about 30 years of dates.
MAX_CACHED_DAYS = 11_000

# (start minute, end minute) after local midnight; an end of 1440 is the next midnight.
Window = tuple[int, int]


@dataclass(frozen=True)
class BusinessCalendar:
    """Weekly opening hours in one time zone, with whole-day holidays.

    `weekly_hours[0]` contains Monday's windows and `weekly_hours[6]` Sunday's, each sorted
    and not overlapping. A wall time that the clocks skip (a window starting at 02:30 on
    the night the clocks go forward) is read with the offset in force before the change,
    as PEP 495 reads it with fold=0.
    """

    time_zone: str
    weekly_hours: tuple[tuple[Window, ...], ...]
    holidays: frozenset[date] = frozenset()
    # The opening intervals of each date computed so far: zoneinfo conversions dominate
    # the cost of a due time, and an SLA fold needs the same dates again and again.
    _days: dict[date, tuple[tuple[datetime, datetime], ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        if len(self.weekly_hours) != 7:
            raise ValueError(
                f"weekly_hours needs 7 days, Monday first; got {len(self.weekly_hours)}"
            )
        for day in self.weekly_hours:
            previous_end = 0
            for start, end in day:
                if not 0 <= start < end <= MINUTES_PER_DAY or start < previous_end:
                    raise ValueError(f"invalid or overlapping window {start}..{end} in {day}")
                previous_end = end
        if not any(self.weekly_hours):
            raise ValueError("a business calendar needs at least one opening window a week")

    @cached_property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.time_zone)

    def open_intervals(self, first_day: date) -> Iterator[tuple[datetime, datetime]]:
        """Yield the opening intervals in UTC, in order, from `first_day` on.

        Ends at MAX_SEARCH_DAYS after `first_day`.
        """
        previous_end = datetime.min.replace(tzinfo=UTC)
        for offset in range(MAX_SEARCH_DAYS):
            for start, end in self._day_intervals(first_day + timedelta(days=offset)):
                # max() keeps intervals in order when a skipped wall time maps backwards.
                start = max(start, previous_end)
                if end > start:
                    previous_end = end
                    yield start, end

    def _day_intervals(self, day: date) -> tuple[tuple[datetime, datetime], ...]:
        intervals = self._days.get(day)
        if intervals is None:
            windows = () if day in self.holidays else self.weekly_hours[day.weekday()]
            intervals = tuple(
                (self._instant(day, start), self._instant(day, end)) for start, end in windows
            )
            if len(self._days) < MAX_CACHED_DAYS:
                self._days[day] = intervals
        return intervals

    def _instant(self, day: date, minute: int) -> datetime:
        if minute == MINUTES_PER_DAY:
            day, minute = day + timedelta(days=1), 0
        wall = datetime.combine(day, time(minute // 60, minute % 60), tzinfo=self.zone)
        # Subtracting two aware times of one tzinfo ignores their offsets, so every
        # computation runs in UTC.
        return wall.astimezone(UTC)

    def local_day(self, moment: datetime) -> date:
        return moment.astimezone(self.zone).date()


def business_duration(calendar: BusinessCalendar, start: datetime, end: datetime) -> timedelta:
    """Measure the opening time of `calendar` between two aware instants.

    Returns zero when `end` is not after `start`.
    """
    if end <= start:
        return timedelta(0)
    start, end = start.astimezone(UTC), end.astimezone(UTC)
    total = timedelta(0)
    # The day before start's local date: a window ending after midnight may cover start.
    for opened, closed in calendar.open_intervals(calendar.local_day(start) - timedelta(days=1)):
        if opened >= end:
            break
        overlap = min(closed, end) - max(opened, start)
        if overlap > timedelta(0):
            total += overlap
    return total


def add_business_duration(
    calendar: BusinessCalendar, start: datetime, duration: timedelta
) -> datetime:
    """Return the instant at which `duration` of opening time has passed since `start`.

    A duration that ends exactly at closing time returns the closing time, not the next
    opening. Raises ValueError for a negative duration, or when the calendar has no
    opening time left within MAX_SEARCH_DAYS.
    """
    if duration < timedelta(0):
        raise ValueError(f"business duration {duration} is negative")
    start = start.astimezone(UTC)
    if duration == timedelta(0):
        return start
    remaining = duration
    for opened, closed in calendar.open_intervals(calendar.local_day(start) - timedelta(days=1)):
        if closed <= start:
            continue
        available = closed - max(opened, start)
        if remaining <= available:
            return max(opened, start) + remaining
        remaining -= available
    raise ValueError(
        f"calendar in {calendar.time_zone} has no opening time left within "
        f"{MAX_SEARCH_DAYS} days of {start.isoformat()}"
    )
