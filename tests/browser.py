"""Helpers for browser tests: the API served on a loopback port, and headless Chromium."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn

from tests.conftest import CHROMIUM_ARGS, chromium

REPO = Path(__file__).resolve().parents[1]


def artifacts_dir(name: str) -> Path:
    """Return the folder for a test's screenshots: test-artifacts/NAME (git-ignored), or
    $CIVICPULSE_TEST_ARTIFACTS/NAME."""
    root = Path(os.environ.get("CIVICPULSE_TEST_ARTIFACTS", REPO / "test-artifacts"))
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Serve `app` with uvicorn on 127.0.0.1 in a thread; yield its base URL."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise AssertionError("the test server did not start within 30 s")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()


@contextmanager
def browser() -> Iterator[Any]:
    """Launch Debian's headless Chromium with a fresh profile; never download a browser."""
    from playwright.sync_api import sync_playwright

    executable = chromium()
    with (
        tempfile.TemporaryDirectory(prefix="civicpulse-chromium-") as profile,
        sync_playwright() as playwright,
    ):
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=str(executable),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()
