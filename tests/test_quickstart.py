"""The quickstart app (apps/quickstart.py) computes what an independent reading of its data says."""

import atexit
import importlib
import json
import sys
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import pytest

from pipes.testing import run_app

ROOT = Path(__file__).resolve().parents[1]
ORDERS = ROOT / "apps" / "data" / "orders.jsonl"


def expected_totals() -> tuple[dict[str, Decimal], dict[str, int], int, int]:
    """Per-SKU revenue and units of paid orders, straight from the file, in exact decimals;
    the number of paid line items and of orders."""
    revenue: dict[str, Decimal] = defaultdict(Decimal)
    units: dict[str, int] = defaultdict(int)
    items = orders = 0
    with ORDERS.open() as f:
        for line in f:
            orders += 1
            order = json.loads(line)
            if order["status"] != "paid":
                continue
            for item in order["items"]:
                revenue[item["sku"]] += Decimal(str(item["price"])) * item["qty"]
                units[item["sku"]] += item["qty"]
                items += 1
    return revenue, units, items, orders


@pytest.fixture
def quickstart(tmp_path, monkeypatch):
    """apps.quickstart imported afresh, writing its output under tmp_path."""
    monkeypatch.syspath_prepend(str(ROOT))  # apps/ is not an installed package
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PIPES_QUICKSTART_OUT", str(tmp_path / "out"))  # read at import time
    sys.modules.pop("apps.quickstart", None)
    module = importlib.import_module("apps.quickstart")
    yield module
    atexit.unregister(module.print_summary)  # no summary printed when pytest exits
    sys.modules.pop("apps.quickstart", None)


def close(value: float, exact: Decimal) -> bool:
    return abs(Decimal(str(value)) - exact) < Decimal("0.005")


def test_quickstart_totals_match_an_independent_recomputation(quickstart, tmp_path, capsys):
    revenue, units, items, orders = expected_totals()
    assert items > 10_000 and len(revenue) > 10

    result = run_app(quickstart.app)

    # Keyed state of the aggregation: one entry per SKU with its final totals.
    state = result.state("total_by_sku")
    assert sorted(state) == sorted(revenue)
    for sku in revenue:
        assert state[sku]["units"] == units[sku], sku
        assert close(state[sku]["revenue"], revenue[sku]), (sku, state[sku]["revenue"], revenue[sku])

    # One running-totals message per paid line item; the last one per SKU is its final total.
    assert len(result["sku_totals"]) == items
    assert result.report.produced == orders

    # The JsonLines sink wrote the same running totals to the configured directory.
    path = tmp_path / "out" / "sku_totals.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == result["sku_totals"]
    last = {row["sku"]: row for row in rows}
    assert all(last[s]["units"] == units[s] and close(last[s]["revenue"], revenue[s]) for s in revenue)

    # The function sink's summary counts what this process saw, and prints briefly.
    assert quickstart.seen["updates"] == items
    assert quickstart.latest == last
    quickstart.print_summary()
    out = capsys.readouterr().out.splitlines()
    assert 1 <= len(out) < 15
    assert out[0].startswith("quickstart: ")
