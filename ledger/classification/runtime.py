"""Building the classifier pool from the settings."""

from __future__ import annotations

from ledger.classification.llm import LLMClassifier
from ledger.classification.pool import ClassifierPool
from ledger.database import Database
from ledger.errors import LedgerError
from ledger.settings import Settings
from ledger.store import PostgresEventStore


class ClassifierMisconfigured(LedgerError):
    """The language-model settings are incomplete."""


def build_llm(settings: Settings) -> LLMClassifier | None:
    """Return the language-model classifier the settings configure, or None without a URL.

    Raises ClassifierMisconfigured when a base URL is set without a model.
    """
    if not settings.llm_base_url:
        return None
    if not settings.llm_model:
        raise ClassifierMisconfigured(
            "CIVICPULSE_LLM_BASE_URL is set but CIVICPULSE_LLM_MODEL is not: set the model name"
        )
    key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else "none"
    return LLMClassifier(
        base_url=settings.llm_base_url,
        api_key=key,
        model=settings.llm_model,
        timeout_seconds=settings.llm_timeout_seconds,
    )


def build_pool(settings: Settings, database: Database, store: PostgresEventStore) -> ClassifierPool:
    return ClassifierPool(
        database,
        store,
        llm=build_llm(settings),
        concurrency=settings.classifier_concurrency,
        poll_seconds=settings.projector_poll_seconds,
    )
