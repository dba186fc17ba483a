"""Tables and joins against a plain-Python recomputation.

Across two topics, a join sees them in the order the worker consumes them; to pin that
order, the tests feed the topics in phases on one local:// data dir (table, then stream,
then table updates, then more stream) and run the worker to completion after each.
"""

from __future__ import annotations

import asyncio
import random

import pytest

import pipes
from pipes.brokers import Changes
from pipes.brokers.local import LocalBroker
from pipes.emit import Emitter
from pipes.runtime import run
from pipes.testing import read_messages, run_app
from pipes.topology import Node

PARTS = 3


class _Buffers:
    def __init__(self) -> None:
        self.outputs: dict[str, list] = {}

    def buffer(self, topic: str, scope: tuple | None = None) -> list:
        return self.outputs.setdefault(topic, [])


def phase(app: pipes.App, settings: pipes.Settings, inputs: dict[str, list]) -> None:
    """Append `inputs` (values or Messages) to their topics, then run until all is consumed."""
    graph = app.build(settings)

    async def main():
        broker = LocalBroker(settings.broker.removeprefix("local://"), settings)
        try:
            await broker.open(graph, list(graph.topologies.values()))
            ckpt = _Buffers()
            for topic, values in inputs.items():
                emitter = Emitter(Node(id="feed", kind="source", topology="", target=None, outputs=(topic,)), graph)
                bufs = emitter.buffers(ckpt)
                for n, v in enumerate(values):
                    emitter.encode(v, None, None, 1_000 + n, bufs, ckpt)
            await broker.commit("feed", Changes(outputs=ckpt.outputs))
            await run(graph, settings, until_done=True, broker=broker)
        finally:
            await broker.close()

    asyncio.run(main())


def read(app: pipes.App, settings: pipes.Settings, topic: str) -> list[pipes.Message]:
    async def main():
        broker = LocalBroker(settings.broker.removeprefix("local://"), settings)
        try:
            return read_messages(broker, app.build(settings), topic)
        finally:
            await broker.close()

    return asyncio.run(main())


def shop() -> tuple[pipes.App, object]:
    app = pipes.App("shop", partitions=PARTS)
    app.topic("customers", keyed=True)  # a table's producers key it, so None values can delete
    customers = app.table("customers")

    @app.join("orders", customers, to="enriched", key="customer")
    def enrich(order, customer):
        return {**order, "name": customer["name"]}

    @app.join("orders", customers, to="enriched_left", key="customer", how="left")
    def enrich_left(order, customer):
        return {**order, "name": customer and customer["name"]}

    return app, customers


def test_stream_table_join_sees_table_updates_between_stream_messages(tmp_path):
    rnd = random.Random(5)
    settings = pipes.Settings(broker=f"local://{tmp_path / 'data'}")
    app, _ = shop()
    table: dict[str, dict] = {}
    want_inner, want_left, order_no = [], [], 0
    for round_ in range(3):
        updates = []
        for _ in range(40):
            cid = f"c{rnd.randrange(30)}"
            if rnd.random() < 0.15 and round_:
                updates.append(pipes.Message(None, key=cid))  # a tombstone deletes the customer
                table.pop(cid, None)
            else:
                c = {"id": cid, "name": f"{cid}-v{round_}-{rnd.randrange(1000)}"}
                updates.append(pipes.Message(c, key=cid))
                table[cid] = c
        orders = []
        for _ in range(200):
            o = {"no": order_no, "customer": f"c{rnd.randrange(35)}"}
            order_no += 1
            orders.append(o)
            c = table.get(o["customer"])
            want_left.append({**o, "name": c and c["name"]})
            if c:
                want_inner.append({**o, "name": c["name"]})
        phase(app, settings, {"customers": updates})
        phase(app, settings, {"orders": orders})

    by_no = lambda rows: sorted(rows, key=lambda r: r["no"])  # noqa: E731
    assert by_no(m.value for m in read(app, settings, "enriched")) == want_inner
    assert by_no(m.value for m in read(app, settings, "enriched_left")) == want_left
    assert len(want_inner) < len(want_left)
    # The table's node holds each key's latest value as {"value": ...}, tombstoned keys gone.
    state = run_state(settings, app, "customers")
    assert state == {k: {"value": v} for k, v in table.items()}


def run_state(settings, app, node, parts=PARTS):
    import pickle

    from pipes.store import state_prefix

    async def main():
        broker = LocalBroker(settings.broker.removeprefix("local://"), settings)
        try:
            out = {}
            for p in range(parts):
                prefix = state_prefix(node, p)
                for k, v in broker.store.scan("state", prefix):
                    out[k[len(prefix):].decode()] = pickle.loads(v)
            return out
        finally:
            await broker.close()

    return asyncio.run(main())


def test_table_table_join_follows_both_sides(tmp_path):
    rnd = random.Random(9)
    settings = pipes.Settings(broker=f"local://{tmp_path / 'data'}")
    app = pipes.App("tt", partitions=PARTS)
    app.topic("people", keyed=True)
    app.topic("addresses", keyed=True)
    people, addresses = app.table("people"), app.table("addresses")

    @app.join(people, addresses, to="people_addresses")
    def with_address(person, address):
        return {"id": person["id"], "name": person["name"], "city": address["city"]}

    left: dict[str, dict] = {}
    right: dict[str, dict] = {}
    for round_ in range(4):
        for topic, side, field in (("people", left, "name"), ("addresses", right, "city")):
            batch = []
            for _ in range(25):
                k = f"p{rnd.randrange(15)}"
                if rnd.random() < 0.2:
                    batch.append(pipes.Message(None, key=k))
                    side.pop(k, None)
                else:
                    side[k] = {"id": k, field: f"{field}{round_}.{rnd.randrange(99)}"}
                    batch.append(pipes.Message(side[k], key=k))
            phase(app, settings, {topic: batch})
    last: dict[str, object] = {}
    for m in read(app, settings, "people_addresses"):
        last[m.key] = m.value
    want = {k: {"id": k, "name": left[k]["name"], "city": right[k]["city"]} for k in left if k in right}
    assert {k: v for k, v in last.items() if v is not None} == want
    assert any(v is None for v in last.values()), "the test should delete some joined keys"


def test_windowed_stream_stream_join(tmp_path):
    rnd = random.Random(3)
    clicks = [{"ad": f"a{rnd.randrange(10)}", "ts": rnd.randrange(0, 100_000), "c": n} for n in range(300)]
    views = [{"ad": f"a{rnd.randrange(10)}", "ts": rnd.randrange(0, 100_000), "v": n} for n in range(300)]
    settings = pipes.Settings(broker=f"local://{tmp_path / 'data'}")
    app = pipes.App("ss")
    for how in ("inner", "left"):
        app.join("clicks", "views", to=f"pairs_{how}", key="ad", within=5, grace=200, timestamp="ts", how=how,
                 name=f"pair_{how}")(lambda c, v: {"c": c["c"], "v": v and v["v"]})
    phase(app, settings, {"clicks": clicks, "views": views})
    want = {(c["c"], v["v"]) for c in clicks for v in views if c["ad"] == v["ad"] and abs(c["ts"] - v["ts"]) <= 5000}
    assert 20 < len(want) < 2000
    got = [(m.value["c"], m.value["v"]) for m in read(app, settings, "pairs_inner")]
    assert len(got) == len(set(got)) and set(got) == want
    assert {(m.value["c"], m.value["v"]) for m in read(app, settings, "pairs_left")} == want  # nothing expired yet
    # A message far ahead advances stream time (all keys here share one partition): everything expires.
    phase(app, settings, {"clicks": [{"ad": "zz", "ts": 10_000_000, "c": -1}]})
    matched = {c for c, _ in want}
    unmatched = {(c["c"], None) for c in clicks if c["c"] not in matched}
    left = [(m.value["c"], m.value["v"]) for m in read(app, settings, "pairs_left")]
    assert len(left) == len(set(left)) and set(left) == want | unmatched and unmatched
    assert set(run_state(settings, app, "pair_inner", parts=1)) == {"\x00idx", "zz"}


def test_join_inputs_must_be_co_partitioned():
    app = pipes.App("cp")
    app.topic("a", partitions=2, keyed=True)
    app.topic("b", partitions=3, keyed=True)
    t = app.table("b")
    app.join("a", t, to="out")(lambda x, y: x)
    with pytest.raises(pipes.ConfigError, match="not co-partitioned"):
        run_app(app, {})


def test_join_config_errors():
    app = pipes.App("cfg")
    t = app.table("t")
    with pytest.raises(pipes.ConfigError, match="within="):
        app.join("a", "b", to="o")(lambda x, y: x)
    with pytest.raises(pipes.ConfigError, match="how="):
        app.join("a", t, to="o", how="outer")(lambda x, y: x)
    with pytest.raises(pipes.ConfigError, match="stream first"):
        app.join(t, "a", to="o")(lambda x, y: x)


def test_rekeyed_stream_gets_the_partitions_of_its_table():
    app = pipes.App("rk")
    app.topic("customers", partitions=4, keyed=True)
    customers = app.table("customers")
    app.join("orders", customers, to="out", key="customer", name="enrich")(lambda o, c: {**o, "c": c})
    result = run_app(app, {"customers": [pipes.Message({"n": i}, key=f"c{i}") for i in range(8)],
                           "orders": []})
    assert result.graph.topics["rk.enrich.left.rekey"].partitions == 4


def test_enrich_app_joins_every_order_with_its_customer(monkeypatch, tmp_path):
    import importlib
    import json
    import sys

    monkeypatch.setenv("PIPES_ENRICH_OUT", str(tmp_path))
    module = importlib.reload(sys.modules["apps.enrich"]) if "apps.enrich" in sys.modules else \
        importlib.import_module("apps.enrich")
    result = run_app(module.app)
    orders = [json.loads(line) for line in module.DATA.read_text().splitlines()]
    tiers = {m.key: m.value["tier"] for m in (module.customer(i) for i in range(module.CUSTOMERS))}
    got = {o["order_id"]: o for o in result["enriched_orders"]}
    assert len(got) == len(orders) == len(result["enriched_orders"])
    assert all(got[o["order_id"]]["tier"] == tiers[o["customer"]] for o in orders)
    assert result.state("customers")["c107"] == {"value": module.customer(107).value}
