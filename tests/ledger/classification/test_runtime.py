"""Building the classifier from the settings."""

from __future__ import annotations

import pytest

from ledger.classification.llm import LLMClassifier
from ledger.classification.runtime import ClassifierMisconfigured, build_llm
from ledger.settings import Settings


def test_build_llm_without_url_uses_rules() -> None:
    assert build_llm(Settings(llm_model="m")) is None


def test_build_llm_requires_model() -> None:
    with pytest.raises(ClassifierMisconfigured, match="CIVICPULSE_LLM_MODEL"):
        build_llm(Settings(llm_base_url="http://127.0.0.1:9/v1"))


def test_build_llm_reads_settings() -> None:
    settings = Settings(
        llm_base_url="http://127.0.0.1:9/v1",
        llm_model="small",
        llm_api_key="secret",
        llm_timeout_seconds=7,
    )
    classifier = build_llm(settings)
    assert isinstance(classifier, LLMClassifier)
    assert classifier.model == "small"
    assert str(classifier.client.base_url).startswith("http://127.0.0.1:9/v1")
    assert classifier.client.timeout == 7
    assert classifier.client.max_retries == 0
    classifier.close()


def test_settings_have_no_default_server(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CIVICPULSE_LLM_BASE_URL", "CIVICPULSE_LLM_MODEL", "CIVICPULSE_LLM_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.llm_base_url is None
    assert build_llm(settings) is None
