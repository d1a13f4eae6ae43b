"""SLA policies as the SLA read model applies them: matching, targets and due times.

`SlaConfig` is the part of a tenant's configuration the SLA fold needs, built from the
payloads of the tenant's configuration events. Without configured policies a tenant has
one implicit policy, "default", built from the calendar-hour targets of its TenantCreated
event.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from ledger.business_time import BusinessCalendar, add_business_duration, business_duration
from ledger.config_sections import (
    CALENDARS_CONFIGURED,
    ROUTING_CONFIGURED,
    SLA_POLICIES_CONFIGURED,
    UNIT_SECONDS,
    calendar_from_payload,
    parse_target,
)
from ledger.tenants import CATEGORIES_CONFIGURED, TENANT_CREATED

# The tenant configuration events the SLA fold reads.
SLA_CONFIG_EVENT_TYPES = frozenset(
    {
        TENANT_CREATED,
        CATEGORIES_CONFIGURED,
        CALENDARS_CONFIGURED,
        SLA_POLICIES_CONFIGURED,
        ROUTING_CONFIGURED,
    }
)
DEFAULT_POLICY = "default"
DEFAULT_WARNING_RATIO = 0.8

Clock = Literal["business", "calendar"]
Pause = tuple[datetime, datetime]


@dataclass(frozen=True, slots=True)
class Target:
    """A first-response or resolution target: an amount of business or calendar time."""

    duration: timedelta
    clock: Clock
    text: str


@dataclass(frozen=True, slots=True)
class Policy:
    """One SLA policy; `None` conditions match any value."""

    id: str
    categories: frozenset[str] | None
    severities: frozenset[str] | None
    channels: frozenset[str] | None
    calendar: BusinessCalendar | None
    first_response: Target | None
    resolution: Target | None
    warning_ratio: float
    on_reopen: Literal["resume", "restart"]
    on_category_change: Literal["reassess", "keep"]

    def matches(self, category: str | None, severity: str | None, channel: str | None) -> bool:
        return (
            _condition(self.categories, category)
            and _condition(self.severities, severity)
            and _condition(self.channels, channel)
        )

    def due_at(self, target: Target, start: datetime, pauses: list[Pause]) -> datetime:
        """Return when `target` is reached, counting from `start` and not counting pauses."""
        return self._reached(target.duration, target.clock, start, pauses)

    def warning_at(self, target: Target, start: datetime, pauses: list[Pause]) -> datetime:
        """Return when the warning share of `target` is reached."""
        return self._reached(target.duration * self.warning_ratio, target.clock, start, pauses)

    def _reached(
        self, duration: timedelta, clock: Clock, start: datetime, pauses: list[Pause]
    ) -> datetime:
        if clock == "calendar" or self.calendar is None:
            return start + duration + sum((end - begin for begin, end in pauses), timedelta(0))
        calendar = self.calendar
        paused = sum(
            (business_duration(calendar, begin, end) for begin, end in pauses), timedelta(0)
        )
        return add_business_duration(calendar, start, duration + paused)


def _condition(allowed: frozenset[str] | None, value: str | None) -> bool:
    return allowed is None or (value is not None and value in allowed)


@dataclass(frozen=True, slots=True)
class Route:
    categories: frozenset[str] | None
    areas: frozenset[str] | None
    department: str


@dataclass(frozen=True, slots=True)
class SlaConfig:
    """A tenant's SLA configuration at one version of its configuration stream."""

    version: int
    policies: tuple[Policy, ...]
    departments: dict[str, str]
    routes: tuple[Route, ...]
    first_response_hours: float
    resolution_hours: float
    category_resolution_hours: dict[str, float]

    def policy_for(self, category: str | None, severity: str | None, channel: str | None) -> Policy:
        """Return the first configured policy that matches, or the tenant's default one."""
        for policy in self.policies:
            if policy.matches(category, severity, channel):
                return policy
        return self._default_policy(category)

    def policy_by_id(self, policy_id: str, category: str | None) -> Policy | None:
        if policy_id == DEFAULT_POLICY:
            return self._default_policy(category)
        return next((policy for policy in self.policies if policy.id == policy_id), None)

    def _default_policy(self, category: str | None) -> Policy:
        hours = self.resolution_hours
        if category is not None:
            hours = self.category_resolution_hours.get(category, hours)
        return Policy(
            id=DEFAULT_POLICY,
            categories=None,
            severities=None,
            channels=None,
            calendar=None,
            first_response=_hours_target(self.first_response_hours),
            resolution=_hours_target(hours),
            warning_ratio=DEFAULT_WARNING_RATIO,
            on_reopen="resume",
            on_category_change="reassess",
        )

    def department_for(self, category: str | None, area: str | None) -> str | None:
        return routed_department(self.routes, self.departments, category, area)


def routed_department(
    routes: tuple[Route, ...], departments: dict[str, str], category: str | None, area: str | None
) -> str | None:
    """Return the department of the first matching route, else the category's department."""
    for route in routes:
        if _condition(route.categories, category) and _condition(route.areas, area):
            return route.department
    return departments.get(category) if category is not None else None


def routing_from_payloads(
    payloads: dict[str, dict[str, Any]],
) -> tuple[tuple[Route, ...], dict[str, str]]:
    """Return the routes and the category departments stored in configuration payloads."""
    departments = {
        item["name"]: item["department"]
        for item in payloads.get(CATEGORIES_CONFIGURED, {}).get("categories", [])
        if item.get("department")
    }
    routes = tuple(
        Route(
            _optional_set(item.get("categories")),
            _optional_set(item.get("areas")),
            item["department"],
        )
        for item in payloads.get(ROUTING_CONFIGURED, {}).get("routes", [])
    )
    return routes, departments


def _hours_target(hours: float) -> Target:
    return Target(timedelta(hours=hours), "calendar", f"{hours:g} calendar hours")


def sla_config_from_payloads(version: int, payloads: dict[str, dict[str, Any]]) -> SlaConfig:
    """Build the SlaConfig from the latest payload of each configuration event type."""
    created = payloads[TENANT_CREATED]
    calendars = {
        item["name"]: (calendar_from_payload(item), float(item["business_day_hours"]))
        for item in payloads.get(CALENDARS_CONFIGURED, {}).get("calendars", [])
    }
    policies = tuple(
        _policy(item, calendars)
        for item in payloads.get(SLA_POLICIES_CONFIGURED, {}).get("policies", [])
    )
    routes, departments = routing_from_payloads(payloads)
    return SlaConfig(
        version=version,
        policies=policies,
        departments=departments,
        routes=routes,
        first_response_hours=float(created["first_response_hours"]),
        resolution_hours=float(created["resolution_hours"]),
        category_resolution_hours={
            name: float(hours)
            for name, hours in created.get("category_resolution_hours", {}).items()
        },
    )


def _policy(item: dict[str, Any], calendars: dict[str, tuple[BusinessCalendar, float]]) -> Policy:
    calendar, day_hours = calendars.get(item.get("calendar") or "", (None, 24.0))
    match = item.get("match") or {}
    return Policy(
        id=item["id"],
        categories=_optional_set(match.get("categories")),
        severities=_optional_set(match.get("severities")),
        channels=_optional_set(match.get("channels")),
        calendar=calendar,
        first_response=_target(item.get("first_response"), day_hours),
        resolution=_target(item.get("resolution"), day_hours),
        warning_ratio=float(item.get("warning_percent", 80.0)) / 100,
        on_reopen=item.get("on_reopen", "resume"),
        on_category_change=item.get("on_category_change", "reassess"),
    )


def _target(text: str | None, business_day_hours: float) -> Target | None:
    if text is None:
        return None
    amount, clock, unit = parse_target(text)
    if clock == "business" and unit == "day":
        # A business day lasts the calendar's business_day_hours, not 24 hours.
        seconds = amount * business_day_hours * 3600
    else:
        seconds = amount * UNIT_SECONDS[unit]
    return Target(
        timedelta(seconds=seconds), "business" if clock == "business" else "calendar", text
    )


def _optional_set(values: list[str] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(values)
