"""The embedded server stops with its last user, even after a user was killed with SIGKILL."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.operations.test_test_run import REPOSITORY, _postgres_running

USER = """
import logging, sys, time
from pathlib import Path
from ledger.database import start_embedded_server
from ledger.settings import Settings

logging.basicConfig(level=logging.INFO)
start_embedded_server(Settings())
Path(sys.argv[1]).write_text("started")
if sys.argv[2] == "stay":
    time.sleep(300)
"""


def _stop_leftover_server(data_dir: Path) -> None:
    pid_file = data_dir / "postmaster.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGINT)


@pytest.mark.slow
def test_server_stops_after_killed_user(tmp_path: Path) -> None:
    data_dir = tmp_path / "pgdata"
    environment = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    environment["CIVICPULSE_DATA_DIR"] = str(data_dir)
    script = tmp_path / "user.py"
    script.write_text(USER)
    started = tmp_path / "started"
    killed = subprocess.Popen(
        [sys.executable, str(script), str(started), "stay"], cwd=REPOSITORY, env=environment
    )
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert killed.poll() is None, "the first user exited before it started the server"
            assert time.monotonic() < deadline, "the first user never started the server"
            time.sleep(0.2)
        killed.kill()
        killed.wait(30)
        handles = json.loads((data_dir / ".handle_pids.json").read_text())
        assert killed.pid in handles
        assert _postgres_running(str(data_dir))

        # A later user that exits cleanly is the last one: it stops the server.
        later = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "again"), "leave"],
            cwd=REPOSITORY,
            env=environment,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert later.returncode == 0, later.stderr
        assert "forgetting processes" in later.stderr

        deadline = time.monotonic() + 30
        while _postgres_running(str(data_dir)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _postgres_running(str(data_dir))
    finally:
        if killed.poll() is None:
            killed.kill()
        _stop_leftover_server(data_dir)
