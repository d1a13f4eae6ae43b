"""Settings from the environment: the values they take, and the error a bad value raises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ledger.settings import InvalidSettings, get_settings


@pytest.fixture(autouse=True)
def uncached_settings() -> None:
    get_settings.cache_clear()


def test_group_commit_workers_default_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CIVICPULSE_GROUP_COMMIT_WORKERS", raising=False)
    default = get_settings().group_commit_workers
    get_settings.cache_clear()
    monkeypatch.setenv("CIVICPULSE_GROUP_COMMIT_WORKERS", "2")

    assert default == 1
    assert get_settings().group_commit_workers == 2


@pytest.mark.parametrize("value", ["0", "17", "two"])
def test_bad_setting_names_variable_and_value(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CIVICPULSE_GROUP_COMMIT_WORKERS", value)

    with pytest.raises(InvalidSettings) as raised:
        get_settings()

    message = str(raised.value)
    assert f"CIVICPULSE_GROUP_COMMIT_WORKERS={value!r}" in message
    assert "README.md" in message


def test_bad_settings_named_once_each(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIVICPULSE_API_PORT", "70000")
    monkeypatch.setenv("CIVICPULSE_LOG_LEVEL", "loud")

    with pytest.raises(InvalidSettings) as raised:
        get_settings()

    message = str(raised.value)
    assert message.count("CIVICPULSE_API_PORT='70000'") == 1
    assert "CIVICPULSE_LOG_LEVEL='loud': invalid log level 'loud'" in message
    assert "Value error" not in message


def test_cli_bad_setting_exits_2(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    env["CIVICPULSE_DATA_DIR"] = str(tmp_path / "pgdata")
    env["CIVICPULSE_GROUP_COMMIT_WORKERS"] = "0"

    finished = subprocess.run(
        [sys.executable, "-m", "api.cli", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert finished.returncode == 2
    assert "CIVICPULSE_GROUP_COMMIT_WORKERS='0'" in finished.stdout + finished.stderr
    assert "Traceback" not in finished.stdout + finished.stderr
    assert not (tmp_path / "pgdata").exists()
