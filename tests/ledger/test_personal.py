"""Reporters' personal data: encryption, the vault's guards, erasure by key destruction."""

from __future__ import annotations

import base64
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.commands import Actor, IncidentCommands
from ledger.database import Database, set_tenant
from ledger.errors import (
    CommandInvalid,
    ContactDecryptionFailed,
    IdempotencyKeyReused,
    IncidentNotFound,
    ReporterNotFound,
)
from ledger.events import RecordedEvent, recorded_event_hash
from ledger.ids import incident_stream_id
from ledger.personal import (
    REPORTER_ERASED,
    ReporterContact,
    ReporterKey,
    decrypt_field,
    encrypt_field,
    erase_reporter,
    open_contact,
    reporter_stream_id,
    seal_contact,
    validate_reporter,
)
from ledger.store import EVENT_COLUMNS, PostgresEventStore, row_to_event
from ledger.tenants import create_tenant
from projections.runtime import catch_up, default_projections
from tests.conftest import project_everything

RESIDENT = Actor("resident", "reporter", "web")
ADMIN = Actor("privacy-officer", "admin", "cli")
REPORT = {"description": "Water leaking through the ceiling", "category": "Leak"}
# Distinctive values, so a search of the stored bytes cannot match anything else.
REPORTER = {
    "name": "Zebulon Quimby-Okafor",
    "email": "Zebulon.Quimby@Example.org",
    "phone": "+1 (617) 555-0199",
}
# Every form in which the plain values could leak: as sent, normalized, digits only.
PLAIN_FORMS = [
    "Zebulon",
    "Quimby",
    "Okafor",
    "zebulon.quimby",
    "Zebulon.Quimby",
    "example.org",
    "555-0199",
    "5550199",
    "6175550199",
]


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 5, 4, 8, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(minutes=1)
        return self.now


@pytest.fixture
def commands(store: PostgresEventStore) -> IncidentCommands:
    return IncidentCommands(store, clock=Clock())


def other_tenant(store: PostgresEventStore) -> str:
    tenant = f"t-{uuid.uuid4().hex[:10]}"
    create_tenant(
        store,
        tenant,
        name="Other Town",
        time_zone="UTC",
        occurred_at=datetime(2015, 1, 1, tzinfo=UTC),
    )
    return tenant


def new_key(tenant_id: str = "acme") -> ReporterKey:
    return ReporterKey(tenant_id, uuid.uuid4(), bytes(range(32)))


def tenant_event_rows(database: Database, tenant_id: str) -> list[tuple[Any, ...]]:
    """Every stored column of every event of the tenant, read as the owner."""
    with database.connect_owner() as conn:
        return conn.execute(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE tenant_id = %s ORDER BY position",
            (tenant_id,),
        ).fetchall()


def vault_row(database: Database, tenant_id: str, reporter_id: uuid.UUID) -> dict[str, Any]:
    with database.connect_owner() as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        row = cur.execute(
            "SELECT * FROM reporter_keys WHERE tenant_id = %s AND reporter_id = %s",
            (tenant_id, reporter_id),
        ).fetchone()
    assert row is not None
    return row


def assert_chains_verify(events: list[RecordedEvent]) -> None:
    """Recompute the hash chain of every stream among `events`."""
    previous: dict[str, bytes | None] = {}
    for event in sorted(events, key=lambda e: (e.stream_id, e.stream_version)):
        expected = recorded_event_hash(event, previous.get(event.stream_id))
        assert event.hash == expected, f"{event.stream_id} v{event.stream_version}"
        previous[event.stream_id] = event.hash


def submit_with_reporter(
    commands: IncidentCommands,
    tenant_id: str,
    reporter: dict[str, Any] | None = None,
    **kwargs: Any,
) -> uuid.UUID:
    result = commands.submit(
        tenant_id, REPORT, actor=RESIDENT, reporter=reporter or REPORTER, **kwargs
    )
    return result.incident_id


def reporter_of(commands: IncidentCommands, tenant_id: str, incident_id: uuid.UUID) -> uuid.UUID:
    reporter_id = commands.load(tenant_id, incident_id).reporter_id
    assert reporter_id is not None
    return reporter_id


# Encryption without the database


def test_field_round_trip() -> None:
    key = new_key()
    token = encrypt_field(key, "email", "a@example.org")

    assert decrypt_field(key, "email", token) == "a@example.org"


def test_same_value_encrypts_differently() -> None:
    key = new_key()
    first = encrypt_field(key, "name", "Ada")
    second = encrypt_field(key, "name", "Ada")

    assert first != second
    assert base64.b64decode(first)[:12] != base64.b64decode(second)[:12]


# Lone surrogates (category Cs) are not text that UTF-8 can encode; validation rejects them.
UNICODE_WITHOUT_NUL = st.characters(exclude_characters="\x00", exclude_categories=["Cs"])


@settings(max_examples=300)
@given(st.text(alphabet=UNICODE_WITHOUT_NUL, max_size=300))
def test_round_trip_any_unicode(value: str) -> None:
    key = new_key()
    token = encrypt_field(key, "name", value)

    assert decrypt_field(key, "name", token) == value


def _flip(token: str, index: int) -> str:
    raw = bytearray(base64.b64decode(token))
    raw[index] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


TAMPERED_CASES = {
    "ciphertext byte flipped": lambda key, token: (key, "name", _flip(token, 14)),
    "nonce byte flipped": lambda key, token: (key, "name", _flip(token, 0)),
    "tag byte flipped": lambda key, token: (key, "name", _flip(token, -1)),
    "truncated": lambda key, token: (key, "name", base64.b64encode(b"short").decode()),
    "not base64": lambda key, token: (key, "name", "not base64 at all!"),
    "not text": lambda key, token: (key, "name", 12345),
    "read as another field": lambda key, token: (key, "email", token),
    "another reporter's key": lambda key, token: (
        ReporterKey(key.tenant_id, uuid.uuid4(), key.key),
        "name",
        token,
    ),
    "another tenant": lambda key, token: (
        ReporterKey("other", key.reporter_id, key.key),
        "name",
        token,
    ),
    "another key": lambda key, token: (
        ReporterKey(key.tenant_id, key.reporter_id, bytes(32)),
        "name",
        token,
    ),
}


@pytest.mark.parametrize("case", sorted(TAMPERED_CASES))
def test_tampered_field_fails_to_decrypt(case: str) -> None:
    key = new_key()
    token = encrypt_field(key, "name", "Grace Hopper")
    read_key, field_name, read_token = TAMPERED_CASES[case](key, token)

    with pytest.raises(ContactDecryptionFailed, match="cannot decrypt the") as raised:
        decrypt_field(read_key, field_name, read_token)

    assert raised.value.field == field_name
    assert "Grace" not in str(raised.value)


# Validation


INVALID_REPORTERS: list[tuple[Any, str]] = [
    ({"name": "Ada\x00Lovelace"}, "name contains a NUL character"),
    ({"email": "ada@example.org\x00"}, "email contains a NUL character"),
    ({"phone": "555\x000100"}, "phone contains a NUL character"),
    ({"email": "not-an-address"}, "not a valid e-mail address"),
    ({"email": "ada@"}, "not a valid e-mail address"),
    ({"phone": "call me maybe"}, "only digits, spaces"),
    ({"phone": "+1 617 555 0100 ext 5"}, "only digits, spaces"),
    ({"phone": "+()-"}, "needs at least 3"),
    ({"phone": "1" * 33}, "the limit is 32"),
    ({"name": "A" * 201}, "the limit is 200"),
    ({"name": "Ada\ud800"}, "lone surrogate"),
    ({"name": 42}, "expected text, got int"),
    ({"address": "1 Main St"}, "unknown reporter field"),
    (["Ada"], "expected an object"),
]


@pytest.mark.parametrize(("reporter", "message"), INVALID_REPORTERS)
def test_invalid_reporter_rejected(reporter: Any, message: str) -> None:
    with pytest.raises(CommandInvalid, match=message):
        validate_reporter(reporter)


def test_invalid_reporter_message_omits_value() -> None:
    with pytest.raises(CommandInvalid) as raised:
        validate_reporter({"phone": "Zebulon 555"})

    assert "Zebulon" not in str(raised.value)


def test_reporter_values_normalized() -> None:
    contact = validate_reporter(
        {"name": "  Ada Lovelace ", "email": "ada@EXAMPLE.org", "phone": " (020) 7946-0018 "}
    )

    assert contact == ReporterContact("Ada Lovelace", "ada@example.org", "(020) 7946-0018")
    assert "Ada" not in repr(contact)


def test_empty_reporter_is_none() -> None:
    assert validate_reporter({"name": "  ", "email": None, "phone": ""}) is None


def test_submit_rejects_invalid_reporter_storing_nothing(
    database: Database, commands: IncidentCommands, tenant_id: str
) -> None:
    before = tenant_event_rows(database, tenant_id)

    with pytest.raises(CommandInvalid, match="not a valid e-mail address"):
        commands.submit(tenant_id, REPORT, actor=RESIDENT, reporter={"email": "nope"})

    assert tenant_event_rows(database, tenant_id) == before


@pytest.mark.parametrize("field_name", ["name", "email", "phone", "reporter", "contact"])
def test_submit_rejects_personal_report_fields(
    commands: IncidentCommands, tenant_id: str, field_name: str
) -> None:
    with pytest.raises(CommandInvalid, match=f"{field_name} would store personal data"):
        commands.submit(tenant_id, {**REPORT, field_name: "x"}, actor=RESIDENT)


# Submission and storage


def test_contact_round_trip(commands: IncidentCommands, tenant_id: str) -> None:
    incident = submit_with_reporter(commands, tenant_id)
    details = commands.contact_details(tenant_id, incident)

    assert details is not None
    assert details.name == REPORTER["name"]
    assert details.email == "Zebulon.Quimby@example.org"
    assert details.phone == REPORTER["phone"]
    assert not details.erased
    assert details.reporter_id == reporter_of(commands, tenant_id, incident)


def test_report_without_reporter_has_no_contact(commands: IncidentCommands, tenant_id: str) -> None:
    incident = commands.submit(tenant_id, REPORT, actor=RESIDENT).incident_id

    assert commands.load(tenant_id, incident).contact is None
    assert commands.contact_details(tenant_id, incident) is None


def test_stored_rows_hold_no_plaintext(
    database: Database, commands: IncidentCommands, tenant_id: str
) -> None:
    incident = submit_with_reporter(commands, tenant_id, idempotency_key="plain-check")
    reporter_id = reporter_of(commands, tenant_id, incident)
    with database.connect_owner() as conn:
        events = conn.execute(
            "SELECT event_type, payload::text, metadata::text FROM events WHERE tenant_id = %s",
            (tenant_id,),
        ).fetchall()
    vault = vault_row(database, tenant_id, reporter_id)
    stored_text = " ".join(text for row in events for text in row)
    vault_text = " ".join(
        f"{value!r} {bytes(value).hex() if isinstance(value, bytes) else ''}"
        for value in vault.values()
    )

    assert [row[0] for row in events].count("ReportSubmitted") == 1
    for plain in PLAIN_FORMS:
        assert plain.casefold() not in stored_text.casefold(), plain
        assert plain.casefold() not in vault_text.casefold(), plain
    assert '"fields"' in stored_text
    assert str(reporter_id) in stored_text


def test_contact_payload_layout(commands: IncidentCommands, tenant_id: str) -> None:
    incident = submit_with_reporter(commands, tenant_id, reporter={"email": "one@example.org"})
    contact = commands.load(tenant_id, incident).contact

    assert contact is not None
    assert set(contact) == {"reporter_id", "scheme", "fields"}
    assert contact["scheme"] == "aes-256-gcm-v1"
    assert set(contact["fields"]) == {"email"}
    assert len(base64.b64decode(contact["fields"]["email"])) == 12 + len("one@example.org") + 16


def test_reporter_reused_by_email_or_phone(commands: IncidentCommands, tenant_id: str) -> None:
    first = reporter_of(
        commands,
        tenant_id,
        submit_with_reporter(
            commands, tenant_id, reporter={"email": "Sam@Example.org", "phone": "617 555 0111"}
        ),
    )
    by_email = reporter_of(
        commands,
        tenant_id,
        submit_with_reporter(commands, tenant_id, reporter={"email": "sam@example.ORG"}),
    )
    by_phone = reporter_of(
        commands,
        tenant_id,
        submit_with_reporter(commands, tenant_id, reporter={"phone": "(617) 555-0111"}),
    )
    stranger = reporter_of(
        commands,
        tenant_id,
        submit_with_reporter(commands, tenant_id, reporter={"email": "kim@example.org"}),
    )

    assert by_email == first
    assert by_phone == first
    assert stranger != first


def test_name_only_reporter_never_reused(commands: IncidentCommands, tenant_id: str) -> None:
    first = submit_with_reporter(commands, tenant_id, reporter={"name": "Pat"})
    second = submit_with_reporter(commands, tenant_id, reporter={"name": "Pat"})

    assert reporter_of(commands, tenant_id, first) != reporter_of(commands, tenant_id, second)


def test_reused_reporter_keeps_each_reports_values(
    commands: IncidentCommands, tenant_id: str
) -> None:
    first = submit_with_reporter(
        commands, tenant_id, reporter={"name": "Robin", "email": "robin@example.org"}
    )
    second = submit_with_reporter(
        commands, tenant_id, reporter={"name": "Robin B.", "email": "robin@example.org"}
    )
    first_details = commands.contact_details(tenant_id, first)
    second_details = commands.contact_details(tenant_id, second)

    assert first_details is not None and second_details is not None
    assert first_details.reporter_id == second_details.reporter_id
    assert first_details.name == "Robin"
    assert second_details.name == "Robin B."


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    name=st.text(alphabet=UNICODE_WITHOUT_NUL, min_size=1, max_size=200).filter(
        lambda text: text.strip() != ""
    )
)
def test_unicode_name_round_trips_through_ledger(
    commands: IncidentCommands, tenant_id: str, name: str
) -> None:
    incident = submit_with_reporter(commands, tenant_id, reporter={"name": name})
    details = commands.contact_details(tenant_id, incident)

    assert details is not None
    assert details.name == name.strip()


def test_fold_and_read_model_keep_ciphertext(
    fresh_database: Database, fresh_store: PostgresEventStore
) -> None:
    tenant = other_tenant(fresh_store)
    commands = IncidentCommands(fresh_store, clock=Clock())
    incident = submit_with_reporter(commands, tenant)
    state = commands.load(tenant, incident)
    project_everything(fresh_database)
    with fresh_database.connect_owner() as conn:
        row = conn.execute(
            "SELECT reporter_id, contact FROM incidents WHERE tenant_id = %s AND incident_id = %s",
            (tenant, incident),
        ).fetchone()
    incidents_projection = default_projections()[0]
    with fresh_database.connect_worker() as conn:
        projected = incidents_projection.read_all(conn)  # type: ignore[attr-defined]
    assert state.reporter_id is not None
    erase_reporter(fresh_store, tenant, state.reporter_id, reason="request 8", actor=ADMIN)
    applied, _ = catch_up(fresh_database, default_projections())
    with fresh_database.connect_worker() as conn:
        after_erasure = incidents_projection.read_all(conn)  # type: ignore[attr-defined]

    assert state.contact is not None
    assert row == (state.reporter_id, state.contact)
    assert projected[(tenant, incident)] == state
    assert all(plain not in str(state.contact) for plain in PLAIN_FORMS)
    # The ReporterErased event is read by every projection and changes no incident row.
    assert applied == len(default_projections())
    assert after_erasure == projected


# Idempotency


def test_retry_with_reporter_stores_one_event(
    database: Database, commands: IncidentCommands, tenant_id: str
) -> None:
    first = commands.submit(
        tenant_id, REPORT, actor=RESIDENT, reporter={"name": "Lee"}, idempotency_key="k-1"
    )
    again = commands.submit(
        tenant_id, REPORT, actor=RESIDENT, reporter={"name": " Lee "}, idempotency_key="k-1"
    )
    stream = commands.store.read_stream(tenant_id, incident_stream_id(first.incident_id))
    with database.connect_owner() as conn:
        reporters = conn.execute(
            "SELECT count(*) FROM reporter_keys WHERE tenant_id = %s", (tenant_id,)
        ).fetchone()

    assert again.incident_id == first.incident_id
    assert again.append.replayed
    assert not first.append.replayed
    assert again.append.positions == first.append.positions
    assert len(stream) == 1
    # A name finds no reporter, so only the replay check kept a second one out.
    assert reporters == (1,)


@pytest.mark.parametrize(
    "changed",
    [
        {"reporter": {"name": "Lee Other"}},
        {"reporter": {"name": "Lee", "phone": "555 0100"}},
        {"reporter": None},
        {"report": {**REPORT, "description": "Something else"}},
    ],
    ids=["other name", "added phone", "no reporter", "other report"],
)
def test_retry_with_other_body_rejected(
    commands: IncidentCommands, tenant_id: str, changed: dict[str, Any]
) -> None:
    commands.submit(
        tenant_id, REPORT, actor=RESIDENT, reporter={"name": "Lee"}, idempotency_key="k-2"
    )
    arguments: dict[str, Any] = {"report": REPORT, "reporter": {"name": "Lee"}, **changed}

    with pytest.raises(IdempotencyKeyReused, match="k-2"):
        commands.submit(
            tenant_id,
            arguments["report"],
            actor=RESIDENT,
            reporter=arguments["reporter"],
            idempotency_key="k-2",
        )


def test_retry_after_erasure_returns_first_result(
    store: PostgresEventStore, commands: IncidentCommands, tenant_id: str
) -> None:
    first = commands.submit(
        tenant_id, REPORT, actor=RESIDENT, reporter={"name": "Lee"}, idempotency_key="k-3"
    )
    erase_reporter(
        store,
        tenant_id,
        reporter_of(commands, tenant_id, first.incident_id),
        reason="request 17",
        actor=ADMIN,
    )
    again = commands.submit(
        tenant_id, REPORT, actor=RESIDENT, reporter={"name": "Lee"}, idempotency_key="k-3"
    )

    assert again.append.replayed
    assert again.append.positions == first.append.positions


def test_concurrent_retries_store_one_event(
    database: Database, store: PostgresEventStore, tenant_id: str
) -> None:
    commands = IncidentCommands(store)
    barrier = threading.Barrier(4)
    results: list[Any] = []

    def submit() -> None:
        barrier.wait()
        results.append(
            commands.submit(
                tenant_id,
                REPORT,
                actor=RESIDENT,
                reporter={"name": "Ari"},
                idempotency_key="k-race",
            )
        )

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with database.connect_owner() as conn:
        reporters = conn.execute(
            "SELECT count(*) FROM reporter_keys WHERE tenant_id = %s", (tenant_id,)
        ).fetchone()

    assert len(results) == 4
    assert len({result.append.positions for result in results}) == 1
    assert sum(not result.append.replayed for result in results) == 1
    assert reporters == (1,)


# Erasure


def test_erasure_keeps_events_and_chains(
    database: Database,
    store: PostgresEventStore,
    commands: IncidentCommands,
    tenant_id: str,
) -> None:
    incident = submit_with_reporter(commands, tenant_id)
    commands.execute(tenant_id, incident, "acknowledge", {}, actor=ADMIN, expected_version=None)
    reporter_id = reporter_of(commands, tenant_id, incident)
    before = tenant_event_rows(database, tenant_id)

    erasure = erase_reporter(store, tenant_id, reporter_id, reason="GDPR request 42", actor=ADMIN)
    after = tenant_event_rows(database, tenant_id)
    events = [row_to_event(row) for row in after]
    details = commands.contact_details(tenant_id, incident)
    vault = vault_row(database, tenant_id, reporter_id)

    assert after[: len(before)] == before
    assert [event.event_type for event in events[len(before) :]] == [REPORTER_ERASED]
    assert_chains_verify(events)
    assert not erasure.already_erased
    assert erasure.position == events[-1].position
    assert vault["data_key"] is None
    assert vault["email_lookup"] is None
    assert vault["phone_lookup"] is None
    assert vault["erased_reason"] == "GDPR request 42"
    assert details is not None
    assert details.erased
    assert details.erased_at == erasure.erased_at
    assert details.fields() == {}
    assert details.as_dict() == {
        "reporter_id": str(reporter_id),
        "erased": True,
        "erased_at": erasure.erased_at.isoformat(),
    }


def test_erasure_event_holds_no_personal_data(
    store: PostgresEventStore, commands: IncidentCommands, tenant_id: str
) -> None:
    reporter_id = reporter_of(commands, tenant_id, submit_with_reporter(commands, tenant_id))
    erase_reporter(store, tenant_id, reporter_id, reason="request 7", actor=ADMIN)
    (event,) = store.read_stream(tenant_id, reporter_stream_id(tenant_id))

    assert event.event_type == REPORTER_ERASED
    assert event.payload == {"reporter_id": str(reporter_id), "reason": "request 7"}
    assert event.metadata == {"actor": "privacy-officer", "role": "admin", "channel": "cli"}


def test_second_erasure_reports_the_first(
    store: PostgresEventStore, commands: IncidentCommands, tenant_id: str
) -> None:
    reporter_id = reporter_of(commands, tenant_id, submit_with_reporter(commands, tenant_id))
    first = erase_reporter(store, tenant_id, reporter_id, reason="request 1", actor=ADMIN)
    second = erase_reporter(store, tenant_id, reporter_id, reason="request 2", actor=ADMIN)

    assert second.already_erased
    assert second.erased_at == first.erased_at
    assert second.reason == "request 1"
    assert second.position is None
    assert len(store.read_stream(tenant_id, reporter_stream_id(tenant_id))) == 1


def test_erased_reporter_not_found_again(
    store: PostgresEventStore, commands: IncidentCommands, tenant_id: str
) -> None:
    reporter = {"email": "again@example.org"}
    first = reporter_of(commands, tenant_id, submit_with_reporter(commands, tenant_id, reporter))
    erase_reporter(store, tenant_id, first, reason="request 3", actor=ADMIN)
    later = reporter_of(commands, tenant_id, submit_with_reporter(commands, tenant_id, reporter))

    assert later != first


@pytest.mark.parametrize(
    ("reason", "message"),
    [
        ("", "missing erasure reason"),
        ("   ", "missing erasure reason"),
        ("x" * 501, "the limit is 500"),
        ("a\x00b", "NUL character"),
    ],
)
def test_erasure_needs_valid_reason(
    database: Database,
    store: PostgresEventStore,
    commands: IncidentCommands,
    tenant_id: str,
    reason: str,
    message: str,
) -> None:
    reporter_id = reporter_of(commands, tenant_id, submit_with_reporter(commands, tenant_id))

    with pytest.raises(CommandInvalid, match=message):
        erase_reporter(store, tenant_id, reporter_id, reason=reason, actor=ADMIN)

    assert vault_row(database, tenant_id, reporter_id)["data_key"] is not None
    assert store.read_stream(tenant_id, reporter_stream_id(tenant_id)) == []


def test_unknown_reporter_not_found(store: PostgresEventStore, tenant_id: str) -> None:
    with pytest.raises(ReporterNotFound, match="not found in tenant"):
        erase_reporter(store, tenant_id, uuid.uuid4(), reason="request 9", actor=ADMIN)


# Tenant isolation and the vault's guards


def test_other_tenant_cannot_read_or_erase(
    database: Database, store: PostgresEventStore, commands: IncidentCommands, tenant_id: str
) -> None:
    incident = submit_with_reporter(commands, tenant_id)
    contact = commands.load(tenant_id, incident).contact
    reporter_id = reporter_of(commands, tenant_id, incident)
    other = other_tenant(store)

    with pytest.raises(IncidentNotFound):
        commands.contact_details(other, incident)
    with pytest.raises(ReporterNotFound), store.pool.connection() as conn:
        set_tenant(conn, other)
        assert contact is not None
        open_contact(conn, other, contact)
    with pytest.raises(ReporterNotFound):
        erase_reporter(store, other, reporter_id, reason="wrong tenant", actor=ADMIN)
    with database.connect() as conn:
        set_tenant(conn, other)
        visible = conn.execute("SELECT count(*) FROM reporter_keys").fetchone()

    assert visible == (0,)
    assert vault_row(database, tenant_id, reporter_id)["data_key"] is not None
    details = commands.contact_details(tenant_id, incident)
    assert details is not None and not details.erased


def test_ciphertext_copied_to_other_tenant_fails(
    store: PostgresEventStore, commands: IncidentCommands, tenant_id: str
) -> None:
    other = other_tenant(store)
    mine = commands.load(tenant_id, submit_with_reporter(commands, tenant_id)).contact
    theirs = commands.load(other, submit_with_reporter(commands, other)).contact
    assert mine is not None and theirs is not None
    forged = {**theirs, "fields": mine["fields"]}

    with pytest.raises(ContactDecryptionFailed), store.pool.connection() as conn:
        set_tenant(conn, other)
        open_contact(conn, other, forged)


def test_tampered_stored_contact_fails(
    store: PostgresEventStore, commands: IncidentCommands, tenant_id: str
) -> None:
    contact = commands.load(tenant_id, submit_with_reporter(commands, tenant_id)).contact
    assert contact is not None
    tampered = {
        **contact,
        "fields": {**contact["fields"], "phone": _flip(contact["fields"]["phone"], 20)},
    }

    with (
        pytest.raises(ContactDecryptionFailed, match="cannot decrypt the phone"),
        store.pool.connection() as conn,
    ):
        set_tenant(conn, tenant_id)
        open_contact(conn, tenant_id, tampered)


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE reporter_keys SET data_key = decode(repeat('11', 32), 'hex')",
        "UPDATE reporter_keys SET erased_at = now(), erased_reason = 'x'",
        "UPDATE reporter_keys SET tenant_id = 'elsewhere'",
        "UPDATE reporter_keys SET created_at = now()",
        "DELETE FROM reporter_keys",
        "TRUNCATE reporter_keys",
        "UPDATE reporter_lookup_keys SET secret = decode(repeat('11', 32), 'hex')",
        "DELETE FROM reporter_lookup_keys",
    ],
)
def test_application_role_may_only_erase(
    database: Database, commands: IncidentCommands, tenant_id: str, statement: str
) -> None:
    reporter_id = reporter_of(commands, tenant_id, submit_with_reporter(commands, tenant_id))

    with database.connect() as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        set_tenant(conn, tenant_id)
        conn.execute(statement)

    assert vault_row(database, tenant_id, reporter_id)["data_key"] is not None


def test_erased_row_cannot_be_changed_again(
    database: Database, store: PostgresEventStore, commands: IncidentCommands, tenant_id: str
) -> None:
    reporter_id = reporter_of(commands, tenant_id, submit_with_reporter(commands, tenant_id))
    erase_reporter(store, tenant_id, reporter_id, reason="request 5", actor=ADMIN)

    with (
        database.connect() as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="already erased"),
    ):
        set_tenant(conn, tenant_id)
        conn.execute(
            "UPDATE reporter_keys SET erased_reason = 'rewritten' WHERE reporter_id = %s",
            (reporter_id,),
        )


def test_owner_may_delete_vault_rows(
    database: Database, commands: IncidentCommands, tenant_id: str
) -> None:
    reporter_id = reporter_of(commands, tenant_id, submit_with_reporter(commands, tenant_id))
    with database.connect_owner() as conn:
        deleted = conn.execute(
            "DELETE FROM reporter_keys WHERE tenant_id = %s AND reporter_id = %s",
            (tenant_id, reporter_id),
        ).rowcount

    assert deleted == 1


@pytest.mark.parametrize("table", ["reporter_keys", "reporter_lookup_keys"])
def test_worker_role_has_no_vault_access(database: Database, table: str) -> None:
    with (
        database.connect_worker() as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"),
    ):
        conn.execute(f"SELECT count(*) FROM {table}")


def test_sealed_contact_round_trip_through_vault(
    store: PostgresEventStore, commands: IncidentCommands, tenant_id: str
) -> None:
    reporter_id = reporter_of(commands, tenant_id, submit_with_reporter(commands, tenant_id))
    with store.pool.connection() as conn:
        set_tenant(conn, tenant_id)
        key_bytes = conn.execute(
            "SELECT data_key FROM reporter_keys WHERE reporter_id = %s", (reporter_id,)
        ).fetchone()
        assert key_bytes is not None
        key = ReporterKey(tenant_id, reporter_id, bytes(key_bytes[0]))
        sealed = seal_contact(key, ReporterContact(name="Noor", phone="555 0101"))
        details = open_contact(conn, tenant_id, sealed)

    assert details.fields() == {"name": "Noor", "phone": "555 0101"}
    assert details.as_dict()["erased"] is False
