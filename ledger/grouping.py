"""Duplicate grouping: a tenant's grouping settings and the rule that pairs two reports.

Two reports are candidates for one group when both have a usable location (present and
outside every placeholder location of the tenant) and lie within `distance_m` of each other.
They must also be submitted within `window_hours` of each other, have the same or related
categories, and have texts at least `min_similarity` alike (rapidfuzz token set ratio, 0 to
100). A report whose category the tenant lists in `ungrouped_categories` is never a
candidate. The rule is symmetric, so groups built from it do not depend on which report arrived
first.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator
from rapidfuzz import fuzz, utils

from ledger.errors import CommandInvalid
from ledger.events import NewEvent
from ledger.store import PostgresEventStore

GROUPING_CONFIGURED = "GroupingConfigured"

EARTH_RADIUS_M = 6_371_008.8
# Reports are indexed by a grid cell of CELL_DEGREES in latitude and longitude: about
# 280 m north to south, and 280 m times cos(latitude) east to west.
CELL_DEGREES = 0.0025
_CELL_M = CELL_DEGREES * math.pi / 180 * EARTH_RADIUS_M
_CELL_ROW_WIDTH = 1_000_000
# How to correct each setting, for the messages of invalid documents.
_FIXES = {
    "distance_m": "give meters, more than 0 and at most 5000",
    "window_hours": "give hours, more than 0 and at most 2160 (90 days)",
    "min_similarity": "give a score from 0 (any text) to 100 (same words)",
    "related_categories": 'give pairs of two different category names, as [["A", "B"]]',
    "placeholders": "give objects with latitude, longitude and radius_m (0 to 10000)",
    "ungrouped_categories": 'give a list of category names, as ["Sticker Request"]',
}


class PlaceholderLocation(BaseModel):
    """A point that stands for an unknown location, such as a city's default point."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latitude: float = Field(ge=-90, le=90, allow_inf_nan=False)
    longitude: float = Field(ge=-180, le=180, allow_inf_nan=False)
    radius_m: float = Field(default=10.0, ge=0, le=10_000, allow_inf_nan=False)
    label: str | None = Field(default=None, max_length=200)


class GroupingSettings(BaseModel):
    """A tenant's duplicate grouping thresholds. The defaults apply until it sets its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    distance_m: float = Field(default=150.0, gt=0, le=5000, allow_inf_nan=False)
    window_hours: float = Field(default=72.0, gt=0, le=2160, allow_inf_nan=False)
    min_similarity: float = Field(default=50.0, ge=0, le=100, allow_inf_nan=False)
    related_categories: tuple[tuple[str, str], ...] = Field(default=(), max_length=1000)
    placeholders: tuple[PlaceholderLocation, ...] = Field(default=(), max_length=100)
    # Categories of requests that are each reporter's own, such as a bulk item pickup: two
    # of them at one address are two requests, not one issue reported twice.
    ungrouped_categories: tuple[str, ...] = Field(default=(), max_length=1000)

    _related: frozenset[tuple[str, str]] = PrivateAttr(default=frozenset())
    _related_to: dict[str | None, list[str | None]] = PrivateAttr(default_factory=dict)
    _ungrouped: frozenset[str | None] = PrivateAttr(default=frozenset())

    @field_validator("related_categories")
    @classmethod
    def _distinct_pairs(cls, pairs: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        cleaned = []
        for first, second in pairs:
            first, second = first.strip(), second.strip()
            if not first or not second or first == second:
                raise ValueError(f"pair {[first, second]!r} needs two different category names")
            cleaned.append((first, second))
        return tuple(cleaned)

    @field_validator("ungrouped_categories")
    @classmethod
    def _category_names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        cleaned = tuple(name.strip() for name in names)
        if any(not name for name in cleaned):
            raise ValueError("a category name is empty: remove it or give the name")
        return cleaned

    def model_post_init(self, context: Any, /) -> None:
        pairs = frozenset(self.related_categories)
        self._related = pairs | frozenset((second, first) for first, second in pairs)
        self._ungrouped = frozenset(self.ungrouped_categories)

    def groups(self, category: str | None) -> bool:
        """Return False for a category the tenant never groups."""
        return category not in self._ungrouped

    def related(self, first: str | None, second: str | None) -> bool:
        """Return True for equal categories (None included) and for related pairs."""
        if first == second:
            return True
        if first is None or second is None:
            return False
        return (first, second) in self._related

    def categories_related_to(self, category: str | None) -> list[str | None]:
        """Return the category itself and every category related to it."""
        related = self._related_to.get(category)
        if related is None:
            related = [category, *(b for a, b in self._related if a == category)]
            self._related_to[category] = related
        return related

    def is_placeholder(self, latitude: float, longitude: float) -> bool:
        for place in self.placeholders:
            # A degree of latitude is at least 110 km: most points fail this cheap test.
            if abs(latitude - place.latitude) * 110_000 > place.radius_m:
                continue
            if distance_m(latitude, longitude, place.latitude, place.longitude) <= place.radius_m:
                return True
        return False

    def to_payload(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


DEFAULT_SETTINGS = GroupingSettings()


def validate_grouping(document: Any) -> GroupingSettings:
    """Check a grouping settings document; raise CommandInvalid naming the field and the fix.

    Missing fields take the defaults. This is the `validate` half of the pair that a
    configuration file's `grouping:` section is checked and applied with.
    """
    if not isinstance(document, dict):
        raise CommandInvalid(
            f"invalid grouping settings {document!r}: expected an object with " + ", ".join(_FIXES)
        )
    try:
        return GroupingSettings.model_validate(document)
    except ValidationError as error:
        problem = error.errors()[0]
        location = ".".join(str(part) for part in problem["loc"]) or "grouping"
        field = str(problem["loc"][0]) if problem["loc"] else ""
        fix = _FIXES.get(field, "remove it; the settings are " + ", ".join(_FIXES))
        # The settings are JSON, where pydantic's tuples are lists.
        message = problem["msg"].replace("valid tuple", "list")
        raise CommandInvalid(
            f"invalid grouping setting {location} = {problem.get('input')!r}: {message}; {fix}"
        ) from error


def configure_grouping(
    store: PostgresEventStore,
    tenant_id: str,
    document: Any,
    *,
    occurred_at: datetime,
    actor: str = "cli",
) -> GroupingSettings:
    """Append a GroupingConfigured event that replaces the tenant's grouping settings.

    Raises TenantNotFound, and CommandInvalid when the document is invalid. This is the
    `configure` half of the pair; each call is a new version in the tenant's stream.
    """
    from ledger.tenants import require_tenant, tenant_stream_id

    settings = validate_grouping(document)
    require_tenant(store, tenant_id)
    event = NewEvent(
        GROUPING_CONFIGURED,
        settings.to_payload(),
        occurred_at,
        metadata={"actor": actor, "role": "admin"},
    )
    # The new settings replace the old ones whatever came between, so no expected version.
    store.append(tenant_id, tenant_stream_id(tenant_id), [event], expected_version=None)
    return settings


def settings_from_payload(payload: dict[str, Any]) -> GroupingSettings:
    """Read the settings of a stored GroupingConfigured event."""
    return GroupingSettings.model_validate(payload)


@dataclass(slots=True)
class GroupedReport:
    """The fields of a report that the grouping rule reads."""

    incident_id: Any  # UUID; typed loosely so rows from the database fit as they are
    submitted_at: datetime
    category: str | None
    category_source: str | None
    text: str
    latitude: float | None
    longitude: float | None

    @property
    def located(self) -> bool:
        return self.latitude is not None and self.longitude is not None


def report_text(payload: dict[str, Any]) -> str:
    """Return the words of a report that text similarity compares: title and description."""
    parts = [payload.get("title"), payload.get("description")]
    return " ".join(part for part in parts if isinstance(part, str) and part.strip())


def distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Return the great-circle distance in meters (haversine on a sphere)."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dphi = phi2 - phi1
    dlambda = math.radians(lon2 - lon1)
    a = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlambda / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


def cell_of(latitude: float, longitude: float) -> int:
    """Return the grid cell key of a point: row and column packed into one integer."""
    row = math.floor(latitude / CELL_DEGREES)
    column = math.floor(longitude / CELL_DEGREES)
    return row * _CELL_ROW_WIDTH + column


def cells_near(latitude: float, longitude: float, radius_m: float) -> list[int]:
    """Return the keys of every cell that contains a point within `radius_m` of the given one."""
    row = math.floor(latitude / CELL_DEGREES)
    column = math.floor(longitude / CELL_DEGREES)
    base = row * _CELL_ROW_WIDTH + column
    return [base + offset for offset in _offsets_near(row, radius_m)]


@functools.lru_cache(maxsize=65_536)
def _offsets_near(row: int, radius_m: float) -> tuple[int, ...]:
    """Return the cell key offsets to search around any point of a row of cells."""
    rows = math.ceil(radius_m / _CELL_M)
    # Columns narrow toward the poles: take the widest span over the rows searched, from
    # the row's edge farther from the equator.
    edge = max(abs(row), abs(row + 1)) * CELL_DEGREES
    widest = min(89.9, edge + (rows + 1) * CELL_DEGREES)
    columns = math.ceil(radius_m / (_CELL_M * math.cos(math.radians(widest))))
    return _cell_offsets(rows, columns)


@functools.cache
def _cell_offsets(rows: int, columns: int) -> tuple[int, ...]:
    return tuple(
        dy * _CELL_ROW_WIDTH + dx
        for dy in range(-rows, rows + 1)
        for dx in range(-columns, columns + 1)
    )


def text_similarity(first: str, second: str) -> float:
    """Return how alike two texts are, 0 to 100 (token set ratio after lowercasing)."""
    return float(fuzz.token_set_ratio(_processed(first), _processed(second), processor=None))


@functools.lru_cache(maxsize=65_536)
def _processed(text: str) -> str:
    """Return the text as the similarity compares it: lowercased, without punctuation.

    Cached, because a report is compared with every report near it and its text would
    otherwise be processed again for each pair.
    """
    return utils.default_process(text)


def usable_location(settings: GroupingSettings, report: GroupedReport) -> bool:
    """Return True when the report has a location that is not a placeholder."""
    if report.latitude is None or report.longitude is None:
        return False
    return not settings.is_placeholder(report.latitude, report.longitude)


def candidates(
    settings: GroupingSettings,
    first: GroupedReport,
    second: GroupedReport,
    *,
    checked_locations: bool = False,
) -> bool:
    """Return True when two reports are candidates for one group (a symmetric rule).

    A report without text on either side is judged on location, time and category alone.
    With `checked_locations`, the caller has already checked that both locations are usable.
    """
    if not settings.related(first.category, second.category):
        return False
    # The private set behind `groups` is read through pydantic's __getattr__ on each call,
    # and most tenants list no ungrouped category, so the public field is tested first.
    if settings.ungrouped_categories and (
        not settings.groups(first.category) or not settings.groups(second.category)
    ):
        return False
    window = settings.window_hours * 3600
    if abs((first.submitted_at - second.submitted_at).total_seconds()) > window:
        return False
    if not checked_locations and (
        not usable_location(settings, first) or not usable_location(settings, second)
    ):
        return False
    assert first.latitude is not None and first.longitude is not None
    assert second.latitude is not None and second.longitude is not None
    if (
        distance_m(first.latitude, first.longitude, second.latitude, second.longitude)
        > settings.distance_m
    ):
        return False
    if first.text and second.text and settings.min_similarity > 0:
        return text_similarity(first.text, second.text) >= settings.min_similarity
    return True
