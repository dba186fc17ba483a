"""Orders enriched with customer data: a stream–table join.

    generated customers -> "customers" (keyed by customer id) -> customers (table)
    data/orders.jsonl   -> "orders" -> with_customer (left join on order["customer"])
                                         -> "enriched_orders" -> out/enrich/orders.jsonl

Run it with ``pipes worker -A apps.enrich --until-done``. An order is joined with its
customer as of the customer records the worker has processed before the order: pipes
reads the two topics in the order it consumes them and does not hold orders back for
the table. So the table is loaded first: ``read_orders`` waits before its first order
until ``customers_loaded`` has seen all 500 customers (the join node has processed them
by then: both read "customers" in the same batch). An order whose customer is unknown
would get ``"tier": null`` (``how="left"``; ``how="inner"`` drops it).

Send a customer update while it runs (``pipes send`` with a key), and later orders of
that customer show it. ``pipes state -A apps.enrich customers c107`` reads one customer
from the table (``{"value": {...}}``); the join keeps its own copy in ``with_customer``.
"""

import asyncio
import json
import os
import random
from pathlib import Path

import pipes

DATA = Path(__file__).parent / "data" / "orders.jsonl"
OUT = os.environ.get("PIPES_ENRICH_OUT", "out/enrich")
CUSTOMERS = 500
COUNTRIES = ["DE", "FR", "NL", "PL", "ES", "IT", "SE", "AT", "BE"]

app = pipes.App("enrich")
app.topic("customers", keyed=True)  # its producer sets the key, the customer id: no re-keying


def customer(i: int) -> pipes.Message:
    rnd = random.Random(i)
    cid = f"c{i:03d}"
    return pipes.Message({"id": cid, "name": f"Customer {i}", "country": rnd.choice(COUNTRIES),
                          "tier": rnd.choice(["basic", "basic", "plus", "gold"])}, key=cid)


app.source([customer(i) for i in range(CUSTOMERS)], to="customers", name="load_customers")
customers = app.table("customers")
_loaded = [0]  # customers seen in this process


@app.sink("customers", batch=CUSTOMERS)
def customers_loaded(batch):
    _loaded[0] += len(batch)


@app.source(to="orders")
async def read_orders(state):
    """One order per call; its byte offset in the file is the checkpoint."""
    while "offset" not in state and _loaded[0] < CUSTOMERS:
        await asyncio.sleep(0.05)  # the first order waits for the table
    with DATA.open("rb") as f:
        f.seek(state.get("offset", 0))
        line = f.readline()
        state["offset"] = f.tell()
    return json.loads(line) if line else None


@app.join("orders", customers, to="enriched_orders", key="customer", how="left")
def with_customer(order, cust):
    total = sum(i["qty"] * i["price"] for i in order["items"])
    return {"order_id": order["order_id"], "ts": order["ts"], "customer": order["customer"],
            "total": round(total, 2), "status": order["status"],
            "tier": cust and cust["tier"], "country": cust and cust["country"]}


app.sink("enriched_orders", pipes.io.JsonLines(f"{OUT}/orders.jsonl"))
