"""Quickstart: running revenue and units per SKU from a file of e-commerce orders.

    data/orders.jsonl -> read_orders -> "orders" -> only_paid -> "paid_orders"
      -> split_items -> "line_items" -> total_by_sku (keyed by sku) -> "sku_totals"
      -> out/quickstart/sku_totals.jsonl, and a summary printed when the worker exits

Run it with `make run` or `pipes worker -A apps.quickstart --until-done`. A second run
resumes from the checkpoint in ./.pipes/quickstart, so it has nothing left to do.
"""

import atexit
import json
import os
from pathlib import Path

import pipes

DATA = Path(__file__).parent / "data" / "orders.jsonl"  # next to this file, whatever the CWD
OUT = Path(os.environ.get("PIPES_QUICKSTART_OUT", "out/quickstart"))  # read once, at import

app = pipes.App("quickstart")  # names the data dir (.pipes/quickstart), groups and internal topics


@app.source(to="orders")
def read_orders(state):
    """Called until it returns None; one order per call. `state` is this source's checkpoint:
    pipes saves it together with what the source produced and hands it back after a restart."""
    with DATA.open("rb") as f:
        f.seek(state.get("offset", 0))
        line = f.readline()
        state["offset"] = f.tell()  # byte offset of the next line
    if not line:
        return None  # end of file: the source is finished (and stays finished after a restart)
    return json.loads(line)


@app.transform("orders", to="paid_orders")
def only_paid(order):
    if order["status"] == "paid":
        return order  # returning None (here: falling off the end) drops the message


@app.transform("paid_orders", to="line_items")
def split_items(order):
    """A generator transform: one message per line item of the order."""
    for item in order["items"]:
        yield {"order_id": order["order_id"], "customer": order["customer"], "country": order["country"],
               "sku": item["sku"], "qty": item["qty"], "amount": round(item["qty"] * item["price"], 2)}


@app.transform("line_items", to="sku_totals", key="sku")
def total_by_sku(item, state):
    """key="sku" re-keys the stream by SKU, so `state` is this SKU's own dict, persisted by
    pipes (RocksDB) and committed atomically with the message offsets."""
    state["revenue"] = round(state.get("revenue", 0) + item["amount"], 2)  # rounded to cents
    state["units"] = state.get("units", 0) + item["qty"]
    state["orders"] = state.get("orders", 0) + 1
    return {"sku": item["sku"], **state}  # the running totals after this line item


# A built-in sink object: appends each value as a JSON line, flushed at every checkpoint.
app.sink("sku_totals", pipes.io.JsonLines(str(OUT / "sku_totals.jsonl")), batch=1000, name="write_totals")

# What *this process* saw; a resumed run that has nothing to do sees (and prints) nothing.
seen = {"updates": 0}
latest: dict[str, dict] = {}  # sku -> its most recent running totals


@app.sink("sku_totals", batch=1000)
def summarize(rows):
    """A function sink called with lists of up to 1000 values."""
    if not seen["updates"]:
        atexit.register(print_summary)  # only once this process has processed something
    seen["updates"] += len(rows)
    for row in rows:
        latest[row["sku"]] = row


def print_summary():
    top = sorted(latest.values(), key=lambda r: r["revenue"], reverse=True)[:3]
    print(f"quickstart: {seen['updates']:,} line items aggregated in this run, "
          f"{len(latest)} SKUs updated -> {OUT / 'sku_totals.jsonl'}")
    print("  top SKUs by revenue so far: " + ", ".join(f"{r['sku']} {r['revenue']:,.2f} ({r['units']:,} units)"
                                                       for r in top))
