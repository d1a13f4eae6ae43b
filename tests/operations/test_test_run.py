"""A test run stopped with SIGTERM stops the embedded server it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]

PROBE = """
from pathlib import Path

def test_waits(server_conninfo, tmp_path_factory):
    Path({marker!r}).write_text(server_conninfo)
    import time
    time.sleep(120)
"""


def _postgres_running(data_dir: str) -> bool:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            arguments = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue  # the process ended while the loop read the list
        if any(b"postgres" in argument for argument in arguments[:1]) and any(
            data_dir.encode() in argument for argument in arguments
        ):
            return True
    return False


@pytest.mark.slow
def test_sigterm_stops_embedded_server(tmp_path: Path) -> None:
    marker = tmp_path / "conninfo"
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE.format(marker=str(marker)))
    environment = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    output = tmp_path / "output.txt"
    with output.open("wb") as sink:
        run = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest"]
            + ["-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(probe)],
            cwd=REPOSITORY,
            env=environment,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert run.poll() is None, output.read_text()
            assert time.monotonic() < deadline, "the probe test never started"
            time.sleep(0.2)
        conninfo = marker.read_text()
        data_dir = conninfo.split("host=")[-1].split("&")[0]
        assert data_dir.startswith("/"), conninfo
        assert _postgres_running(data_dir)

        run.send_signal(signal.SIGTERM)
        run.wait(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()

    deadline = time.monotonic() + 30
    while _postgres_running(data_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _postgres_running(data_dir)
    assert not Path(data_dir).exists()
