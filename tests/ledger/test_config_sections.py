from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

from ledger.config_sections import (
    CALENDARS_CONFIGURED,
    SECTIONS,
    SLA_POLICIES_CONFIGURED,
    ConfigSection,
    SectionContext,
    apply_config,
    configuration_history,
    import_holidays,
    read_ics_holidays,
    register_section,
)
from ledger.errors import ConcurrencyError, ConfigInvalid, TenantNotFound
from ledger.store import PostgresEventStore
from ledger.tenants import load_tenant, tenant_stream_id

NOW = datetime(2026, 5, 1, tzinfo=UTC)
CALENDAR = {
    "name": "office",
    "time_zone": "Europe/London",
    "weekly_hours": {"monday": ["09:00-12:30", "13:30-17:00"], "friday": ["09:00-16:00"]},
    "holidays": ["2026-12-25"],
}
POLICY = {"id": "standard", "calendar": "office", "resolution": "3 business days"}
DOCUMENT: dict[str, Any] = {
    "categories": [{"name": "Pothole", "department": "Streets", "keywords": ["hole"]}],
    "calendars": [CALENDAR],
    "sla_policies": [POLICY],
    "routing": [{"categories": ["Pothole"], "areas": ["north"], "department": "North Crew"}],
}
ICS = b"""BEGIN:VCALENDAR
VERSION:2.0
PRODID:-//test//holidays//EN
BEGIN:VEVENT
UID:1@test
DTSTAMP:20260101T000000Z
SUMMARY:Christmas break
DTSTART;VALUE=DATE:20261224
DTEND;VALUE=DATE:20261227
END:VEVENT
BEGIN:VEVENT
UID:2@test
DTSTAMP:20260101T000000Z
SUMMARY:New Year
DTSTART;VALUE=DATE:20270101
END:VEVENT
END:VCALENDAR
"""


def stream_length(store: PostgresEventStore, tenant_id: str) -> int:
    return len(store.read_stream(tenant_id, tenant_stream_id(tenant_id)))


def test_apply_appends_one_event_per_section(store: PostgresEventStore, tenant_id: str) -> None:
    before = stream_length(store, tenant_id)
    result = apply_config(store, tenant_id, DOCUMENT, occurred_at=NOW)
    config = load_tenant(store, tenant_id)

    assert result.changed == ["categories", "calendars", "sla_policies", "routing"]
    assert stream_length(store, tenant_id) == before + 4
    assert config is not None
    assert result.version == config.version
    assert config.category_names == ["Pothole"]
    assert config.payloads[SLA_POLICIES_CONFIGURED]["policies"][0]["warning_percent"] == 80.0


def test_apply_same_file_twice_appends_nothing(store: PostgresEventStore, tenant_id: str) -> None:
    first = apply_config(store, tenant_id, DOCUMENT, occurred_at=NOW)
    length = stream_length(store, tenant_id)
    again = apply_config(store, tenant_id, DOCUMENT, occurred_at=NOW)

    assert again.changed == []
    assert again.version == first.version
    assert stream_length(store, tenant_id) == length


def test_apply_only_changed_section(store: PostgresEventStore, tenant_id: str) -> None:
    apply_config(store, tenant_id, DOCUMENT, occurred_at=NOW)
    changed = {**DOCUMENT, "sla_policies": [{**POLICY, "resolution": "2 business days"}]}
    result = apply_config(store, tenant_id, changed, occurred_at=NOW)
    history = configuration_history(store, tenant_id)

    assert result.changed == ["sla_policies"]
    assert history[-1]["section"] == "sla_policies"
    assert history[-1]["version"] == result.version
    assert history[-2]["section"] == "routing"


@pytest.mark.parametrize(
    ("section", "value", "words"),
    [
        (
            "sla_policies",
            [{**POLICY, "resolution": "3 weeks"}],
            ["sla_policies", "0.resolution", "'3 weeks'", "business hours"],
        ),
        (
            "sla_policies",
            [{**POLICY, "calendar": "night"}],
            ["sla_policies", "'night'", "not configured: use one of office"],
        ),
        (
            "sla_policies",
            [{"id": "x", "resolution": "2 business hours"}],
            ["sla_policies", "names no calendar"],
        ),
        (
            "sla_policies",
            [{**POLICY, "warning_percent": 120}],
            ["sla_policies", "0.warning_percent", "120"],
        ),
        (
            "calendars",
            [{**CALENDAR, "weekly_hours": {"monday": ["9-5"]}}],
            ["calendars", "0.weekly_hours", "'9-5'", "HH:MM-HH:MM"],
        ),
        (
            "calendars",
            [{**CALENDAR, "time_zone": "Mars/Olympus"}],
            ["calendars", "0.time_zone", "Mars/Olympus", "America/New_York"],
        ),
        (
            "calendars",
            [{**CALENDAR, "weekly_hours": {"sonday": ["09:00-10:00"]}}],
            ["calendars", "sonday"],
        ),
        ("routing", [{"categories": ["Pothole"]}], ["routing", "0.department", "Field required"]),
        ("categories", [{"name": ""}], ["categories", "1 to 200 characters"]),
        (
            "categories",
            [{"name": "Pothole", "departmnt": "Public Works"}],
            ["categories", "departmnt", "category #1", "use name, department and keywords"],
        ),
        (
            "calendars",
            [{**CALENDAR, "holidays": ["2026-02-30"]}],
            ["calendars", "0.holidays.0", "'2026-02-30'", "existing date, written YYYY-MM-DD"],
        ),
    ],
)
def test_invalid_section_applies_nothing(
    store: PostgresEventStore, tenant_id: str, section: str, value: Any, words: list[str]
) -> None:
    before = stream_length(store, tenant_id)
    with pytest.raises(ConfigInvalid) as raised:
        apply_config(store, tenant_id, {**DOCUMENT, section: value}, occurred_at=NOW)

    for word in words:
        assert word in str(raised.value)
    assert stream_length(store, tenant_id) == before


def test_unknown_sections_named(store: PostgresEventStore, tenant_id: str) -> None:
    with pytest.raises(ConfigInvalid) as raised:
        apply_config(store, tenant_id, {**DOCUMENT, "groupng": {}, "slas": []}, occurred_at=NOW)

    assert [problem.section for problem in raised.value.problems] == ["groupng", "slas"]
    assert "unknown section" in str(raised.value)


@pytest.mark.parametrize(
    ("document", "words"),
    [
        (None, "the document is empty"),
        ("sla_policies", "the document is text"),
        ([{"id": "x"}], "the document is a list"),
        (3, "the document is a number"),
    ],
)
def test_document_not_an_object(
    store: PostgresEventStore, tenant_id: str, document: Any, words: str
) -> None:
    with pytest.raises(ConfigInvalid) as raised:
        apply_config(store, tenant_id, document, occurred_at=NOW)

    assert [problem.section for problem in raised.value.problems] == ["(document)"]
    assert words in str(raised.value)
    assert "nothing applied" in str(raised.value)
    assert "NoneType" not in str(raised.value)


def test_every_invalid_section_reported(store: PostgresEventStore, tenant_id: str) -> None:
    document = {
        "calendars": [{**CALENDAR, "time_zone": "Nowhere"}],
        "routing": [{"department": ""}],
    }
    with pytest.raises(ConfigInvalid) as raised:
        apply_config(store, tenant_id, document, occurred_at=NOW)

    assert {problem.section for problem in raised.value.problems} == {"calendars", "routing"}


def test_removing_used_calendar_rejected(store: PostgresEventStore, tenant_id: str) -> None:
    apply_config(store, tenant_id, DOCUMENT, occurred_at=NOW)
    phone = {"id": "phone", "calendar": "office", "first_response": "2 business hours"}
    apply_config(store, tenant_id, {"sla_policies": [POLICY, phone]}, occurred_at=NOW)
    before = stream_length(store, tenant_id)
    other = {**CALENDAR, "name": "other"}

    with pytest.raises(ConfigInvalid) as raised:
        apply_config(store, tenant_id, {"calendars": [other]}, occurred_at=NOW)

    (problem,) = raised.value.problems
    assert problem.section == "calendars"
    assert problem.value == "office"
    assert "SLA policies standard, phone name it" in problem.fix
    assert "keep the calendar" in problem.fix
    assert stream_length(store, tenant_id) == before


def test_renaming_calendar_checks_policies(store: PostgresEventStore, tenant_id: str) -> None:
    apply_config(store, tenant_id, DOCUMENT, occurred_at=NOW)
    renamed = {**CALENDAR, "name": "town-hall"}
    stale = {"calendars": [renamed], "sla_policies": [POLICY]}
    updated = {"calendars": [renamed], "sla_policies": [{**POLICY, "calendar": "town-hall"}]}

    with pytest.raises(ConfigInvalid) as raised:
        apply_config(store, tenant_id, stale, occurred_at=NOW)
    result = apply_config(store, tenant_id, updated, occurred_at=NOW)

    assert [problem.section for problem in raised.value.problems] == ["sla_policies"]
    assert "names calendar 'office', which is not configured" in str(raised.value)
    assert result.changed == ["calendars", "sla_policies"]


def test_unused_calendar_may_be_removed(store: PostgresEventStore, tenant_id: str) -> None:
    spare = {**CALENDAR, "name": "spare"}
    apply_config(store, tenant_id, {**DOCUMENT, "calendars": [CALENDAR, spare]}, occurred_at=NOW)
    result = apply_config(store, tenant_id, {"calendars": [CALENDAR]}, occurred_at=NOW)

    assert result.changed == ["calendars"]


def test_unknown_field_lists_allowed_fields(store: PostgresEventStore, tenant_id: str) -> None:
    document = {
        "calendars": [{**CALENDAR, "timezone": "UTC"}],
        "sla_policies": [{**POLICY, "match": {"category": ["Pothole"]}}],
    }
    with pytest.raises(ConfigInvalid) as raised:
        apply_config(store, tenant_id, document, occurred_at=NOW)
    calendar, policy = raised.value.problems

    assert calendar.field == "0.timezone"
    assert calendar.fix.startswith("unknown field 'timezone': use name, time_zone, weekly_hours")
    assert policy.field == "0.match.category"
    assert policy.fix == "unknown field 'category': use categories, severities, channels"


def test_invalid_weekday_key_path(store: PostgresEventStore, tenant_id: str) -> None:
    document = {"calendars": [{**CALENDAR, "weekly_hours": {"funday": ["09:00-17:00"]}}]}
    with pytest.raises(ConfigInvalid) as raised:
        apply_config(store, tenant_id, document, occurred_at=NOW)
    (problem,) = raised.value.problems

    assert problem.field == "0.weekly_hours.funday"
    assert problem.value == "funday"
    assert problem.fix.startswith("invalid key 'funday': Input should be 'monday'")


def test_category_error_omits_whole_list(store: PostgresEventStore, tenant_id: str) -> None:
    categories = [{"name": "Pothole"}, {"name": "Pothole"}]
    with pytest.raises(ConfigInvalid) as raised:
        apply_config(store, tenant_id, {"categories": categories}, occurred_at=NOW)
    (problem,) = raised.value.problems

    assert problem.value is None
    assert "category 'Pothole' is listed twice" in problem.fix


def test_policy_may_name_stored_calendar(store: PostgresEventStore, tenant_id: str) -> None:
    apply_config(store, tenant_id, {"calendars": [CALENDAR]}, occurred_at=NOW)
    result = apply_config(store, tenant_id, {"sla_policies": [POLICY]}, occurred_at=NOW)

    assert result.changed == ["sla_policies"]


def test_unknown_tenant_rejected(store: PostgresEventStore) -> None:
    with pytest.raises(TenantNotFound):
        apply_config(store, "no-such-tenant", DOCUMENT, occurred_at=NOW)


def test_ics_holidays_expand_multi_day_events() -> None:
    days = read_ics_holidays(ICS, "test.ics")

    assert days == [date(2026, 12, 24), date(2026, 12, 25), date(2026, 12, 26), date(2027, 1, 1)]


def test_ics_timed_events_left_out() -> None:
    timed = ICS.replace(
        b"END:VCALENDAR",
        b"BEGIN:VEVENT\nUID:3@test\nDTSTAMP:20260101T000000Z\nSUMMARY:Staff meeting\n"
        b"DTSTART:20261210T100000Z\nDTEND:20261210T110000Z\nEND:VEVENT\nEND:VCALENDAR",
    )

    days = read_ics_holidays(timed, "test.ics")

    assert date(2026, 12, 10) not in days
    assert days == [date(2026, 12, 24), date(2026, 12, 25), date(2026, 12, 26), date(2027, 1, 1)]


def test_ics_garbage_rejected() -> None:
    with pytest.raises(ValueError, match="not a valid iCalendar file"):
        read_ics_holidays(b"hello", "bad.ics")


def test_holidays_ics_file_merged(
    store: PostgresEventStore, tenant_id: str, tmp_path: Path
) -> None:
    (tmp_path / "uk.ics").write_bytes(ICS)
    calendar = {**CALENDAR, "holidays_ics": "uk.ics"}
    apply_config(store, tenant_id, {"calendars": [calendar]}, occurred_at=NOW, base_dir=tmp_path)
    config = load_tenant(store, tenant_id)

    assert config is not None
    stored = config.payloads[CALENDARS_CONFIGURED]["calendars"][0]
    assert stored["holidays"] == ["2026-12-24", "2026-12-25", "2026-12-26", "2027-01-01"]
    assert "holidays_ics" not in stored


def test_holidays_ics_missing_file(
    store: PostgresEventStore, tenant_id: str, tmp_path: Path
) -> None:
    calendar = {**CALENDAR, "holidays_ics": "missing.ics"}
    with pytest.raises(ConfigInvalid, match="cannot read"):
        apply_config(
            store, tenant_id, {"calendars": [calendar]}, occurred_at=NOW, base_dir=tmp_path
        )


def test_import_holidays_into_calendar(store: PostgresEventStore, tenant_id: str) -> None:
    apply_config(store, tenant_id, {"calendars": [CALENDAR]}, occurred_at=NOW)
    result = import_holidays(store, tenant_id, "office", ICS, occurred_at=NOW, actor="test")
    again = import_holidays(store, tenant_id, "office", ICS, occurred_at=NOW, actor="test")
    config = load_tenant(store, tenant_id)

    assert result.changed == ["calendars"]
    assert again.changed == []
    assert config is not None
    holidays = config.payloads[CALENDARS_CONFIGURED]["calendars"][0]["holidays"]
    assert holidays == ["2026-12-24", "2026-12-25", "2026-12-26", "2027-01-01"]


def test_import_holidays_unknown_calendar(store: PostgresEventStore, tenant_id: str) -> None:
    apply_config(store, tenant_id, DOCUMENT, occurred_at=NOW)

    with pytest.raises(ConfigInvalid, match="no such calendar; .* use one of office$"):
        import_holidays(store, tenant_id, "night", ICS, occurred_at=NOW, actor="test")


def test_concurrent_change_conflicts(store: PostgresEventStore, tenant_id: str) -> None:
    from ledger import config_sections

    original = config_sections.require_tenant
    calls = 0

    def stale(store: PostgresEventStore, tenant: str) -> Any:
        nonlocal calls
        calls += 1
        config = original(store, tenant)
        if calls == 1:
            # Another admin applies a change between this call's read and its append.
            apply_config(store, tenant, {"routing": []}, occurred_at=NOW)
        return config

    config_sections.require_tenant = stale  # type: ignore[assignment]
    try:
        with pytest.raises(ConcurrencyError):
            apply_config(store, tenant_id, DOCUMENT, occurred_at=NOW)
    finally:
        config_sections.require_tenant = original


@pytest.fixture
def extra_section() -> Iterator[str]:
    def validate(value: Any, context: SectionContext) -> dict[str, Any]:
        if not isinstance(value, dict) or not isinstance(value.get("meters"), int):
            raise ValueError("expected {meters: INTEGER}")
        return {"meters": value["meters"]}

    register_section(ConfigSection("test_extra", "TestExtraConfigured", validate))
    yield "test_extra"
    del SECTIONS["test_extra"]


def test_registered_section_plugs_in(
    store: PostgresEventStore, tenant_id: str, extra_section: str
) -> None:
    result = apply_config(store, tenant_id, {extra_section: {"meters": 50}}, occurred_at=NOW)
    with pytest.raises(ConfigInvalid, match="expected"):
        apply_config(store, tenant_id, {extra_section: {"meters": "far"}}, occurred_at=NOW)

    assert result.changed == [extra_section]
    assert configuration_history(store, tenant_id)[-1]["section"] == extra_section


EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "city-config.yaml"


def test_documented_example_applies(store: PostgresEventStore, tenant_id: str) -> None:
    import yaml

    document = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    assert document.pop("tenant") == "demo"
    result = apply_config(store, tenant_id, document, occurred_at=NOW, base_dir=EXAMPLE.parent)
    again = apply_config(store, tenant_id, document, occurred_at=NOW, base_dir=EXAMPLE.parent)
    config = load_tenant(store, tenant_id)

    assert result.changed == ["categories", "calendars", "sla_policies", "routing", "dashboards"]
    assert again.changed == []
    assert config is not None
    holidays = config.payloads[CALENDARS_CONFIGURED]["calendars"][0]["holidays"]
    assert "2026-11-27" in holidays
    assert "2026-09-07" in holidays
    assert "2026-07-03" in holidays
    policies = config.payloads[SLA_POLICIES_CONFIGURED]["policies"]
    assert [policy["id"] for policy in policies] == ["emergency", "urgent", "phone", "standard"]


def test_boston_grouping_example_applies(store: PostgresEventStore, tenant_id: str) -> None:
    example = EXAMPLE.parent / "boston-grouping.json"
    settings = json.loads(example.read_text(encoding="utf-8"))
    result = apply_config(store, tenant_id, {"grouping": settings}, occurred_at=NOW)
    config = load_tenant(store, tenant_id)

    assert result.changed == ["grouping"]
    assert config is not None
    assert config.grouping.distance_m == 50
    assert config.grouping.is_placeholder(42.3594, -71.0587)
    assert not config.grouping.is_placeholder(42.3694, -71.0587)
