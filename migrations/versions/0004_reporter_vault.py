"""The reporter vault: per-reporter encryption keys, kept outside the events.

Revision ID: 0004
Revises: 0002

Reporters' names, e-mail addresses and phone numbers enter events only as AES-GCM
ciphertext under a key per reporter. The keys live in `reporter_keys`, the one table that is
not derived from events: erasing a reporter sets its key to NULL, and every event that
carries that reporter's ciphertext stays unchanged and unreadable.

Who may do what:

- the application role (the API and the command line) reads and creates keys of the tenant
  set for its transaction, and may update a row only to erase it. A trigger rejects any
  other update, for every role, and only the owner may delete rows.
- the worker role (projectors, the scheduler, imports) gets no access at all. Projectors copy
  the ciphertext into read models as it is and never need to decrypt it, so a worker
  connection, a rebuild or a leaked worker password exposes no key.

`reporter_lookup_keys` holds one random secret per tenant. A reporter row stores HMAC-SHA256
digests of its e-mail address and phone number under that secret, so a repeated report by
the same person finds the same reporter without any plain value being stored. Erasure sets
the digests to NULL together with the key.
"""

from alembic import context, op

revision = "0004"
down_revision = "0002"
branch_labels = None
depends_on = None

TENANT_SETTING = "civicpulse.tenant_id"
VAULT_TABLES = ("reporter_keys", "reporter_lookup_keys")


def _isolate_for_application_role(table: str, app_role: str) -> None:
    """Turn on row-level security with a policy for the application role only.

    The worker role gets no policy, so even a later grant to it would show no rows.
    """
    current = f"current_setting('{TENANT_SETTING}', true)"
    op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
    op.execute(
        f"CREATE POLICY {table}_tenant ON {table} TO {app_role} "
        f"USING (tenant_id = {current}) WITH CHECK (tenant_id = {current})"
    )


def upgrade() -> None:
    app_role = context.config.attributes["app_role"]
    worker_role = context.config.attributes["worker_role"]

    op.execute(
        """
        CREATE TABLE reporter_lookup_keys (
            tenant_id   text PRIMARY KEY,
            secret      bytea NOT NULL CHECK (length(secret) = 32),
            created_at  timestamptz NOT NULL DEFAULT statement_timestamp()
        )
        """
    )

    op.execute(
        """
        CREATE TABLE reporter_keys (
            tenant_id       text NOT NULL,
            reporter_id     uuid NOT NULL,
            data_key        bytea CHECK (length(data_key) = 32),
            email_lookup    bytea CHECK (length(email_lookup) = 32),
            phone_lookup    bytea CHECK (length(phone_lookup) = 32),
            created_at      timestamptz NOT NULL DEFAULT statement_timestamp(),
            erased_at       timestamptz,
            erased_reason   text,
            PRIMARY KEY (tenant_id, reporter_id),
            CONSTRAINT reporter_keys_erased_without_key
                CHECK ((data_key IS NULL) = (erased_at IS NOT NULL)),
            CONSTRAINT reporter_keys_erased_without_lookups
                CHECK (data_key IS NOT NULL OR (email_lookup IS NULL AND phone_lookup IS NULL)),
            CONSTRAINT reporter_keys_erased_with_reason
                CHECK (erased_at IS NULL OR erased_reason IS NOT NULL)
        )
        """
    )
    # One live reporter per e-mail address and per phone number in a tenant. Erased rows
    # have NULL digests, so a person who reports again after an erasure gets a new reporter.
    op.execute(
        "CREATE UNIQUE INDEX reporter_keys_email ON reporter_keys (tenant_id, email_lookup) "
        "WHERE email_lookup IS NOT NULL"
    )
    op.execute(
        "CREATE UNIQUE INDEX reporter_keys_phone ON reporter_keys (tenant_id, phone_lookup) "
        "WHERE phone_lookup IS NOT NULL"
    )

    # Column grants cannot limit the values written, so the trigger checks that an update
    # is an erasure. It runs for the owner too, who may still DELETE a row outright.
    op.execute(
        """
        CREATE FUNCTION reporter_keys_erase_only() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF OLD.data_key IS NULL THEN
                RAISE EXCEPTION 'reporter % of tenant % is already erased',
                    OLD.reporter_id, OLD.tenant_id
                    USING ERRCODE = 'insufficient_privilege';
            END IF;
            IF NEW.data_key IS NOT NULL
               OR NEW.email_lookup IS NOT NULL
               OR NEW.phone_lookup IS NOT NULL
               OR NEW.erased_at IS NULL
               OR NEW.tenant_id IS DISTINCT FROM OLD.tenant_id
               OR NEW.reporter_id IS DISTINCT FROM OLD.reporter_id
               OR NEW.created_at IS DISTINCT FROM OLD.created_at THEN
                RAISE EXCEPTION 'reporter_keys rows may only be updated to erase them'
                    USING ERRCODE = 'insufficient_privilege',
                          HINT = 'set data_key, email_lookup and phone_lookup to NULL and '
                                 'erased_at and erased_reason in one update';
            END IF;
            RETURN NEW;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER reporter_keys_erase_only BEFORE UPDATE ON reporter_keys
        FOR EACH ROW EXECUTE FUNCTION reporter_keys_erase_only()
        """
    )

    for table in VAULT_TABLES:
        _isolate_for_application_role(table, app_role)
        op.execute(f"REVOKE ALL ON {table} FROM PUBLIC, {worker_role}")
        op.execute(f"GRANT SELECT, INSERT ON {table} TO {app_role}")
    op.execute(
        "GRANT UPDATE (data_key, email_lookup, phone_lookup, erased_at, erased_reason) "
        f"ON reporter_keys TO {app_role}"
    )

    # The incidents read model keeps the reporter id and the contact ciphertext of each
    # report, as the incident fold does. Neither is readable without the vault.
    op.execute("ALTER TABLE incidents ADD COLUMN reporter_id uuid, ADD COLUMN contact jsonb")


def downgrade() -> None:
    raise NotImplementedError("the reporter vault is never dropped by a migration")
