"""Tenant configuration sections: validation of a configuration document and its events.

A configuration document (a YAML or JSON file, or a request body) is an object whose keys
are section names. Each section is validated by its entry in SECTIONS and stored as one
event type in the tenant's stream. The event's payload is the section as validated, so an
unchanged section is recognized by comparing payloads. Another section plugs in with one
`register_section` call.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from ledger.business_time import BusinessCalendar
from ledger.dashboards import DASHBOARDS_CONFIGURED, Dashboard, validate_dashboards
from ledger.errors import CommandInvalid, ConfigInvalid, ConfigProblem
from ledger.events import NewEvent, normalize_json
from ledger.grouping import GROUPING_CONFIGURED, validate_grouping
from ledger.lifecycle import SEVERITIES
from ledger.store import PostgresEventStore
from ledger.tenants import (
    CATEGORIES_CONFIGURED,
    TenantConfig,
    require_tenant,
    tenant_stream_id,
    validate_categories,
    validate_time_zone,
)

CALENDARS_CONFIGURED = "BusinessCalendarsConfigured"
SLA_POLICIES_CONFIGURED = "SlaPoliciesConfigured"
ROUTING_CONFIGURED = "RoutingConfigured"

WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_WINDOW = re.compile(r"^(\d{2}):(\d{2})-(\d{2}):(\d{2})$")
_TARGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s+(business|calendar)\s+(minute|hour|day)s?\s*$")
UNIT_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}


@dataclass
class SectionContext:
    """Context of a section's validation, besides the section's own value."""

    # Folder of the configuration file, for files a section names (None for API bodies).
    base_dir: Path | None
    # Payloads of the sections validated before this one in the same document, by name,
    # falling back to the tenant's current payloads for sections the document leaves out.
    payloads: dict[str, dict[str, Any]] = field(default_factory=dict)


SectionValidator = Callable[[Any, SectionContext], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class ConfigSection:
    """A section of the tenant configuration and the event type that stores it."""

    name: str
    event_type: str
    validate: SectionValidator
    # The model of one entry of a list section, whose fields an error about an unknown
    # field lists as the allowed ones.
    entry_model: type[BaseModel] | None = None


SECTIONS: dict[str, ConfigSection] = {}


def register_section(section: ConfigSection) -> None:
    """Add a section; sections are validated in the order they were registered."""
    if section.name in SECTIONS:
        raise ValueError(f"configuration section {section.name!r} is registered twice")
    SECTIONS[section.name] = section


def section_for_event(event_type: str) -> ConfigSection | None:
    for section in SECTIONS.values():
        if section.event_type == event_type:
            return section
    return None


# Categories: the existing CategoriesConfigured document.


def _validate_categories(value: Any, context: SectionContext) -> dict[str, Any]:
    document = {"categories": value} if isinstance(value, list) else value
    return validate_categories(document)


# Business calendars.


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CalendarSpec(_Strict):
    """A business calendar: weekly hours in a time zone, and holidays."""

    name: Annotated[str, Field(min_length=1, max_length=100)]
    time_zone: str
    weekly_hours: dict[Literal[WEEKDAYS], list[str]]  # type: ignore[valid-type]
    holidays: list[date] = []
    # An iCalendar file of holidays, read relative to the configuration file; its dates
    # are merged into `holidays` before the event is stored.
    holidays_ics: str | None = None
    # The length of one business day, for targets given in business days.
    business_day_hours: Annotated[float, Field(gt=0, le=24)] = 8.0

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            return validate_time_zone(value)
        except CommandInvalid as error:
            raise ValueError(str(error)) from None

    @field_validator("weekly_hours")
    @classmethod
    def _windows(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for day, windows in value.items():
            parsed = [parse_window(text) for text in windows]
            if sorted(parsed) != parsed or any(
                parsed[i][1] > parsed[i + 1][0] for i in range(len(parsed) - 1)
            ):
                raise ValueError(f"the windows of {day} overlap or are out of order: {windows}")
        if not any(value.values()):
            raise ValueError("no opening hours at all: give at least one window")
        return value


def parse_window(text: str) -> tuple[int, int]:
    """Parse "HH:MM-HH:MM" into minutes after midnight; "24:00" ends a window at midnight."""
    match = _WINDOW.match(text)
    if match is None:
        raise ValueError(f"invalid window {text!r}: write it as HH:MM-HH:MM, e.g. 09:00-17:00")
    hour1, minute1, hour2, minute2 = (int(group) for group in match.groups())
    start, end = hour1 * 60 + minute1, hour2 * 60 + minute2
    if minute1 > 59 or minute2 > 59 or not 0 <= start < end <= 24 * 60:
        raise ValueError(
            f"invalid window {text!r}: the start must come before the end, within 00:00-24:00"
        )
    return start, end


def read_ics_holidays(data: bytes, source: str) -> list[date]:
    """Return the dates of all-day events in an iCalendar file, each day of each event.

    Events with a time of day are left out.

    Raises ValueError naming `source` when the data is not iCalendar.
    """
    import icalendar  # imported here: only configuration changes read ICS files

    try:
        calendar = icalendar.Calendar.from_ical(data)
    except ValueError as error:
        raise ValueError(f"{source} is not a valid iCalendar file: {error}") from None
    days: set[date] = set()
    for event in calendar.walk("VEVENT"):
        start = event.decoded("DTSTART", None)
        # An event with a time of day (a meeting, a closure of some hours) is not a holiday,
        # which is a whole day.
        if start is None or isinstance(start, datetime):
            continue
        day = _as_date(start)
        end = event.decoded("DTEND", None)
        days.add(day)
        if end is None:
            continue
        # DTEND of an all-day event is the day after its last day (RFC 5545, 3.6.1).
        last = _as_date(end)
        while (day := day + timedelta(days=1)) < last:
            days.add(day)
    return sorted(days)


def _as_date(value: date | datetime) -> date:
    return value.date() if isinstance(value, datetime) else value


def _validate_calendars(value: Any, context: SectionContext) -> dict[str, Any]:
    specs = TypeAdapter(list[CalendarSpec]).validate_python(_as_list(value, "calendars"))
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"calendar name(s) {', '.join(duplicates)} listed twice: use unique names")
    calendars = []
    for spec in specs:
        holidays = set(spec.holidays)
        if spec.holidays_ics is not None:
            holidays.update(_ics_file_dates(spec.holidays_ics, context))
        calendars.append(
            {
                "name": spec.name,
                "time_zone": spec.time_zone,
                "weekly_hours": {day: spec.weekly_hours.get(day, []) for day in WEEKDAYS},
                "holidays": [day.isoformat() for day in sorted(holidays)],
                "business_day_hours": spec.business_day_hours,
            }
        )
    return {"calendars": calendars}


def _ics_file_dates(name: str, context: SectionContext) -> list[date]:
    if context.base_dir is None:
        raise ValueError(
            "holidays_ics names a file, which only `civicpulse config apply` can read; "
            "upload the file to the calendar's holidays endpoint instead"
        )
    path = context.base_dir / name
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror}") from None
    return read_ics_holidays(data, str(path))


def calendar_from_payload(payload: dict[str, Any]) -> BusinessCalendar:
    """Build the BusinessCalendar of one stored calendar entry."""
    return BusinessCalendar(
        payload["time_zone"],
        tuple(
            tuple(parse_window(text) for text in payload["weekly_hours"].get(day, []))
            for day in WEEKDAYS
        ),
        frozenset(date.fromisoformat(text) for text in payload["holidays"]),
    )


# SLA policies.


class MatchSpec(_Strict):
    """Conditions of a policy; a missing list matches any value."""

    categories: list[str] | None = None
    severities: list[Literal[SEVERITIES]] | None = None  # type: ignore[valid-type]
    channels: list[str] | None = None


def parse_target(text: str) -> tuple[float, str, str]:
    """Parse "4 business hours" into (4.0, "business", "hour")."""
    match = _TARGET.match(text)
    if match is None:
        raise ValueError(
            f"invalid target {text!r}: write a number, business or calendar, and minutes, "
            "hours or days, e.g. '4 business hours' or '3 calendar days'"
        )
    amount = float(match.group(1))
    if amount <= 0:
        raise ValueError(f"invalid target {text!r}: the number must be positive")
    return amount, match.group(2), match.group(3)


class PolicySpec(_Strict):
    """One SLA policy: the first policy whose conditions match an incident applies."""

    id: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")]
    match: MatchSpec = MatchSpec()
    calendar: str | None = None
    first_response: str | None = None
    resolution: str | None = None
    warning_percent: Annotated[float, Field(gt=0, lt=100)] = 80.0
    on_reopen: Literal["resume", "restart"] = "resume"
    # "reassess": a category or severity change picks the policy again, from the
    # configuration in force at the change; "keep": the policy at submission stays.
    on_category_change: Literal["reassess", "keep"] = "reassess"

    @field_validator("first_response", "resolution")
    @classmethod
    def _target(cls, value: str | None) -> str | None:
        if value is not None:
            parse_target(value)
        return value

    @model_validator(mode="after")
    def _business_needs_calendar(self) -> PolicySpec:
        for label, target in (
            ("first_response", self.first_response),
            ("resolution", self.resolution),
        ):
            if target is not None and parse_target(target)[1] == "business" and not self.calendar:
                raise ValueError(
                    f"{label} {target!r} counts business time but the policy names no calendar: "
                    "set calendar to one of the tenant's calendars"
                )
        if self.first_response is None and self.resolution is None:
            raise ValueError("a policy needs a first_response or a resolution target, or both")
        return self


def _validate_policies(value: Any, context: SectionContext) -> dict[str, Any]:
    specs = TypeAdapter(list[PolicySpec]).validate_python(_as_list(value, "policies"))
    ids = [spec.id for spec in specs]
    duplicates = sorted({policy for policy in ids if ids.count(policy) > 1})
    if duplicates:
        raise ValueError(f"policy id(s) {', '.join(duplicates)} listed twice: use unique ids")
    known = {item["name"] for item in context.payloads.get("calendars", {}).get("calendars", [])}
    for spec in specs:
        if spec.calendar is not None and spec.calendar not in known:
            raise ValueError(
                f"policy {spec.id!r} names calendar {spec.calendar!r}, which is not configured: "
                f"use one of {', '.join(sorted(known)) or 'the calendars section (none yet)'}"
            )
    return {"policies": [spec.model_dump(mode="json") for spec in specs]}


# Routing.


class RouteSpec(_Strict):
    """A routing rule: incidents of these categories (and areas) go to this department."""

    categories: list[str] | None = None
    areas: list[str] | None = None
    department: Annotated[str, Field(min_length=1, max_length=200)]


# NOTE: the categories that routing rules and policy matches name are not checked against
# the categories section, because submitted and imported reports may carry categories that
# the section does not list (only a staff reclassification is checked against it).
def _validate_routing(value: Any, context: SectionContext) -> dict[str, Any]:
    routes = TypeAdapter(list[RouteSpec]).validate_python(_as_list(value, "routes"))
    return {"routes": [route.model_dump(mode="json") for route in routes]}


def _as_list(value: Any, key: str) -> list[Any]:
    if isinstance(value, dict) and set(value) == {key}:
        value = value[key]
    if not isinstance(value, list):
        raise ValueError(
            f"expected a list (or an object with only {key!r}), got {type(value).__name__}"
        )
    return value


register_section(ConfigSection("categories", CATEGORIES_CONFIGURED, _validate_categories))
register_section(
    ConfigSection("calendars", CALENDARS_CONFIGURED, _validate_calendars, CalendarSpec)
)
register_section(
    ConfigSection("sla_policies", SLA_POLICIES_CONFIGURED, _validate_policies, PolicySpec)
)
register_section(ConfigSection("routing", ROUTING_CONFIGURED, _validate_routing, RouteSpec))


def _validate_grouping(value: Any, context: SectionContext) -> dict[str, Any]:
    return validate_grouping(value).to_payload()


register_section(ConfigSection("grouping", GROUPING_CONFIGURED, _validate_grouping))


def _validate_dashboards(value: Any, context: SectionContext) -> dict[str, Any]:
    return validate_dashboards(value)


register_section(
    ConfigSection("dashboards", DASHBOARDS_CONFIGURED, _validate_dashboards, Dashboard)
)


def _kind(value: Any) -> str:
    """Name a parsed JSON or YAML value's kind as a reader of the file would."""
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    return "not an object"


def validate_document(
    document: Any, current: dict[str, dict[str, Any]], base_dir: Path | None
) -> dict[str, dict[str, Any]]:
    """Validate every section of a configuration document; return payloads by section.

    `current` contains the tenant's stored payloads, which sections may refer to. Raises
    ConfigInvalid listing every problem found, in every section.
    """
    if document is None:
        raise ConfigInvalid(
            [
                ConfigProblem(
                    "(document)",
                    "",
                    None,
                    "the document is empty: write an object of sections, such as "
                    "`sla_policies:` with a list of policies",
                )
            ]
        )
    if not isinstance(document, dict):
        raise ConfigInvalid(
            [
                ConfigProblem(
                    "(document)",
                    "",
                    None,
                    f"the document is {_kind(document)}: write an object of sections, such as "
                    "`sla_policies:` with a list of policies",
                )
            ]
        )
    unknown = sorted(set(document) - set(SECTIONS))
    if unknown:
        raise ConfigInvalid(
            [
                ConfigProblem(name, "", None, f"unknown section; use one of {', '.join(SECTIONS)}")
                for name in unknown
            ]
        )
    problems: list[ConfigProblem] = []
    payloads: dict[str, dict[str, Any]] = {}
    context = SectionContext(base_dir, dict(current))
    for name, section in SECTIONS.items():
        if name not in document:
            continue
        try:
            payload = section.validate(document[name], context)
        except ValidationError as error:
            problems.extend(_problems(name, error, section.entry_model))
            continue
        except (ValueError, CommandInvalid) as error:
            # The message names the entry at fault, so a list or object (the whole section)
            # is left out as the value.
            value = document[name]
            scalar = None if isinstance(value, list | dict) else _short(value)
            problems.append(ConfigProblem(name, "", scalar, str(error)))
            continue
        payloads[name] = payload
        context.payloads[name] = payload
    if not problems:
        problems.extend(_calendars_in_use(document, context.payloads))
    if problems:
        raise ConfigInvalid(problems)
    return payloads


def _calendars_in_use(
    document: dict[str, Any], payloads: dict[str, dict[str, Any]]
) -> list[ConfigProblem]:
    """Return a problem for each calendar that a document removes while policies name it.

    A document with an `sla_policies` section had its policies checked against the
    resulting calendars already, so only the stored policies are checked here.
    """
    if "calendars" not in document or "sla_policies" in document:
        return []
    names = {item["name"] for item in payloads.get("calendars", {}).get("calendars", [])}
    users: dict[str, list[str]] = {}
    for policy in payloads.get("sla_policies", {}).get("policies", []):
        calendar = policy.get("calendar")
        if calendar is not None and calendar not in names:
            users.setdefault(calendar, []).append(policy["id"])
    return [
        ConfigProblem(
            "calendars",
            "",
            calendar,
            f"calendar {calendar!r} is removed but SLA policies {', '.join(policies)} name it: "
            "keep the calendar, or change those policies' calendar in an sla_policies "
            "section of the same document",
        )
        for calendar, policies in sorted(users.items())
    ]


def _problems(
    section: str, error: ValidationError, entry_model: type[BaseModel] | None
) -> list[ConfigProblem]:
    """Turn pydantic's errors into problems with dotted field paths and actionable fixes."""
    problems = []
    for item in error.errors(include_url=False):
        location = [str(part) for part in item["loc"]]
        message = str(item["msg"]).removeprefix("Value error, ")
        if location and location[-1] == "[key]":
            # pydantic marks an invalid dictionary key with a "[key]" step after the key.
            location.pop()
            message = f"invalid key {item.get('input')!r}: {message}"
        if item["type"].startswith("date_"):
            message += "; use an existing date, written YYYY-MM-DD"
        if item["type"] == "extra_forbidden" and location:
            allowed = _allowed_fields(entry_model, item["loc"][:-1])
            message = f"unknown field {location[-1]!r}: " + (
                f"use {', '.join(allowed)}" if allowed else "remove it"
            )
        problems.append(
            ConfigProblem(section, ".".join(location), _short(item.get("input")), message)
        )
    return problems


def _allowed_fields(entry_model: type[BaseModel] | None, path: tuple[Any, ...]) -> list[str]:
    """Return the fields of the model found at `path` in a list of `entry_model` entries."""
    if entry_model is None:
        return []
    annotation: Any = list[entry_model]  # type: ignore[valid-type]
    for part in path:
        annotation = _without_none(annotation)
        origin = get_origin(annotation)
        if origin is list and isinstance(part, int):
            annotation = get_args(annotation)[0]
        elif origin is dict:
            annotation = get_args(annotation)[1]
        elif _is_model(annotation) and part in annotation.model_fields:
            annotation = annotation.model_fields[part].annotation
        else:
            return []
    annotation = _without_none(annotation)
    return list(annotation.model_fields) if _is_model(annotation) else []


def _without_none(annotation: Any) -> Any:
    """Return X for an optional `X | None`, else the annotation itself."""
    if get_origin(annotation) not in (Union, UnionType):
        return annotation
    arguments = [argument for argument in get_args(annotation) if argument is not type(None)]
    return arguments[0] if len(arguments) == 1 else annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _short(value: Any) -> Any:
    text = repr(value)
    return value if len(text) <= 120 else text[:117] + "..."


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """The outcome of applying a configuration document."""

    version: int
    changed: list[str]
    # Rules that name a category the categories section lacks (`category_warnings`).
    warnings: list[str] = field(default_factory=list)


# The sections whose rules name categories, with the categories section itself.
_CATEGORY_SECTIONS = ("categories", "sla_policies", "routing", "grouping")


def category_warnings(payloads: dict[str, dict[str, Any]]) -> list[str]:
    """Return a warning for each category that a rule names and the categories section lacks.

    Such a rule matches only reports whose category is exactly that name. That is right
    for an imported city's case types and wrong for a typo, so it is a warning and not an
    error. Without a categories section there is nothing to compare with.
    """
    configured = [item["name"] for item in payloads.get("categories", {}).get("categories", [])]
    if not configured:
        return []
    named: list[tuple[str, str]] = []
    for policy in payloads.get("sla_policies", {}).get("policies", []):
        for category in (policy.get("match") or {}).get("categories") or []:
            named.append((f"SLA policy {policy['id']!r}", category))
    for number, route in enumerate(payloads.get("routing", {}).get("routes", []), start=1):
        for category in route.get("categories") or []:
            named.append((f"routing rule {number}", category))
    grouping = payloads.get("grouping", {})
    for related in grouping.get("related_categories") or []:
        for category in related:
            named.append(("grouping related_categories", category))
    for category in grouping.get("ungrouped_categories") or []:
        named.append(("grouping ungrouped_categories", category))
    warnings = []
    for where, category in named:
        if category in configured:
            continue
        warning = (
            f"{where} names category {category!r}, which the categories section lacks, so "
            "it matches only reports of exactly that category"
        )
        close = difflib.get_close_matches(category, configured, n=1)
        warnings.append(f"{warning}; did you mean {close[0]!r}?" if close else warning)
    return list(dict.fromkeys(warnings))


def current_payloads(config: TenantConfig) -> dict[str, dict[str, Any]]:
    """Return the tenant's stored payload of each registered section it has configured."""
    return {
        name: config.payloads[section.event_type]
        for name, section in SECTIONS.items()
        if section.event_type in config.payloads
    }


def apply_config(
    store: PostgresEventStore,
    tenant_id: str,
    document: Any,
    *,
    occurred_at: datetime,
    base_dir: Path | None = None,
    actor: str = "cli",
) -> ApplyResult:
    """Validate a configuration document and append one event per changed section.

    The events are appended together, expecting the version the document was validated
    against, so either every changed section is applied or none is. Sections equal to the
    stored ones append nothing. Raises TenantNotFound, ConfigInvalid, or ConcurrencyError
    when the configuration changed during the call.
    """
    config = require_tenant(store, tenant_id)
    current = current_payloads(config)
    payloads = validate_document(document, current, base_dir)
    events = []
    changed = []
    for name, payload in payloads.items():
        normalized = normalize_json(payload)
        if current.get(name) == normalized:
            continue
        changed.append(name)
        events.append(
            NewEvent(
                SECTIONS[name].event_type,
                normalized,
                occurred_at,
                metadata={"actor": actor, "role": "admin"},
            )
        )
    if not events:
        return ApplyResult(config.version, [])
    result = store.append(
        tenant_id, tenant_stream_id(tenant_id), events, expected_version=config.version
    )
    warnings = []
    if set(changed) & set(_CATEGORY_SECTIONS):
        warnings = category_warnings({**current, **payloads})
    return ApplyResult(result.stream_version, changed, warnings)


def import_holidays(
    store: PostgresEventStore,
    tenant_id: str,
    calendar_name: str,
    ics_data: bytes,
    *,
    occurred_at: datetime,
    actor: str,
) -> ApplyResult:
    """Add the days of an iCalendar file to the holidays of one of the tenant's calendars.

    Raises TenantNotFound, and ConfigInvalid when the calendar is not configured or the
    data is not iCalendar.
    """
    config = require_tenant(store, tenant_id)
    calendars = current_payloads(config).get("calendars", {}).get("calendars", [])
    names = [item["name"] for item in calendars]
    if calendar_name not in names:
        raise ConfigInvalid(
            [
                ConfigProblem(
                    "calendars",
                    "name",
                    calendar_name,
                    "no such calendar; configure it first or use one of "
                    f"{', '.join(names) or '(none)'}",
                )
            ]
        )
    try:
        days = read_ics_holidays(ics_data, "the uploaded file")
    except ValueError as error:
        raise ConfigInvalid(
            [ConfigProblem("calendars", f"{calendar_name}.holidays", "(file)", str(error))]
        ) from None
    updated = []
    for item in calendars:
        if item["name"] == calendar_name:
            merged = sorted({*item["holidays"], *(day.isoformat() for day in days)})
            item = {**item, "holidays": merged}
        updated.append(item)
    return apply_config(
        store, tenant_id, {"calendars": updated}, occurred_at=occurred_at, actor=actor
    )


def configuration_history(store: PostgresEventStore, tenant_id: str) -> list[dict[str, Any]]:
    """Return every version of the tenant's configuration: the event that made it."""
    require_tenant(store, tenant_id)
    history = []
    for event in store.read_stream(tenant_id, tenant_stream_id(tenant_id)):
        section = section_for_event(event.event_type)
        history.append(
            {
                "version": event.stream_version,
                "event_type": event.event_type,
                "section": section.name if section else None,
                "occurred_at": event.occurred_at,
                "recorded_at": event.recorded_at,
                "actor": event.metadata.get("actor"),
                "payload": event.payload,
            }
        )
    return history
