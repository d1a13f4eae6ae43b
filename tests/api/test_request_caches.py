"""The API's caches of keys and tenant configurations: a revoked key and a configuration
change take effect on the next request, in every process that serves the tenant."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg_pool import ConnectionPool

from api import auth
from api.app import create_app
from ledger.database import Database, set_tenant
from ledger.errors import AuthenticationFailed
from ledger.keys import ApiKey, KeyCache, Role, issue_key, revoke_key
from ledger.store import PostgresEventStore
from ledger.tenants import (
    cache_tenant_configs,
    config_versions_of_request,
    configure_categories,
    configure_open311,
    load_tenant,
    record_config_version,
)

REPORT = {"description": "Pothole on the corner", "category": "Pothole"}


@pytest.fixture
def app_client(database: Database, session_pool: ConnectionPool[Any]) -> Iterator[TestClient]:
    with TestClient(create_app(database, pool=session_pool)) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def post_report(client: TestClient, tenant_id: str, token: str) -> Any:
    return client.post(f"/tenants/{tenant_id}/incidents", json=REPORT, headers=bearer(token))


def test_revoked_key_rejected_next_request(
    app_client: TestClient, store: PostgresEventStore, tenant_id: str
) -> None:
    staff, staff_token = issue_key(store, tenant_id, role=Role.STAFF, name="s", issued_by="t")
    _, admin_token = issue_key(store, tenant_id, role=Role.ADMIN, name="a", issued_by="t")
    before = post_report(app_client, tenant_id, staff_token)

    revoked = app_client.post(
        f"/tenants/{tenant_id}/keys/{staff.key_id}/revoke", headers=bearer(admin_token)
    )
    after = post_report(app_client, tenant_id, staff_token)

    assert before.status_code == 201, before.text
    assert revoked.status_code == 200, revoked.text
    assert after.status_code == 401
    assert "revoked" in after.json()["detail"]


def test_revoke_elsewhere_seen_next_request(
    database: Database,
    session_pool: ConnectionPool[Any],
    store: PostgresEventStore,
    tenant_id: str,
) -> None:
    # Two apps stand for two worker processes: the key is revoked through the second.
    staff, staff_token = issue_key(store, tenant_id, role=Role.STAFF, name="s", issued_by="t")
    _, admin_token = issue_key(store, tenant_id, role=Role.ADMIN, name="a", issued_by="t")
    with (
        TestClient(create_app(database, pool=session_pool)) as first,
        TestClient(create_app(database, pool=session_pool)) as second,
    ):
        before = post_report(first, tenant_id, staff_token)
        revoked = second.post(
            f"/tenants/{tenant_id}/keys/{staff.key_id}/revoke", headers=bearer(admin_token)
        )
        after = post_report(first, tenant_id, staff_token)

    assert before.status_code == 201, before.text
    assert revoked.status_code == 200, revoked.text
    assert after.status_code == 401
    assert "revoked" in after.json()["detail"]


def test_config_change_seen_next_request(
    app_client: TestClient, store: PostgresEventStore, tenant_id: str
) -> None:
    _, admin_token = issue_key(store, tenant_id, role=Role.ADMIN, name="a", issued_by="t")
    before = app_client.get(f"/tenants/{tenant_id}/config", headers=bearer(admin_token))
    # Written through another store, as another process or the CLI would.
    configure_categories(
        PostgresEventStore(store.pool),
        tenant_id,
        {"categories": [{"name": "Pothole"}]},
        occurred_at=datetime.now(UTC),
    )
    after = app_client.get(f"/tenants/{tenant_id}/config", headers=bearer(admin_token))

    assert before.status_code == 200, before.text
    assert after.status_code == 200, after.text
    assert after.json()["version"] == before.json()["version"] + 1
    assert "categories" not in before.json()["sections"]
    assert after.json()["sections"]["categories"]["categories"][0]["name"] == "Pothole"


def test_key_cache_rereads_after_stream_change(
    database: Database, session_pool: ConnectionPool[Any], store: PostgresEventStore, tenant_id: str
) -> None:
    key, token = issue_key(store, tenant_id, role=Role.STAFF, name="s", issued_by="t")
    cache = KeyCache()
    with session_pool.connection() as conn:
        first = cache.authenticate(conn, token)
    # Revoked in SQL without an event: the cache keeps the row, as its NOTE describes.
    with database.connect_owner() as owner, owner.transaction():
        set_tenant(owner, tenant_id)
        owner.execute("UPDATE api_keys SET revoked_at = now() WHERE key_id = %s", (key.key_id,))
    with session_pool.connection() as conn:
        cached = cache.authenticate(conn, token)
    # Any key event moves the keys stream, and the row is read again.
    issue_key(store, tenant_id, role=Role.STAFF, name="other", issued_by="t")
    with session_pool.connection() as conn, pytest.raises(AuthenticationFailed) as rejected:
        cache.authenticate(conn, token)

    assert first.key_id == key.key_id
    assert cached.key_id == key.key_id
    assert "revoked" in str(rejected.value)


def test_key_cache_rejects_wrong_secret(
    session_pool: ConnectionPool[Any], store: PostgresEventStore, tenant_id: str
) -> None:
    _, token = issue_key(store, tenant_id, role=Role.STAFF, name="s", issued_by="t")
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    cache = KeyCache()
    with session_pool.connection() as conn:
        cache.authenticate(conn, token)
    with session_pool.connection() as conn, pytest.raises(AuthenticationFailed) as rejected:
        cache.authenticate(conn, forged)

    assert "unknown API key" in str(rejected.value)


def test_key_cache_checks_expiry_each_call(
    session_pool: ConnectionPool[Any], store: PostgresEventStore, tenant_id: str
) -> None:
    expires = datetime.now(UTC) + timedelta(hours=1)
    _, token = issue_key(
        store, tenant_id, role=Role.STAFF, name="s", issued_by="t", expires_at=expires
    )
    cache = KeyCache()
    with session_pool.connection() as conn:
        cache.authenticate(conn, token)
    with session_pool.connection() as conn, pytest.raises(AuthenticationFailed) as rejected:
        cache.authenticate(conn, token, now=expires + timedelta(seconds=1))

    assert "expired" in str(rejected.value)


def test_key_cache_keeps_revoked_key_rejected(
    session_pool: ConnectionPool[Any], store: PostgresEventStore, tenant_id: str
) -> None:
    key, token = issue_key(store, tenant_id, role=Role.STAFF, name="s", issued_by="t")
    cache = KeyCache()
    with session_pool.connection() as conn:
        cache.authenticate(conn, token)
    revoke_key(store, tenant_id, key.key_id, revoked_by="t")

    for _ in range(2):  # the second call is served from the cache
        with session_pool.connection() as conn, pytest.raises(AuthenticationFailed) as rejected:
            cache.authenticate(conn, token)
        assert "revoked" in str(rejected.value)


def test_config_cache_sees_other_store_writes(store: PostgresEventStore, tenant_id: str) -> None:
    cached_store = PostgresEventStore(store.pool)
    cache_tenant_configs(cached_store)
    first = load_tenant(cached_store, tenant_id)
    configure_open311(store, tenant_id, public_reads=True, occurred_at=datetime.now(UTC))
    second = load_tenant(cached_store, tenant_id)

    assert first is not None
    assert second is not None
    assert not first.open311_public_reads
    assert second.open311_public_reads
    assert second.version == first.version + 1


def test_recorded_version_serves_one_lookup(store: PostgresEventStore, tenant_id: str) -> None:
    cached_store = PostgresEventStore(store.pool)
    cache_tenant_configs(cached_store)
    first = load_tenant(cached_store, tenant_id)
    assert first is not None
    configure_open311(store, tenant_id, public_reads=True, occurred_at=datetime.now(UTC))

    with config_versions_of_request():
        # The version read at the start of the request, before the change committed.
        record_config_version(tenant_id, first.version)
        as_of_start = load_tenant(cached_store, tenant_id)
        next_lookup = load_tenant(cached_store, tenant_id)

    assert as_of_start is not None
    assert next_lookup is not None
    assert as_of_start.version == first.version
    assert next_lookup.version == first.version + 1
    assert next_lookup.open311_public_reads


async def cached_check(
    database: Database, cache: KeyCache, token: str, now: datetime | None = None
) -> Any:
    async with await psycopg.AsyncConnection.connect(database.app_conninfo) as conn:
        return await cache.authenticate_cached(conn, token, now=now)


def cached_key(
    session_pool: ConnectionPool[Any], store: PostgresEventStore, tenant_id: str, **options: Any
) -> tuple[ApiKey, str, KeyCache]:
    """Issue a staff key and return it, its token and a cache that has read it once."""
    key, token = issue_key(store, tenant_id, role=Role.STAFF, name="s", issued_by="t", **options)
    cache = KeyCache()
    with session_pool.connection() as conn:
        cache.authenticate(conn, token)
    return key, token, cache


def test_cached_check_until_keys_stream_moves(
    database: Database, session_pool: ConnectionPool[Any], store: PostgresEventStore, tenant_id: str
) -> None:
    _, token = issue_key(store, tenant_id, role=Role.STAFF, name="s", issued_by="t")
    unknown = asyncio.run(cached_check(database, KeyCache(), token))
    key, token, cache = cached_key(session_pool, store, tenant_id)
    known = asyncio.run(cached_check(database, cache, token))
    # Any key event moves the keys stream, so the full check has to read the row again.
    issue_key(store, tenant_id, role=Role.STAFF, name="other", issued_by="t")
    moved = asyncio.run(cached_check(database, cache, token))

    assert unknown is None
    assert known is not None
    assert known.key_id == key.key_id
    assert known.tenant_id == tenant_id
    assert known.role == Role.STAFF
    assert moved is None


def test_cached_check_skips_wrong_secret(
    database: Database, session_pool: ConnectionPool[Any], store: PostgresEventStore, tenant_id: str
) -> None:
    _, token, cache = cached_key(session_pool, store, tenant_id)
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")

    assert asyncio.run(cached_check(database, cache, forged)) is None


def test_cached_check_rejects_expired_key(
    database: Database, session_pool: ConnectionPool[Any], store: PostgresEventStore, tenant_id: str
) -> None:
    expires = datetime.now(UTC) + timedelta(hours=1)
    _, token, cache = cached_key(session_pool, store, tenant_id, expires_at=expires)

    with pytest.raises(AuthenticationFailed) as rejected:
        asyncio.run(cached_check(database, cache, token, expires + timedelta(seconds=1)))

    assert "expired" in str(rejected.value)


def test_api_cached_keys_skip_the_thread(
    app_client: TestClient,
    store: PostgresEventStore,
    tenant_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, token = issue_key(store, tenant_id, role=Role.STAFF, name="s", issued_by="t")
    threaded: list[str] = []
    full_check = auth._authenticate

    def counted(request: Any, token: str) -> Any:
        threaded.append(request.url.path)
        return full_check(request, token)

    monkeypatch.setattr(auth, "_authenticate", counted)

    statuses = [post_report(app_client, tenant_id, token).status_code for _ in range(5)]

    assert statuses == [201] * 5
    # The first request reads the key in a thread and caches it, and the others check it
    # on the loop.
    assert len(threaded) == 1


def test_api_keys_on_two_loops_and_no_lifespan(
    database: Database, session_pool: ConnectionPool[Any], store: PostgresEventStore, tenant_id: str
) -> None:
    _, token = issue_key(store, tenant_id, role=Role.STAFF, name="s", issued_by="t")
    app = create_app(database, pool=session_pool)
    # Each test client runs the app on an event loop of its own; the last has no lifespan.
    with TestClient(app) as first, TestClient(app) as second:
        statuses = [
            post_report(client, tenant_id, token).status_code
            for client in (first, second, first, second)
        ]
    without_lifespan = post_report(TestClient(app), tenant_id, token)

    assert statuses == [201] * 4
    assert without_lifespan.status_code == 201, without_lifespan.text
    assert app.state.key_pools == {}
