"""Row versions by valid time, without a database: read at any moment, the live row and the
versions give the fold of the events that happened by then."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from ledger import lifecycle as lc
from ledger.events import RecordedEvent
from projections.sla import evolve_sla
from projections.versions import RowVersion, VersionTracker, stream_versions
from tests.projections.test_sla import T0, recorded

INCIDENT = uuid.UUID("5b0c52a4-4a55-4f0f-9d0e-0a4a1c3c7f10")
KINDS = [
    lc.REPORT_SUBMITTED,
    lc.INCIDENT_ACKNOWLEDGED,
    lc.INFORMATION_REQUESTED,
    lc.REPORTER_RESPONDED,
    lc.INCIDENT_RESOLVED,
    lc.INCIDENT_REOPENED,
    lc.INCIDENT_CLOSED,
]


def _event(number: int, kind: str, hours: int) -> RecordedEvent:
    payload: dict[str, Any] = {}
    if kind == lc.REPORT_SUBMITTED:
        payload = {
            "incident_id": str(INCIDENT),
            "category": "Streetlight",
            "resolution_due_at": (T0 + timedelta(hours=20)).isoformat(),
        }
    return recorded(kind, hours, number, **payload)


def _fold(events: list[RecordedEvent], by: datetime | None = None) -> Any:
    state = None
    for event in events:
        if by is None or event.occurred_at <= by:
            state = evolve_sla(state, event)
    return state


def _row_at(live: Any, versions: list[RowVersion], moment: datetime) -> Any:
    """Read the row as of `moment` as the SLA summary does: the live row once its events all
    happened, else the one version whose interval contains the moment, else none."""
    holding = [v.state for v in versions if v.valid_from <= moment < v.valid_to]
    if live is not None and live.latest_occurred_at <= moment:
        # The summary counts both tables with UNION ALL: a version here would count twice.
        assert holding == []
        return live
    assert len(holding) <= 1
    return holding[0] if holding else None


def _tracked(events: list[RecordedEvent]) -> tuple[VersionTracker, Any]:
    """Fold `events` as a streaming batch does, with a tracker of the versions they close."""
    tracker = VersionTracker()
    state = None
    for event in events:
        after = evolve_sla(state, event)
        tracker.step("key", "acme", state, after, event.occurred_at)
        state = after
    return tracker, state


histories = st.lists(
    st.tuples(st.sampled_from(KINDS), st.integers(0, 30)), min_size=1, max_size=8
).map(lambda steps: [_event(number, kind, hours) for number, (kind, hours) in enumerate(steps)])


@given(events=histories)
def test_versions_equal_fold_at_any_moment(events: list[RecordedEvent]) -> None:
    live = _fold(events)
    versions = stream_versions("acme", events, evolve_sla)
    moments = sorted({event.occurred_at for event in events})
    probes = {moments[0] - timedelta(minutes=1), moments[-1] + timedelta(minutes=1)}
    for moment in moments:
        probes |= {moment - timedelta(minutes=1), moment, moment + timedelta(minutes=1)}
    for moment in sorted(probes):
        assert _row_at(live, versions, moment) == _fold(events, moment), moment


@given(events=histories)
def test_tracker_matches_recomputed_versions(
    events: list[RecordedEvent],
) -> None:
    tracker, state = _tracked(events)
    in_order = all(
        later.occurred_at >= earlier.occurred_at
        for earlier, later in zip(events, events[1:], strict=False)
    )
    if "key" in tracker.recompute:
        # Only an event out of valid-time order requires the versions to be computed again.
        assert not in_order or state is None
        assert tracker.closed() == []
    else:
        assert tracker.closed() == stream_versions("acme", events, evolve_sla)


def test_versions_late_event_changes_earlier() -> None:
    # Submitted at 0, closed at 10, then an acknowledgement entered late that happened at 4.
    events = [
        _event(1, lc.REPORT_SUBMITTED, 0),
        _event(2, lc.INCIDENT_CLOSED, 10),
        _event(3, lc.INCIDENT_ACKNOWLEDGED, 4),
    ]
    tracker, state = _tracked(events)
    assert tracker.recompute == {"key"}

    versions = stream_versions("acme", events, evolve_sla)
    assert [(v.valid_from, v.valid_to) for v in versions] == [
        (T0, T0 + timedelta(hours=4)),
        (T0 + timedelta(hours=4), T0 + timedelta(hours=10)),
    ]
    assert versions[0].state.first_response_at is None
    assert versions[1].state.first_response_at == T0 + timedelta(hours=4)
    assert versions[1].state.closed_at is None
