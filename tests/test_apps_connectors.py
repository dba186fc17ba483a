"""The connector example apps, apps/sse_totals.py and apps/ingest_service.py, run for real
through pipes.runtime.run on local:// (in tmp_path), configured by their environment
variables: an SSE server on loopback feeding PostgreSQL (a table of the test's own, dropped
afterwards), and POSTs to the ingest endpoint on a free port landing in a Parquet dataset.
Results are checked against recomputations from what the tests sent.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
import time
import uuid
from collections import defaultdict

import aiohttp
import pytest
from aiohttp import web

import pipes
from helpers import DSN, free_port, read_topic, sql_async


# -- helpers ----------------------------------------------------------------------------------
def load(module: str, monkeypatch, **env: str):
    """Import apps.<module> afresh with `env` set: the apps read their settings at import."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    name = f"apps.{module}"
    if name in sys.modules:
        return importlib.reload(sys.modules[name])
    return importlib.import_module(name)


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


async def serve_handler(handler) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_get("/stream", handler)
    return await serve(app)


async def wait_for(cond, task, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not await cond():
        if task.done():
            task.result()
            raise AssertionError("the worker ended early")
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.fixture
def pg_table():
    """A unique table name; the table and the sink's progress rows are removed afterwards."""
    try:
        asyncio.run(sql_async("SELECT 1"))
    except Exception as e:
        pytest.fail(f"PostgreSQL is not reachable at {DSN} ({type(e).__name__}: {e}); start it "
                    f"(`service postgresql start`) or set PIPES_TEST_POSTGRES", pytrace=False)
    table = f"pipes_test_totals_{uuid.uuid4().hex[:10]}"
    yield table
    asyncio.run(sql_async(f"DROP TABLE IF EXISTS {table}"))
    asyncio.run(sql_async("DELETE FROM pipes_offsets WHERE sink = $1", table))
    asyncio.run(sql_async("DELETE FROM pipes_offsets_rejected WHERE sink = $1", table))


def totals_of(trades: list[dict]) -> dict[str, dict]:
    """The expected table, computed from the trades in the order they were sent."""
    out: dict[str, dict] = defaultdict(lambda: {"trades": 0, "shares": 0, "notional": 0.0})
    for t in trades:
        row = out[t["symbol"]]
        row["trades"] += 1
        row["shares"] += t["qty"]
        row["notional"] = round(row["notional"] + t["qty"] * t["price"], 2)
        row["last_price"] = t["price"]
    return {s: {"symbol": s, **r} for s, r in out.items()}


async def table_rows(table: str) -> dict[str, dict]:
    return {r["symbol"]: dict(r.items()) for r in await sql_async(f"SELECT * FROM {table}", fetch=True)}


# -- apps/sse_totals.py -----------------------------------------------------------------------
class TradeFeed:
    """Trade events 1..n with ids (honouring Last-Event-ID), a heartbeat event and a trade
    without a qty among them, the connection dropped once halfway; then 204."""

    def __init__(self, trades: list[dict]):
        self.trades, self.requests = trades, []

    async def handler(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.headers.get("Last-Event-ID"))
        start = int(request.headers.get("Last-Event-ID") or 0) + 1
        if start > len(self.trades):
            return web.Response(status=204)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"retry: 20\n\n")
        for i in range(start, len(self.trades) + 1):
            await resp.write(f"event: trade\nid: {i}\ndata: {json.dumps(self.trades[i - 1])}\n\n".encode())
            if i % 25 == 0:
                await resp.write(b"event: heartbeat\ndata: {\"symbol\": \"HB\", \"qty\": 1, \"price\": 1}\n\n")
            if i == len(self.trades) // 2 and len(self.requests) == 1:
                return resp  # a dropped connection: the source reconnects and resumes
        return resp


def test_sse_totals_upserts_running_totals_per_symbol(tmp_path, monkeypatch, pg_table):
    trades = [{"symbol": ["AAA", "BBB", "CCC", "DDD"][i * 7 % 4 if i % 3 else 0], "qty": 1 + i * 13 % 97,
               "price": round(10 + (i * 37 % 1000) / 7, 2)} for i in range(300)]
    bad = {"symbol": "AAA", "price": 12.5}  # no qty: to the dead-letter topic
    feed = TradeFeed(trades[:150] + [bad] + trades[150:])
    data = tmp_path / "data"
    settings = pipes.Settings(broker=f"local://{data}", commit_interval=0.1)

    async def main():
        runner, port = await serve_handler(feed.handler)
        try:
            mod = load("sse_totals", monkeypatch, PIPES_SSE_URL=f"http://127.0.0.1:{port}/stream",
                       PIPES_PG_DSN=DSN, PIPES_SSE_TABLE=pg_table)
            # The feed ends with a 204, which ends the source: until_done then finishes the run.
            await asyncio.wait_for(pipes.runtime.run(mod.app.build(settings), settings, until_done=True), 15)
            return mod, await table_rows(pg_table)
        finally:
            await runner.cleanup()

    mod, got = asyncio.run(main())
    want = totals_of(trades)
    assert set(got) == set(want) == {"AAA", "BBB", "CCC", "DDD"}  # no heartbeat "HB" row
    for symbol, row in want.items():
        assert got[symbol] == pytest.approx(row), symbol
    assert sum(r["trades"] for r in got.values()) == len(trades)
    assert feed.requests[:2] == [None, "150"] and feed.requests[-1] == str(len(trades) + 1)
    dead = read_topic(data, app=mod.app, topic="trades.dlq")
    assert [m.value for m in dead] == [bad]


def test_sse_totals_demo_server_feeds_the_app(tmp_path, monkeypatch, pg_table):
    """The demo feed of `python -m apps.sse_totals --demo-server`, ended after 60 trades."""
    data = tmp_path / "data"
    settings = pipes.Settings(broker=f"local://{data}", commit_interval=0.1)

    async def main():
        mod = load("sse_totals", monkeypatch, PIPES_SSE_TABLE=pg_table, PIPES_PG_DSN=DSN)
        runner, port = await serve(mod.demo_server(count=60, rate=1000))
        try:
            mod = load("sse_totals", monkeypatch, PIPES_SSE_URL=f"http://127.0.0.1:{port}/stream")
            await asyncio.wait_for(pipes.runtime.run(mod.app.build(settings), settings, until_done=True), 15)
            return mod, await table_rows(pg_table)
        finally:
            await runner.cleanup()

    mod, got = asyncio.run(main())
    want = totals_of([mod.demo_trade(i) for i in range(1, 61)])
    assert got.keys() == want.keys()
    for symbol, row in want.items():
        assert got[symbol] == pytest.approx(row), symbol


# -- apps/ingest_service.py -------------------------------------------------------------------
def expected_row(e: dict) -> dict:
    """What the service should store for a valid event (the test's own recomputation)."""
    page = e["page"]
    return {"user": e["user"].strip().lower(), "page": page,
            "section": page.strip("/").split("/")[0] or "home",
            "ts": e["ts"], "day": e["ts"][:10], "ms": e.get("ms", 0)}


def test_ingest_service_writes_valid_events_to_the_dataset_and_bad_ones_to_the_dlq(tmp_path, monkeypatch):
    out, data, port = tmp_path / "page_views", tmp_path / "data", free_port()
    settings = pipes.Settings(broker=f"local://{data}", commit_interval=0.1)
    valid = [{"user": f" U{i % 7} ", "page": ["/", "/products/%d" % i, "/blog/post-%d" % i, "/cart"][i % 4],
              "ts": f"2026-11-{1 + i % 3:02d}T{i % 24:02d}:{i % 60:02d}:00Z", **({"ms": i * 10} if i % 5 else {})}
             for i in range(120)]
    invalid = [
        {"page": "/x", "ts": "2026-11-01T00:00:00Z"},                       # no user
        {"user": "u1", "page": "no-slash", "ts": "2026-11-01T00:00:00Z"},   # page not a path
        {"user": "u1", "page": "/x", "ts": "yesterday"},                    # ts not a time
        {"user": "u1", "page": "/x", "ts": "2026-11-01T00:00:00"},          # ts without a time zone
        {"user": "u1", "page": "/x", "ts": "2026-11-01T00:00:00Z", "ms": -5},
        "just a string",
    ]
    # Invalid events mixed in at fixed places, sent as JSON arrays, single objects and NDJSON.
    events = list(valid)
    for n, e in enumerate(invalid):
        events.insert(n * 20 + 3, e)
    requests = [("application/json", json.dumps(events[:50])),
                *[("application/json", json.dumps(e)) for e in events[50:60]],
                ("application/x-ndjson", "\n".join(json.dumps(e) for e in events[60:]) + "\n")]

    async def main():
        mod = load("ingest_service", monkeypatch, PIPES_INGEST_HOST="127.0.0.1", PIPES_INGEST_PORT=str(port),
                   PIPES_INGEST_OUT=str(out))
        stop = asyncio.Event()
        task = asyncio.create_task(pipes.runtime.run(mod.app.build(settings), settings, stop=stop))
        try:
            url = f"http://127.0.0.1:{port}/events"
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
                async def up():
                    try:
                        async with http.get(url) as r:
                            return r.status == 405  # listening (it takes POSTs only)
                    except aiohttp.ClientConnectionError:
                        return False
                await wait_for(up, task)
                accepted = 0
                for ctype, body in requests:
                    async with http.post(url, data=body, headers={"Content-Type": ctype}) as resp:
                        assert resp.status == 200, await resp.text()
                        accepted += (await resp.json())["accepted"]
            assert accepted == len(events)

            async def all_in():  # the dataset commits at the checkpoints after the transform ran
                return out.exists() and len(list(pipes.io.Dataset(str(out)).read())) >= len(valid)
            await wait_for(all_in, task)
            stop.set()
            await asyncio.wait_for(task, 10)
        finally:
            stop.set()
            if not task.done():
                await asyncio.wait_for(task, 10)
        return mod

    mod = asyncio.run(main())
    rows = list(pipes.io.Dataset(str(out)).read())
    assert rows == [expected_row(e) for e in valid]  # all of them, once each, in order
    dead = read_topic(data, app=mod.app, topic="raw_events.dlq")
    assert [m.value for m in dead] == invalid
    assert all(m.headers.get("pipes.error.type") for m in dead)
    assert [m.value for m in read_topic(data, app=mod.app, topic="raw_events")] == events
