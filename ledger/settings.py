"""Settings read once from the environment, at the edge of the program."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import platformdirs
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ledger.errors import LedgerError

ENV_PREFIX = "CIVICPULSE_"


def _default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("civicpulse")) / "pgdata"


class Settings(BaseSettings):
    """CivicPulse configuration.

    `DATABASE_URL` names a server and an owner role that may create roles and run migrations.
    Without it, an embedded PostgreSQL is started in `CIVICPULSE_DATA_DIR`.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    database_url: str | None = Field(default=None, validation_alias="DATABASE_URL")
    app_database_url: str | None = Field(
        default=None,
        description="Connection string for the application role; derived from DATABASE_URL "
        "by swapping in the application role when unset.",
    )
    app_role: str = Field(default="civicpulse_app", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    app_role_password: SecretStr | None = None
    worker_database_url: str | None = Field(
        default=None,
        description="Connection string for the worker role (projectors, scheduler, imports); "
        "derived from DATABASE_URL by swapping in the worker role when unset.",
    )
    worker_role: str = Field(default="civicpulse_worker", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    worker_role_password: SecretStr | None = None
    database_name: str = Field(
        default="civicpulse",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="Database created on the embedded server.",
    )
    data_dir: Path = Field(default_factory=_default_data_dir)

    migrate_on_start: bool = Field(
        default=False,
        description="Run migrations when a process starts. The embedded server is always "
        "migrated; with DATABASE_URL, `civicpulse migrate` is the usual way.",
    )

    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    api_workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="uvicorn worker processes of `civicpulse serve`. Each opens its own pool "
        "of api_pool_size connections.",
    )

    projector_batch_size: int = Field(default=2000, ge=1, le=100_000)
    projector_poll_seconds: float = Field(default=1.0, gt=0, le=600)

    ready_max_lag_events: int = Field(
        default=10_000,
        ge=0,
        description="GET /ready fails while a projection is more events than this behind.",
    )
    metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port on which `project` and `schedule` serve Prometheus metrics; 0 is off. "
        "The API serves them at /metrics.",
    )
    metrics_host: str = "127.0.0.1"
    seal_interval_seconds: int = Field(
        default=300,
        ge=1,
        le=86_400,
        description="Seconds between two runs of the scheduler's seal job.",
    )
    escalation_interval_seconds: int = Field(
        default=60,
        ge=1,
        le=86_400,
        description="Seconds between two runs of the scheduler's SLA escalation job.",
    )
    snapshot_interval_seconds: int = Field(
        default=3600,
        ge=1,
        le=7 * 86_400,
        description="Seconds between two runs of the scheduler's read-model snapshot job.",
    )

    # Classification. Without llm_base_url the rule-based classifier decides; there is no
    # default server.
    llm_base_url: str | None = Field(
        default=None,
        description="Base URL of an OpenAI-compatible API, such as http://127.0.0.1:8080/v1.",
    )
    llm_api_key: SecretStr | None = None
    llm_model: str | None = Field(default=None, description="Model name sent in each request.")
    llm_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    classifier_concurrency: int = Field(default=4, ge=1, le=256)
    classifier_enabled: bool = Field(
        default=True,
        description="Run the classifier pool inside `project` and `run`.",
    )

    group_commit: bool = Field(
        default=True,
        description="Commit the API's concurrent appends together, one transaction per batch.",
    )
    group_commit_workers: int = Field(
        default=1,
        ge=1,
        le=16,
        description="Threads of each API process that run group commit batches. With one, "
        "the next batch gathers while the last commits; a second helps only where a "
        "commit's WAL flush is slow.",
    )
    api_pool_size: int = Field(default=10, ge=2, le=1000)

    log_level: str = "INFO"
    log_format: str = Field(default="console", pattern="^(console|json)$")

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        upper = value.upper()
        if upper not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError(f"invalid log level {value!r}: use DEBUG, INFO, WARNING or ERROR")
        return upper


class InvalidSettings(LedgerError):
    """An environment variable has a value the settings cannot take."""

    def __init__(self, error: ValidationError) -> None:
        problems = []
        for detail in error.errors():
            name = str(detail["loc"][0]) if detail["loc"] else "?"
            variable = name if name.isupper() else ENV_PREFIX + name.upper()
            # Connection strings and passwords may contain secrets: name them, never echo them.
            secret = any(part in name.lower() for part in ("url", "password"))
            value = "" if secret else f"={detail.get('input')!r}"
            reason = detail["msg"].removeprefix("Value error, ")
            problems.append(f"{variable}{value}: {reason}")
        super().__init__(
            "invalid setting " + "; ".join(problems) + ": change or unset it "
            "(README.md lists each setting with its default)"
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings, read from the environment on first use. Raises
    InvalidSettings naming each variable whose value the settings cannot take."""
    try:
        return Settings()
    except ValidationError as error:
        raise InvalidSettings(error) from None
