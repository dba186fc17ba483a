"""The apps in apps/ run unchanged on kafka://: `pipes worker -A apps.quickstart --broker kafka://…`
computes what the same app computes on memory:// and what an independent reading of its data
says (tests/test_quickstart.py), and a second run has nothing to do.

The quickstart's topic names are fixed ("orders", "sku_totals", …), so it gets a Tansu broker
of its own rather than the session's shared one.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from tansu import tansu
from test_kafka_interop import ConfluentKafka
from test_quickstart import ROOT, close, expected_totals

from pipes.testing import run_app

PIPES_CLI = Path(sys.executable).with_name("pipes")


@pytest.fixture
def quickstart(tmp_path, monkeypatch):
    """apps.quickstart imported afresh in this process (for the memory:// reference run)."""
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("PIPES_QUICKSTART_OUT", str(tmp_path / "memory-out"))  # read at import time
    sys.modules.pop("apps.quickstart", None)
    module = importlib.import_module("apps.quickstart")
    yield module
    atexit.unregister(module.print_summary)
    sys.modules.pop("apps.quickstart", None)


def pipes_cli(*args: str, out: Path, timeout: float = 50) -> subprocess.CompletedProcess:
    """The pipes command, run from the repository root as the README says."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPES_") or k == "PIPES_TEST_KAFKA"}
    env["PIPES_QUICKSTART_OUT"] = str(out)
    return subprocess.run([str(PIPES_CLI), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def test_quickstart_runs_unchanged_on_kafka(quickstart, tmp_path):
    revenue, units, items, orders = expected_totals()
    reference = run_app(quickstart.app)
    out, data = tmp_path / "out", tmp_path / "data"

    with tansu() as url:
        worker = ["worker", "-A", "apps.quickstart", "--broker", url, "--data-dir", str(data), "--until-done"]
        first = pipes_cli(*worker, out=out)
        assert first.returncode == 0, first.stderr
        assert f"sources produced {orders}" in first.stderr, first.stderr
        assert first.stdout.startswith(f"quickstart: {items:,} line items aggregated in this run, {len(revenue)} SKUs")

        # Every topic has one partition, so the running totals come in the memory:// order.
        totals = [orjson.loads(r.value) for r in ConfluentKafka(url).read("sku_totals")]
        assert totals == reference["sku_totals"]
        assert len(totals) == items
        rows = [json.loads(line) for line in (out / "sku_totals.jsonl").read_text().splitlines()]
        assert rows == totals

        # The keyed state, as `pipes state` prints it, is the reference's and the recomputation's.
        shown = pipes_cli("state", "-A", "apps.quickstart", "--broker", url, "--data-dir", str(data), "total_by_sku",
                          out=out, timeout=30)
        assert shown.returncode == 0, shown.stderr
        state = json.loads(shown.stdout)
        assert state == reference.state("total_by_sku")
        assert sorted(state) == sorted(revenue)
        for sku in revenue:
            assert state[sku]["units"] == units[sku], sku
            assert close(state[sku]["revenue"], revenue[sku]), (sku, state[sku]["revenue"], revenue[sku])

        # A second run resumes from the checkpoint: nothing is read, produced or written again.
        second = pipes_cli(*worker, out=out)
        assert second.returncode == 0, second.stderr
        assert "nothing to do" in second.stderr, second.stderr
        assert "processed 0 messages" in second.stderr and "sources produced 0" in second.stderr, second.stderr
        assert second.stdout == ""  # the app prints its summary only when it processed something
        assert len(ConfluentKafka(url).read("sku_totals")) == items
        assert (out / "sku_totals.jsonl").read_text().count("\n") == items
