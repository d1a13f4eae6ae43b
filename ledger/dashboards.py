"""Tenant dashboards: the `dashboards` configuration section and its widgets.

A dashboard is a named, ordered list of widgets. Each widget reads one read model and
is public (shown on the tenant's public page and served without a key) or private (staff,
officers and admins only). Widgets are off the public page unless `public: true` is set.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from ledger.errors import DashboardNotFound
from ledger.tenants import TenantConfig

DASHBOARDS_CONFIGURED = "DashboardsConfigured"

SLUG = r"^[a-z0-9][a-z0-9-]{0,62}$"
DEFAULT_TITLES = {
    "on_time_rate": "On-time rate",
    "backlog": "Backlog over time",
    "time_to_close": "Time to close",
    "ranking": "Ranking by on-time rate",
    "open_map": "Open incidents and duplicate groups",
    "recent_seals": "Recent ledger seals",
}


class _Widget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    id: Annotated[str, Field(pattern=SLUG, description="Unique within the dashboard")]
    title: Annotated[str | None, Field(min_length=1, max_length=200)] = None
    public: bool = False

    @property
    def heading(self) -> str:
        return self.title or DEFAULT_TITLES[self.kind]


class OnTimeRateWidget(_Widget):
    """Share of judged incidents not breached, per category or department."""

    kind: Literal["on_time_rate"]
    by: Literal["category", "department"] = "department"
    limit: Annotated[int, Field(ge=1, le=500)] = 20


class BacklogWidget(_Widget):
    """Opened, closed and open incidents per period, ending with the period of `as_of`."""

    kind: Literal["backlog"]
    period: Literal["day", "week", "month"] = "week"
    periods: Annotated[int, Field(ge=1, le=400)] = 26


class TimeToCloseWidget(_Widget):
    """How long incidents resolved in the last `span_days` days took, in calendar time."""

    kind: Literal["time_to_close"]
    span_days: Annotated[int, Field(ge=1, le=3660)] = 90


class RankingWidget(_Widget):
    """Departments or areas ranked by on-time rate, with a minimum number of cases."""

    kind: Literal["ranking"]
    by: Literal["department", "area"] = "department"
    min_cases: Annotated[int, Field(ge=1, le=100_000)] = 20
    span_days: Annotated[int | None, Field(ge=1, le=3660)] = None
    limit: Annotated[int, Field(ge=1, le=500)] = 20


class OpenMapWidget(_Widget):
    """Incidents open at `as_of` with a location, newest first, and their duplicate groups."""

    kind: Literal["open_map"]
    limit: Annotated[int, Field(ge=1, le=5000)] = 1000


class RecentSealsWidget(_Widget):
    """The latest ledger seals: Merkle roots anyone can copy and compare later."""

    kind: Literal["recent_seals"]
    limit: Annotated[int, Field(ge=1, le=100)] = 5


Widget = Annotated[
    OnTimeRateWidget
    | BacklogWidget
    | TimeToCloseWidget
    | RankingWidget
    | OpenMapWidget
    | RecentSealsWidget,
    Field(discriminator="kind"),
]


class Dashboard(BaseModel):
    """A named list of widgets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=SLUG)]
    title: Annotated[str | None, Field(min_length=1, max_length=200)] = None
    widgets: Annotated[list[Widget], Field(min_length=1, max_length=50)]

    @model_validator(mode="after")
    def _unique_widget_ids(self) -> Dashboard:
        ids = [widget.id for widget in self.widgets]
        duplicates = sorted({item for item in ids if ids.count(item) > 1})
        if duplicates:
            raise ValueError(
                f"widget id(s) {', '.join(duplicates)} listed twice in dashboard "
                f"{self.name!r}: use unique ids"
            )
        return self

    @property
    def heading(self) -> str:
        return self.title or self.name

    def widget(self, tenant_id: str, widget_id: str, *, public_only: bool) -> Widget:
        """Return the widget `widget_id`; raise DashboardNotFound naming the ones there are."""
        visible = [item for item in self.widgets if item.public or not public_only]
        for item in visible:
            if item.id == widget_id:
                return item
        raise DashboardNotFound(
            tenant_id,
            f"{'public ' if public_only else ''}widget {widget_id!r} of dashboard {self.name!r}",
            [item.id for item in visible],
        )


_DASHBOARDS = TypeAdapter(list[Dashboard])


def validate_dashboards(value: Any) -> dict[str, Any]:
    """Validate the `dashboards` section (a list, or an object with only `dashboards`)."""
    if isinstance(value, dict) and set(value) == {"dashboards"}:
        value = value["dashboards"]
    if not isinstance(value, list):
        raise ValueError(
            f"expected a list of dashboards (or an object with only 'dashboards'), "
            f"got {type(value).__name__}"
        )
    dashboards = _DASHBOARDS.validate_python(value)
    names = [item.name for item in dashboards]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(
            f"dashboard name(s) {', '.join(duplicates)} listed twice: use unique names"
        )
    return {"dashboards": [item.model_dump(mode="json", exclude_none=True) for item in dashboards]}


def tenant_dashboards(config: TenantConfig) -> list[Dashboard]:
    """Return the tenant's configured dashboards, in configuration order."""
    payload = config.payloads.get(DASHBOARDS_CONFIGURED)
    if payload is None:
        return []
    return _DASHBOARDS.validate_python(payload["dashboards"])


def find_dashboard(config: TenantConfig, name: str, *, public_only: bool) -> Dashboard:
    """Return the dashboard `name`; public callers only find dashboards with a public widget.

    Raises DashboardNotFound naming the dashboards the caller may see.
    """
    dashboards = [
        item
        for item in tenant_dashboards(config)
        if not public_only or any(widget.public for widget in item.widgets)
    ]
    for item in dashboards:
        if item.name == name:
            return item
    missing = f"{'public ' if public_only else ''}dashboard {name!r}"
    raise DashboardNotFound(config.tenant_id, missing, [item.name for item in dashboards])
