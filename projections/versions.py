"""Row versions by valid time: what an incident row was at every moment before its last event.

A fold of an incident's events that happened by T (kept in log order) gives its row as of
T. The live row is that fold for every T from the row's `latest_occurred_at` on. For the
moments before, a model can keep versions: the row as it stood from `valid_from` up to,
not including, `valid_to`. With them, a query as of any T reads, for each incident, the live
row when `latest_occurred_at <= T` or else the version whose interval contains T, and folds
nothing.

While an incident's events arrive in valid-time order, each event closes the previous row
as a version, from that row's `latest_occurred_at` to the event's `occurred_at`. An event
that happened before the row's `latest_occurred_at` changes the row at earlier moments
too, so the incident's versions are computed again from all its events
(`stream_versions`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ledger.events import RecordedEvent


@dataclass(frozen=True, slots=True)
class RowVersion:
    """An incident row as it was from `valid_from` up to, not including, `valid_to`."""

    tenant_id: str
    state: Any
    valid_from: datetime
    valid_to: datetime


class VersionTracker:
    """A collector of the versions that a fold closes, event by event.

    `step` is called with each incident event and the row before and after it, rows that
    have a `latest_occurred_at`. Incidents whose events came out of valid-time order, or
    whose row was removed, are listed in `recompute`, and `closed` drops their versions.
    """

    def __init__(self) -> None:
        self._versions: list[tuple[Any, RowVersion]] = []
        self.recompute: set[Any] = set()

    def step(self, key: Any, tenant_id: str, before: Any, after: Any, at: datetime) -> None:
        if before is None or key in self.recompute:
            return
        latest = before.latest_occurred_at
        if after is None or at < latest:
            self.recompute.add(key)
        elif at > latest:
            self._versions.append((key, RowVersion(tenant_id, before, latest, at)))

    def closed(self) -> list[RowVersion]:
        """Return the versions closed in order, less those of incidents to recompute."""
        return [version for key, version in self._versions if key not in self.recompute]


def stream_versions(
    tenant_id: str,
    events: Sequence[RecordedEvent],
    fold: Callable[[Any, RecordedEvent], Any],
) -> list[RowVersion]:
    """Return the versions of one incident row, from all its events in log order.

    For each moment at which one of its events happened, the row is the fold of the events
    that happened by then. From `latest_occurred_at` on, the last such row is the live row,
    not a version. Folds each prefix of the valid-time order again, so it takes time
    quadratic in the number of the incident's events; an incident has few.
    """
    final = _fold(events, fold, None)
    if final is None:
        return []
    moments = sorted({event.occurred_at for event in events})
    versions: list[RowVersion] = []
    for start, end in zip(moments, moments[1:], strict=False):
        if start >= final.latest_occurred_at:
            break
        state = _fold(events, fold, start)
        if state is None:
            continue
        if versions and versions[-1].valid_to == start and versions[-1].state == state:
            # An event that changed nothing (one the fold skips before the report) splits
            # no interval, as in `VersionTracker`.
            versions[-1] = RowVersion(tenant_id, state, versions[-1].valid_from, end)
        else:
            versions.append(RowVersion(tenant_id, state, start, end))
    return versions


def _fold(
    events: Sequence[RecordedEvent], fold: Callable[[Any, RecordedEvent], Any], by: datetime | None
) -> Any:
    state = None
    for event in events:
        if by is None or event.occurred_at <= by:
            state = fold(state, event)
    return state
