"""Tenants and their configuration, kept as a stream of events per tenant."""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ledger.errors import CommandInvalid, ConcurrencyError, TenantExists, TenantNotFound
from ledger.events import NewEvent, RecordedEvent
from ledger.grouping import (
    DEFAULT_SETTINGS,
    GROUPING_CONFIGURED,
    GroupingSettings,
    settings_from_payload,
)
from ledger.store import PostgresEventStore

TENANT_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")

TENANT_CREATED = "TenantCreated"
CATEGORIES_CONFIGURED = "CategoriesConfigured"
OPEN311_CONFIGURED = "Open311Configured"


@dataclass(frozen=True, slots=True)
class Category:
    """A category reports are classified into, with the department that handles it."""

    name: str
    department: str | None = None
    keywords: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """A tenant's configuration as folded from its configuration stream."""

    tenant_id: str
    name: str
    time_zone: str
    first_response_hours: float
    resolution_hours: float
    category_resolution_hours: dict[str, float] = field(default_factory=dict)
    version: int = 0
    categories: tuple[Category, ...] = ()
    # None means the classifier's default hazard words.
    hazard_words: tuple[str, ...] | None = None
    # Whether the Open311 facade serves the tenant's services and requests without a key.
    open311_public_reads: bool = False
    grouping: GroupingSettings = DEFAULT_SETTINGS
    # The latest payload of each configuration event type (sections of ledger.config_sections).
    payloads: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def category_names(self) -> list[str]:
        return [category.name for category in self.categories]

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.time_zone)

    def resolution_hours_for(self, category: str | None) -> float:
        if category is not None and category in self.category_resolution_hours:
            return self.category_resolution_hours[category]
        return self.resolution_hours


def tenant_stream_id(tenant_id: str) -> str:
    return f"tenant-{tenant_id}"


def validate_tenant_id(tenant_id: str) -> str:
    if not TENANT_ID_PATTERN.fullmatch(tenant_id):
        raise CommandInvalid(
            f"invalid tenant id {tenant_id!r}: use 2 to 63 lowercase letters, digits "
            "and hyphens, starting with a letter or digit"
        )
    return tenant_id


def validate_time_zone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as error:
        raise CommandInvalid(
            f"unknown time zone {name!r}: use an IANA name such as America/New_York"
        ) from error
    return name


def fold_tenant(tenant_id: str, events: list[RecordedEvent]) -> TenantConfig | None:
    config: TenantConfig | None = None
    for event in events:
        if event.event_type == TENANT_CREATED:
            payload = event.payload
            config = TenantConfig(
                tenant_id=tenant_id,
                name=payload["name"],
                time_zone=payload["time_zone"],
                first_response_hours=payload["first_response_hours"],
                resolution_hours=payload["resolution_hours"],
                category_resolution_hours=dict(payload.get("category_resolution_hours", {})),
                version=event.stream_version,
            )
        elif event.event_type == CATEGORIES_CONFIGURED and config is not None:
            config = replace(
                config,
                categories=_categories_from_payload(event.payload),
                hazard_words=_hazard_words_from_payload(event.payload),
                version=event.stream_version,
            )
        elif event.event_type == OPEN311_CONFIGURED and config is not None:
            config = replace(
                config,
                open311_public_reads=bool(event.payload["public_reads"]),
                version=event.stream_version,
            )
        elif event.event_type == GROUPING_CONFIGURED and config is not None:
            config = replace(
                config, grouping=settings_from_payload(event.payload), version=event.stream_version
            )
        elif config is not None:
            config = replace(config, version=event.stream_version)
        if config is not None and event.event_type != TENANT_CREATED:
            config = replace(config, payloads={**config.payloads, event.event_type: event.payload})
    return config


def _categories_from_payload(payload: dict[str, Any]) -> tuple[Category, ...]:
    return tuple(
        Category(
            name=item["name"],
            department=item.get("department"),
            keywords=tuple(item.get("keywords", ())),
        )
        for item in payload["categories"]
    )


def _hazard_words_from_payload(payload: dict[str, Any]) -> tuple[str, ...] | None:
    words = payload.get("hazard_words")
    return None if words is None else tuple(words)


def validate_categories(document: Any) -> dict[str, Any]:
    """Check a categories document and return it as an event payload.

    The document is `{"categories": [{"name", "department", "keywords"}], "hazard_words"}`,
    where `department`, `keywords` and `hazard_words` are optional. Raises CommandInvalid
    naming the first invalid entry.
    """
    if not isinstance(document, dict):
        raise CommandInvalid("invalid categories document: expected a JSON object")
    unknown = sorted(set(document) - {"categories", "hazard_words"})
    if unknown:
        raise CommandInvalid(
            f"unknown field(s) {', '.join(unknown)} in the categories document; "
            "use categories and hazard_words"
        )
    items = document.get("categories")
    if not isinstance(items, list) or not items:
        raise CommandInvalid("missing categories: give a non-empty list of categories")
    categories: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise CommandInvalid(f"invalid category #{number}: expected a JSON object")
        unknown_keys = sorted(set(item) - {"name", "department", "keywords"}, key=str)
        if unknown_keys:
            raise CommandInvalid(
                f"unknown field(s) {', '.join(map(str, unknown_keys))} in category #{number} "
                f"({item.get('name')!r}): use name, department and keywords"
            )
        name = item.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise CommandInvalid(
                f"invalid name {name!r} of category #{number}: use 1 to 200 characters"
            )
        name = name.strip()
        if name in seen:
            raise CommandInvalid(f"category {name!r} is listed twice")
        seen.add(name)
        department = item.get("department")
        if department is not None and not isinstance(department, str):
            raise CommandInvalid(f"invalid department {department!r} of category {name!r}")
        keywords = _word_list(item.get("keywords", []), f"keywords of category {name!r}")
        entry: dict[str, Any] = {"name": name, "keywords": keywords}
        if department:
            entry["department"] = department
        categories.append(entry)
    payload: dict[str, Any] = {"categories": categories}
    if document.get("hazard_words") is not None:
        payload["hazard_words"] = _word_list(document["hazard_words"], "hazard_words")
    return payload


def _word_list(value: Any, label: str) -> list[str]:
    if not isinstance(value, list) or not all(
        isinstance(word, str) and word.strip() for word in value
    ):
        raise CommandInvalid(f"invalid {label}: expected a list of non-empty strings")
    return [word.strip().lower() for word in value]


def configure_categories(
    store: PostgresEventStore,
    tenant_id: str,
    document: Any,
    *,
    occurred_at: datetime,
    actor: str = "cli",
) -> TenantConfig:
    """Append a CategoriesConfigured event that replaces the tenant's categories.

    Raises TenantNotFound, and CommandInvalid when the document is invalid.
    """
    require_tenant(store, tenant_id)
    payload = validate_categories(document)
    event = NewEvent(
        CATEGORIES_CONFIGURED, payload, occurred_at, metadata={"actor": actor, "role": "admin"}
    )
    # The new list replaces the old one whatever came between, so no expected version.
    store.append(tenant_id, tenant_stream_id(tenant_id), [event], expected_version=None)
    return require_tenant(store, tenant_id)


def configure_open311(
    store: PostgresEventStore,
    tenant_id: str,
    *,
    public_reads: bool,
    occurred_at: datetime,
    actor: str = "cli",
) -> TenantConfig:
    """Append an Open311Configured event that publishes or withdraws the tenant's Open311 reads.

    With `public_reads`, the Open311 facade lists services and requests to callers without an
    API key, as GeoReport v2 clients expect; submitting still needs a key. Raises
    TenantNotFound.
    """
    require_tenant(store, tenant_id)
    event = NewEvent(
        OPEN311_CONFIGURED,
        {"public_reads": public_reads},
        occurred_at,
        metadata={"actor": actor, "role": "admin"},
    )
    store.append(tenant_id, tenant_stream_id(tenant_id), [event], expected_version=None)
    return require_tenant(store, tenant_id)


def create_tenant(
    store: PostgresEventStore,
    tenant_id: str,
    *,
    name: str,
    time_zone: str,
    occurred_at: datetime,
    first_response_hours: float = 24.0,
    resolution_hours: float = 72.0,
    category_resolution_hours: dict[str, float] | None = None,
    actor: str = "cli",
) -> TenantConfig:
    """Append the TenantCreated event; raises TenantExists when the tenant has one."""
    validate_tenant_id(tenant_id)
    validate_time_zone(time_zone)
    for label, hours in [
        ("first_response_hours", first_response_hours),
        ("resolution_hours", resolution_hours),
    ]:
        if hours <= 0:
            raise CommandInvalid(f"{label} = {hours} must be a positive number of hours")
    payload = {
        "name": name,
        "time_zone": time_zone,
        "first_response_hours": first_response_hours,
        "resolution_hours": resolution_hours,
        "category_resolution_hours": category_resolution_hours or {},
    }
    event = NewEvent(
        TENANT_CREATED,
        payload,
        occurred_at,
        metadata={"actor": actor, "role": "admin"},
    )
    try:
        store.append(tenant_id, tenant_stream_id(tenant_id), [event], expected_version=0)
    except ConcurrencyError as error:
        raise TenantExists(tenant_id) from error
    config = load_tenant(store, tenant_id)
    assert config is not None
    return config


# The configuration stream versions read so far in the current API request, by tenant, or
# None outside a request. The API's middleware sets a new dict for each request, and the
# dependency that authenticates the request fills it in (ledger.keys.KeyCache).
_request_config_versions: ContextVar[dict[str, int] | None] = ContextVar(
    "request_config_versions", default=None
)


@contextmanager
def config_versions_of_request() -> Iterator[None]:
    """Let a `record_config_version` call in the block serve the next `load_tenant` call of
    that tenant in it, in place of a query.

    The block must span one request. Its first lookup then returns the configuration at the
    version read when the request was authenticated, even if it changed since.
    """
    token = _request_config_versions.set({})
    try:
        yield
    finally:
        _request_config_versions.reset(token)


def record_config_version(tenant_id: str, version: int) -> None:
    """Record the version of the tenant's configuration stream read in the current request."""
    versions = _request_config_versions.get()
    if versions is not None:
        versions[tenant_id] = version


class TenantConfigCache:
    """Folded tenant configurations, each kept while its stream stays at the same version.

    A lookup still reads the stream's version (one short query, or none when the request
    recorded it already), so a configuration change is seen by the next request. Callers
    share the cached objects, so they must not change them, dict fields included.
    """

    def __init__(self, *, max_tenants: int = 10_000) -> None:
        self.max_tenants = max_tenants
        self._configs: dict[str, TenantConfig] = {}
        self._lock = threading.Lock()

    def load(self, store: PostgresEventStore, tenant_id: str) -> TenantConfig | None:
        # A recorded version serves one lookup only: a later lookup in the same request may
        # follow an append of the request's own to the configuration stream.
        versions = _request_config_versions.get()
        version = versions.pop(tenant_id, None) if versions is not None else None
        if version is None:
            version = store.stream_version(tenant_id, tenant_stream_id(tenant_id))
        cached = self._configs.get(tenant_id)
        if cached is not None and cached.version == version:
            return cached
        # The stream may have grown since its version was read: the folded config carries
        # the version of its own last event, which is what later lookups compare with.
        config = _fold_stream(store, tenant_id)
        if config is not None:
            with self._lock:
                if len(self._configs) >= self.max_tenants:
                    self._configs.clear()
                self._configs[tenant_id] = config
        return config

    def cached(self, tenant_id: str) -> TenantConfig | None:
        """Return the tenant's configuration when the cached one is at the version the
        current request recorded, and use that version up as `load` does. Return None, and
        keep the version, when only `load` can tell."""
        versions = _request_config_versions.get()
        version = versions.get(tenant_id) if versions is not None else None
        cached = self._configs.get(tenant_id)
        if versions is None or cached is None or version != cached.version:
            return None
        del versions[tenant_id]
        return cached


# Stores whose load_tenant calls go through a cache; other stores read the stream each time.
_config_caches: weakref.WeakKeyDictionary[PostgresEventStore, TenantConfigCache] = (
    weakref.WeakKeyDictionary()
)


def cache_tenant_configs(store: PostgresEventStore) -> TenantConfigCache:
    """Make `load_tenant` and `require_tenant` on `store` use a cache; return the cache."""
    cache = _config_caches.get(store)
    if cache is None:
        cache = _config_caches[store] = TenantConfigCache()
    return cache


def _fold_stream(store: PostgresEventStore, tenant_id: str) -> TenantConfig | None:
    return fold_tenant(tenant_id, store.read_stream(tenant_id, tenant_stream_id(tenant_id)))


def load_tenant(store: PostgresEventStore, tenant_id: str) -> TenantConfig | None:
    cache = _config_caches.get(store)
    if cache is not None:
        return cache.load(store, tenant_id)
    return _fold_stream(store, tenant_id)


def cached_tenant(store: PostgresEventStore, tenant_id: str) -> TenantConfig | None:
    """Return the tenant's configuration without a query when `store`'s cache can tell it
    is current (TenantConfigCache.cached). Otherwise return None: `require_tenant` decides."""
    cache = _config_caches.get(store)
    return cache.cached(tenant_id) if cache is not None else None


def require_tenant(store: PostgresEventStore, tenant_id: str) -> TenantConfig:
    config = load_tenant(store, tenant_id)
    if config is None:
        raise TenantNotFound(tenant_id)
    return config
