from __future__ import annotations

import itertools
import json
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from psycopg_pool import ConnectionPool

from ledger import lifecycle as lc
from ledger.database import Database
from ledger.events import NewEvent, RecordedEvent
from ledger.grouping import GROUPING_CONFIGURED, validate_grouping
from ledger.ids import incident_stream_id
from ledger.store import EVENT_COLUMNS, PostgresEventStore, row_to_event
from ledger.tenants import tenant_stream_id
from projections.grouping import (
    GroupingTables,
    fold_grouping,
    grouping_projection,
    states_from_tables,
)

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
# A street corner, and points about 40 m and 80 m east of it (1e-4 degrees of longitude is
# 8.2 m at this latitude).
LAT, LON = 42.3474, -71.0944
EAST_40 = LON + 0.00049
EAST_80 = LON + 0.00098


def recorded(
    position: int,
    event_type: str,
    payload: dict[str, Any],
    *,
    stream_id: str,
    at: datetime = T0,
    tenant: str = "acme",
    version: int = 1,
) -> RecordedEvent:
    return RecordedEvent(
        position=position,
        tx_id=position,
        tenant_id=tenant,
        stream_id=stream_id,
        stream_version=version,
        event_type=event_type,
        schema_version=1,
        payload=payload,
        metadata={},
        occurred_at=at,
        recorded_at=at,
        event_id=uuid.uuid4(),
        hash=bytes(32),
    )


def report(
    position: int,
    incident: uuid.UUID,
    *,
    lat: float | None = LAT,
    lon: float | None = LON,
    hours: float = 0,
    category: str | None = "Street Light Outages",
    title: str = "Street light out",
) -> RecordedEvent:
    payload: dict[str, Any] = {"incident_id": str(incident), "title": title}
    if category is not None:
        payload["category"] = category
    if lat is not None and lon is not None:
        payload["latitude"] = lat
        payload["longitude"] = lon
    return recorded(
        position,
        lc.REPORT_SUBMITTED,
        payload,
        stream_id=incident_stream_id(incident),
        at=T0 + timedelta(hours=hours),
    )


def group_of(tables: GroupingTables, incident: uuid.UUID) -> uuid.UUID:
    group: uuid.UUID = tables.reports[("acme", incident)][-1]
    return group


def groups_by_report(tables: GroupingTables) -> dict[tuple[str, uuid.UUID], uuid.UUID]:
    return {key: row[-1] for key, row in tables.reports.items()}


def link_rows(tables: GroupingTables, kind: str) -> int:
    return sum(1 for row in tables.links if row[3] == kind)


def test_near_reports_share_group() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    tables = fold_grouping([report(1, a), report(2, b, lon=EAST_40, hours=5)])
    assert group_of(tables, a) == group_of(tables, b) == min(a, b)


def test_far_late_or_unrelated_reports_stay_apart() -> None:
    a = uuid.uuid4()
    cases: dict[str, dict[str, Any]] = {
        "far": {"lon": LON + 0.01},
        "late": {"hours": 100},
        "other category": {"category": "Pothole"},
        "other text": {"title": "Graffiti removal on bridge"},
    }
    for name, change in cases.items():
        b = uuid.uuid4()
        tables = fold_grouping([report(1, a), report(2, b, **change)])
        assert group_of(tables, b) == b, name


def test_missing_location_never_groups() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    tables = fold_grouping([report(1, a, lat=None, lon=None), report(2, b, lat=None, lon=None)])
    assert group_of(tables, a) == a
    assert group_of(tables, b) == b


def test_placeholder_location_never_groups() -> None:
    config = validate_grouping(
        {"placeholders": [{"latitude": LAT, "longitude": LON, "radius_m": 5}]}
    ).to_payload()
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    events = [
        recorded(1, GROUPING_CONFIGURED, config, stream_id=tenant_stream_id("acme")),
        report(2, a),
        report(3, b),
        # 40 m away from the placeholder: a real location, but the other end is not.
        report(4, c, lon=EAST_40),
    ]
    tables = fold_grouping(events)
    assert [group_of(tables, x) for x in (a, b, c)] == [a, b, c]


def test_related_categories_group() -> None:
    config = validate_grouping(
        {"related_categories": [["Street Light Outages", "Traffic Signal Repair"]]}
    ).to_payload()
    a, b = uuid.uuid4(), uuid.uuid4()
    events = [
        recorded(1, GROUPING_CONFIGURED, config, stream_id=tenant_stream_id("acme")),
        report(2, a),
        report(3, b, category="Traffic Signal Repair"),
    ]
    tables = fold_grouping(events)
    assert group_of(tables, a) == group_of(tables, b)


def test_ungrouped_category_stays_alone() -> None:
    config = validate_grouping(
        {
            "related_categories": [["Bulk Item Pickup", "Street Light Outages"]],
            "ungrouped_categories": ["Bulk Item Pickup"],
        }
    ).to_payload()
    a, b, c, d = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    events = [
        recorded(1, GROUPING_CONFIGURED, config, stream_id=tenant_stream_id("acme")),
        report(2, a, category="Bulk Item Pickup", title="pickup"),
        report(3, b, category="Bulk Item Pickup", title="pickup"),
        report(4, c),
        report(5, d),
    ]
    tables = fold_grouping(events)

    assert group_of(tables, a) == a
    assert group_of(tables, b) == b
    assert group_of(tables, c) == group_of(tables, d)


def test_bridge_report_joins_groups_in_any_order() -> None:
    # a and c are 80 m apart, beyond the 60 m distance; b lies between them.
    config = validate_grouping({"distance_m": 60}).to_payload()
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    reports = [report(0, a), report(0, b, lon=EAST_40), report(0, c, lon=EAST_80)]
    expected = min(a, b, c)
    for order in itertools.permutations(reports):
        events = [recorded(1, GROUPING_CONFIGURED, config, stream_id=tenant_stream_id("acme"))]
        events += [
            recorded(position, e.event_type, e.payload, stream_id=e.stream_id, at=e.occurred_at)
            for position, e in enumerate(order, start=2)
        ]
        tables = fold_grouping(events)
        assert {group_of(tables, x) for x in (a, b, c)} == {expected}
        without_bridge = fold_grouping(
            [e for e in events if e.payload.get("incident_id") != str(b)]
        )
        assert group_of(without_bridge, a) != group_of(without_bridge, c)


def test_reclassification_moves_report_out() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    corrected = recorded(
        3,
        lc.CLASSIFICATION_CORRECTED,
        {"category": "Pothole"},
        stream_id=incident_stream_id(b),
        version=2,
    )
    tables = fold_grouping([report(1, a), report(2, b), corrected])
    assert group_of(tables, b) == b
    assert tables.reports[("acme", b)][1] == "Pothole"


def test_classifier_does_not_override_report_category() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    classified = recorded(
        3, lc.REPORT_CLASSIFIED, {"category": "Pothole"}, stream_id=incident_stream_id(b)
    )
    tables = fold_grouping([report(1, a), report(2, b), classified])
    assert group_of(tables, a) == group_of(tables, b)


def test_split_report_stays_out_and_merge_stays() -> None:
    a, b, c, far = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    split = recorded(5, lc.REPORT_SPLIT_FROM_GROUP, {}, stream_id=incident_stream_id(b))
    merged = recorded(
        7, lc.REPORTS_MERGED, {"with_incident": str(far)}, stream_id=incident_stream_id(a)
    )
    events = [
        report(1, a),
        report(2, b),
        report(3, c, lon=EAST_40),
        report(4, far, lon=LON + 0.02),
        split,
        # A correction re-evaluates b against the same evidence: the split holds.
        recorded(
            6, lc.CLASSIFICATION_CORRECTED, {"severity": "low"}, stream_id=incident_stream_id(b)
        ),
        merged,
    ]
    tables = fold_grouping(events)
    assert group_of(tables, b) == b
    assert group_of(tables, a) == group_of(tables, far) == group_of(tables, c)

    # A new report that matches both sides is new evidence, and joins them again.
    joined = fold_grouping([*events, report(8, uuid.uuid4(), lon=EAST_40, hours=1)])
    assert group_of(joined, b) == group_of(joined, a)


def test_report_links_once_per_group() -> None:
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    tables = fold_grouping([report(1, a), report(2, b, hours=1), report(3, c, hours=2)])
    assert {group_of(tables, x) for x in (a, b, c)} == {min(a, b, c)}
    # c matches a and b, but they are one group already: c links only with a, the earliest.
    assert {row[1:] for row in tables.links} == {
        (a, b, "match"),
        (b, a, "match"),
        (c, a, "match"),
        (a, c, "match"),
    }
    every = fold_grouping(
        [report(1, a), report(2, b, hours=1), report(3, c, hours=2)], every_link=True
    )
    assert link_rows(every, "match") == 6


def test_reclassified_hub_leaves_others_grouped() -> None:
    # b and c each link only with a. Once a moves to another category, b and c are
    # evaluated again and linked with each other.
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    corrected = recorded(
        4, lc.CLASSIFICATION_CORRECTED, {"category": "Pothole"}, stream_id=incident_stream_id(a)
    )
    tables = fold_grouping([report(1, a), report(2, b, hours=1), report(3, c, hours=2), corrected])
    assert group_of(tables, a) == a
    assert group_of(tables, b) == group_of(tables, c) == min(b, c)
    assert ("acme", b, c, "match") in tables.links


def test_split_hub_leaves_others_grouped() -> None:
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    split = recorded(4, lc.REPORT_SPLIT_FROM_GROUP, {}, stream_id=incident_stream_id(a))
    tables = fold_grouping([report(1, a), report(2, b, hours=1), report(3, c, hours=2), split])
    assert group_of(tables, a) == a
    assert group_of(tables, b) == group_of(tables, c) == min(b, c)
    assert link_rows(tables, "split") == 4


def test_removed_link_divides_unmatched_parts() -> None:
    # a and c are 80 m apart, beyond the 60 m distance, and b joins them. Without b's
    # links, a and c are in no group together.
    config = validate_grouping({"distance_m": 60}).to_payload()
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    events = [
        recorded(1, GROUPING_CONFIGURED, config, stream_id=tenant_stream_id("acme")),
        report(2, a),
        report(3, c, lon=EAST_80),
        report(4, b, lon=EAST_40),
        recorded(
            5, lc.CLASSIFICATION_CORRECTED, {"category": "Pothole"}, stream_id=incident_stream_id(b)
        ),
    ]
    tables = fold_grouping(events)
    assert [group_of(tables, x) for x in (a, b, c)] == [a, b, c]
    assert tables.links == set()


# Random histories: reports on a small grid around the corner, classifications, staff merges
# and splits, and settings changes, appended in random order across tenants.
POINTS = [(LAT + dy * 0.0004, LON + dx * 0.0005) for dy in range(-2, 3) for dx in range(-2, 3)]
POINTS_OR_NONE = st.one_of(st.sampled_from(POINTS), st.sampled_from(POINTS), st.none())
CATEGORIES = st.sampled_from(["Light", "Pothole", None])
TITLES = st.sampled_from(["light out", "street light out", "pothole", "deep hole in road", ""])
SETTINGS = st.fixed_dictionaries(
    {
        "distance_m": st.sampled_from([40, 90, 200]),
        "window_hours": st.sampled_from([2, 10, 48]),
        "min_similarity": st.sampled_from([0, 50, 90]),
        "related_categories": st.sampled_from([[], [["Light", "Pothole"]]]),
        "placeholders": st.sampled_from([[], [{"latitude": LAT, "longitude": LON}]]),
        "ungrouped_categories": st.sampled_from([[], ["Pothole"]]),
    }
)
REPORT_STEP = st.tuples(st.just("report"), POINTS_OR_NONE, CATEGORIES, TITLES, st.integers(0, 60))
# Reports come three times as often as any other step, so that most histories form groups.
STEP = st.one_of(
    REPORT_STEP,
    REPORT_STEP,
    REPORT_STEP,
    st.tuples(st.just("classify"), st.integers(0, 50), CATEGORIES),
    st.tuples(st.just("correct"), st.integers(0, 50), CATEGORIES),
    st.tuples(st.just("merge"), st.integers(0, 50), st.integers(0, 50)),
    st.tuples(st.just("split"), st.integers(0, 50)),
    st.tuples(st.just("configure"), SETTINGS),
)


def _append_history(store: PostgresEventStore, tenant: str, steps: list[tuple[Any, ...]]) -> None:
    incidents: list[uuid.UUID] = []
    for step in steps:
        kind = step[0]
        if kind == "configure":
            payload = validate_grouping(step[1]).to_payload()
            event = NewEvent(GROUPING_CONFIGURED, payload, T0)
            store.append(tenant, tenant_stream_id(tenant), [event], expected_version=None)
            continue
        if kind == "report":
            _, point, category, title, hours = step
            incident = uuid.uuid4()
            incidents.append(incident)
            payload = {"incident_id": str(incident), "title": title, "category": category}
            if point is not None:
                payload.update(latitude=point[0], longitude=point[1])
            event = NewEvent(lc.REPORT_SUBMITTED, payload, T0 + timedelta(hours=hours))
            store.append(tenant, incident_stream_id(incident), [event], expected_version=0)
            continue
        if not incidents:
            continue
        incident = incidents[step[1] % len(incidents)]
        if kind == "classify":
            event = NewEvent(lc.REPORT_CLASSIFIED, {"category": step[2]}, T0)
        elif kind == "correct":
            event = NewEvent(lc.CLASSIFICATION_CORRECTED, {"category": step[2]}, T0)
        elif kind == "merge":
            other = incidents[step[2] % len(incidents)]
            if other == incident:
                continue
            event = NewEvent(lc.REPORTS_MERGED, {"with_incident": str(other)}, T0)
        else:
            event = NewEvent(lc.REPORT_SPLIT_FROM_GROUP, {}, T0)
        store.append(tenant, incident_stream_id(incident), [event], expected_version=None)


def _tenant_events(conn: psycopg.Connection[Any], tenant: str) -> list[RecordedEvent]:
    rows = conn.execute(
        f"SELECT {EVENT_COLUMNS} FROM events WHERE tenant_id = %s ORDER BY tx_id, position",
        (tenant,),
    ).fetchall()
    return [row_to_event(row) for row in rows]


def _only(tables: GroupingTables, tenant: str) -> GroupingTables:
    return GroupingTables(
        settings={k: v for k, v in tables.settings.items() if k == tenant},
        reports={k: v for k, v in tables.reports.items() if k[0] == tenant},
        links={row for row in tables.links if row[0] == tenant},
    )


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    reports=st.lists(REPORT_STEP, min_size=3, max_size=15),
    others=st.lists(STEP, max_size=25),
    data=st.data(),
    cuts=st.lists(st.integers(min_value=1, max_value=9), max_size=8),
)
def test_batched_streaming_equals_fold(
    store: PostgresEventStore,
    worker_pool: ConnectionPool[Any],
    reports: list[tuple[Any, ...]],
    others: list[tuple[Any, ...]],
    data: st.DataObject,
    cuts: list[int],
) -> None:
    tenant = f"g-{uuid.uuid4().hex[:10]}"
    # The first report opens the history; the rest come in an order Hypothesis picks.
    rest = reports[1:] + others
    steps = [reports[0], *data.draw(st.permutations(rest))]
    _append_history(store, tenant, steps)
    projection = grouping_projection()
    with worker_pool.connection() as conn:
        events = _tenant_events(conn, tenant)
        with conn.transaction(force_rollback=True):
            start = 0
            for size in [*cuts, len(events)]:
                projection.apply(conn, events[start : start + size])
                start += size
            stored = _only(projection.read_tables(conn), tenant)
    expected = fold_grouping(events)
    kinds = sorted({row[3] for row in expected.links})
    event("link kinds: " + (", ".join(kinds) or "none"))
    assert stored.settings == expected.settings
    assert stored.links == expected.links
    assert stored.reports == expected.reports


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    reports=st.lists(REPORT_STEP, min_size=3, max_size=12),
    others=st.lists(STEP, max_size=20),
    data=st.data(),
    cut=st.floats(0.0, 1.0),
)
def test_fold_resumes_from_records(
    store: PostgresEventStore,
    worker_pool: ConnectionPool[Any],
    reports: list[tuple[Any, ...]],
    others: list[tuple[Any, ...]],
    data: st.DataObject,
    cut: float,
) -> None:
    tenant = f"g-{uuid.uuid4().hex[:10]}"
    steps = [reports[0], *data.draw(st.permutations(reports[1:] + others))]
    _append_history(store, tenant, steps)
    projection = grouping_projection()
    with worker_pool.connection() as conn:
        events = _tenant_events(conn, tenant)
    whole = projection.fold(events)
    split = int(len(events) * cut)

    # A snapshot's round trip: canonical JSON records and back.
    first = projection.fold(events[:split])
    restored = projection.from_records(tenant, json.loads(json.dumps(projection.to_records(first))))

    assert restored == first
    assert projection.fold(events[split:], restored) == whole
    assert projection.fold(events[split:], restored) == states_from_tables(fold_grouping(events))


def test_write_and_read_states_in_other_schema(
    store: PostgresEventStore, worker_pool: ConnectionPool[Any]
) -> None:
    tenant = f"g-{uuid.uuid4().hex[:10]}"
    steps: list[tuple[Any, ...]] = [
        ("configure", {"distance_m": 90, "window_hours": 10, "min_similarity": 0}),
        ("report", (LAT, LON), "Light", "light out", 1),
        ("report", (LAT, LON + 0.0005), "Light", "street light out", 2),
        ("report", None, "Light", "light out", 3),
        ("merge", 2, 0),
    ]
    _append_history(store, tenant, steps)
    projection = grouping_projection()
    names = {table: f"t_{table}_{uuid.uuid4().hex[:6]}" for table in projection.tables}
    with worker_pool.connection() as conn:
        events = _tenant_events(conn, tenant)
        states = projection.fold(events)
        with conn.transaction(force_rollback=True):
            for live, shadow in names.items():
                conn.execute(f"CREATE TABLE replay_shadow.{shadow} (LIKE {live})")
            shadowed = projection.retarget("replay_shadow", names)
            shadowed.write_states(conn, states)
            read_back = shadowed.read_states(conn, tenant)
            live_rows = projection.read_states(conn, tenant)

    # The two located reports match, and staff merged the third (without a location) in.
    groups = {row[-1] for key, row in states.items() if key[1][0] == "report"}
    kinds = {kind for key, kind in states.items() if key[1][0] == "link"}
    assert len(groups) == 1
    assert kinds == {"match", "merge"}
    assert read_back == states
    assert live_rows == {}


# Histories with fixed settings, folded in memory: bounding the links must leave every
# report's group as storing a link for every matching pair gives. Reports lie closer
# together in space and time than in the streaming histories, so that most form groups of
# three or more, where links are left out.
DENSE_POINTS = [(LAT + dy * 0.0004, LON + dx * 0.0005) for dy in range(2) for dx in range(2)]
DENSE_REPORT_STEP = st.tuples(
    st.just("report"),
    st.one_of(st.sampled_from(DENSE_POINTS), st.sampled_from(DENSE_POINTS), st.none()),
    CATEGORIES,
    TITLES,
    st.integers(0, 12),
)
DENSE_SETTINGS = st.fixed_dictionaries(
    {
        "distance_m": st.sampled_from([60, 200]),
        "window_hours": st.sampled_from([6, 48]),
        "min_similarity": st.sampled_from([0, 0, 50]),
        "related_categories": st.sampled_from([[], [["Light", "Pothole"]]]),
        "placeholders": st.sampled_from([[], [{"latitude": LAT, "longitude": LON}]]),
    }
)
MEMORY_STEP = st.one_of(
    *[DENSE_REPORT_STEP] * 5,
    st.tuples(st.just("classify"), st.integers(0, 50), CATEGORIES),
    st.tuples(st.just("correct"), st.integers(0, 50), CATEGORIES),
    st.tuples(st.just("merge"), st.integers(0, 50), st.integers(0, 50)),
    st.tuples(st.just("split"), st.integers(0, 50)),
)


def _memory_history(config: dict[str, Any], steps: list[tuple[Any, ...]]) -> list[RecordedEvent]:
    payload = validate_grouping(config).to_payload()
    events = [recorded(0, GROUPING_CONFIGURED, payload, stream_id=tenant_stream_id("acme"))]
    incidents: list[uuid.UUID] = []
    for position, step in enumerate(steps, start=1):
        kind = step[0]
        if kind == "report":
            _, point, category, title, hours = step
            incident = uuid.uuid4()
            incidents.append(incident)
            lat, lon = point if point is not None else (None, None)
            events.append(
                report(
                    position,
                    incident,
                    lat=lat,
                    lon=lon,
                    hours=hours,
                    category=category,
                    title=title,
                )
            )
            continue
        if not incidents:
            continue
        incident = incidents[step[1] % len(incidents)]
        stream_id = incident_stream_id(incident)
        if kind == "classify":
            events.append(
                recorded(position, lc.REPORT_CLASSIFIED, {"category": step[2]}, stream_id=stream_id)
            )
        elif kind == "correct":
            events.append(
                recorded(
                    position,
                    lc.CLASSIFICATION_CORRECTED,
                    {"category": step[2]},
                    stream_id=stream_id,
                )
            )
        elif kind == "merge":
            other = incidents[step[2] % len(incidents)]
            if other != incident:
                events.append(
                    recorded(
                        position,
                        lc.REPORTS_MERGED,
                        {"with_incident": str(other)},
                        stream_id=stream_id,
                    )
                )
        else:
            events.append(recorded(position, lc.REPORT_SPLIT_FROM_GROUP, {}, stream_id=stream_id))
    return events


@settings(max_examples=500, deadline=None)
@given(config=DENSE_SETTINGS, steps=st.lists(MEMORY_STEP, min_size=8, max_size=40))
def test_bounded_links_keep_groups(config: dict[str, Any], steps: list[tuple[Any, ...]]) -> None:
    events = _memory_history(config, steps)
    bounded = fold_grouping(events)
    every = fold_grouping(events, every_link=True)
    sizes = Counter(groups_by_report(bounded).values())
    event("largest group: " + ("3 or more" if max(sizes.values(), default=0) >= 3 else "under 3"))
    assert groups_by_report(bounded) == groups_by_report(every)
    assert fold_grouping(events, indexed=True) == bounded
    # Each match link joined two groups when it was stored, so match links form a forest.
    assert link_rows(bounded, "match") <= 2 * max(len(bounded.reports) - 1, 0)


def test_dense_cluster_links_grow_linearly(fresh_database: Database) -> None:
    # Every report matches every other: same point, title and category, within the window.
    count = 400
    incidents = [uuid.uuid4() for _ in range(count)]
    events = [
        report(position, incident, hours=position / count * 48)
        for position, incident in enumerate(incidents, start=1)
    ]
    first = incidents[0]
    # Every later report links with the first one. Moving it to another category and
    # splitting the second leaves the others to be linked again.
    events.append(
        recorded(
            count + 1,
            lc.CLASSIFICATION_CORRECTED,
            {"category": "Pothole"},
            stream_id=incident_stream_id(first),
            version=2,
        )
    )
    events.append(
        recorded(
            count + 2,
            lc.REPORT_SPLIT_FROM_GROUP,
            {},
            stream_id=incident_stream_id(incidents[1]),
            version=2,
        )
    )
    projection = grouping_projection()
    with fresh_database.connect_worker() as conn:
        with conn.transaction():
            for start in range(0, len(events), 150):
                projection.apply(conn, events[start : start + 150])
        stored = projection.read_tables(conn)

    rest = incidents[2:]
    assert group_of(stored, first) == first
    assert group_of(stored, incidents[1]) == incidents[1]
    assert {group_of(stored, x) for x in rest} == {min(rest)}
    assert link_rows(stored, "match") + link_rows(stored, "merge") < 3 * count
    # The split links join nothing, one per former member in each direction.
    assert link_rows(stored, "split") == 2 * (count - 2)

    assert stored == fold_grouping(events)
    every = fold_grouping(events, every_link=True)
    assert groups_by_report(stored) == groups_by_report(every)
    assert link_rows(every, "match") == (count - 2) * (count - 3)
