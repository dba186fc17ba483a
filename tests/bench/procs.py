"""Starting measured children: pipes and the loops from .venv, peers from .venv-peers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from . import protocol

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PEERS_VENV = os.path.join(ROOT, ".venv-peers")
PEERS_PYTHON = os.path.join(PEERS_VENV, "bin", "python")
# runner -> the module its child runs
MODULES = {**dict.fromkeys(("pipes", "naive", "batched", "forward", "rocksdict", "quickstart"), "tests.bench.child"),
           "quix": "tests.bench.peer_quix", "faust": "tests.bench.peer_faust"}
PEERS = ("quix", "faust")


class ChildFailed(Exception):
    """A child exited without a result; the message ends with its log's tail."""


@dataclass
class Child:
    proc: subprocess.Popen
    log: str
    runner: str

    def stop(self) -> None:
        """SIGTERM: a child in the latency mode reports and exits."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def result(self, timeout: float) -> dict:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise ChildFailed(f"{self.runner} did not finish within {timeout:.0f} s{self._tail()}") from None
        result = protocol.parse(out)
        if result is None:
            raise ChildFailed(f"{self.runner} exited with {self.proc.returncode} and no result{self._tail()}")
        return result

    def _tail(self) -> str:
        with open(self.log, errors="replace") as f:
            lines = f.read().strip().splitlines()[-12:]
        return ("; its log " + self.log + " ends:\n    " + "\n    ".join(lines)) if lines else ""


def python_for(runner: str) -> str:
    return PEERS_PYTHON if runner in PEERS else sys.executable


def start(spec: dict, log_dir: str) -> Child:
    runner = spec["runner"]
    fd, log = tempfile.mkstemp(prefix=f"{runner}-{spec['workload']}-", suffix=".log", dir=log_dir)
    with os.fdopen(fd, "w") as stderr:
        proc = subprocess.Popen([python_for(runner), "-m", MODULES[runner], json.dumps(spec)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, text=True)
    return Child(proc, log, runner)


def peers_available() -> dict[str, str | None]:
    """Each peer -> None when it can run, else why not."""
    if not os.path.exists(PEERS_PYTHON):
        why = "no .venv-peers (make bench creates it)"
        return {p: why for p in PEERS}
    probe = {"quix": "quixstreams", "faust": "faust"}
    out = {}
    for peer, module in probe.items():
        r = subprocess.run([PEERS_PYTHON, "-c", f"import {module}"], capture_output=True, text=True)
        out[peer] = None if r.returncode == 0 else f"{module} does not import in .venv-peers: " \
                                                   f"{r.stderr.strip().splitlines()[-1] if r.stderr.strip() else '?'}"
    return out
