"""SSE totals: running per-symbol trade totals from a server-sent events feed, in PostgreSQL.

    SSE feed (PIPES_SSE_URL) -> "trades" -> check_trade (bad ones -> "trades.dlq") -> "valid_trades"
      -> total_by_symbol (keyed by symbol) -> "symbol_totals"
      -> PostgreSQL table PIPES_SSE_TABLE (default trade_totals), one row per symbol, upserted

Try it with the demo feed in one terminal and the worker in another:

    .venv/bin/python -m apps.sse_totals --demo-server          # http://127.0.0.1:8000/stream
    .venv/bin/pipes worker -A apps.sse_totals
    psql postgresql://127.0.0.1:5432/test -c 'TABLE trade_totals ORDER BY symbol'
"""

import asyncio
import json
import os
import random
import re

import pipes

# Read once, at import (`pipes worker` imports this module, then runs `app`).
SSE_URL = os.environ.get("PIPES_SSE_URL", "http://127.0.0.1:8000/stream")
PG_DSN = os.environ.get("PIPES_PG_DSN", "postgresql://127.0.0.1:5432/test")
TABLE = os.environ.get("PIPES_SSE_TABLE", "trade_totals")

if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", TABLE):  # it goes into SQL below
    raise ValueError(f"PIPES_SSE_TABLE={TABLE!r}: use a plain lower-case table name")

TOTALS_DDL = f"""CREATE TABLE IF NOT EXISTS {TABLE} (
    symbol     text PRIMARY KEY,
    trades     bigint NOT NULL,
    shares     bigint NOT NULL,
    notional   float8 NOT NULL,  -- sum of qty * price
    last_price float8 NOT NULL
)"""


class TotalsSink(pipes.io.PostgresSink):
    """PostgresSink wants its table to exist when the worker starts: this one creates it
    first (CREATE TABLE IF NOT EXISTS, so an existing table and its rows are kept)."""

    async def open(self):
        import asyncpg  # PostgresSink needs it anyway

        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            await conn.execute(TOTALS_DDL)
        finally:
            await conn.close()
        await super().open()  # then the sink's own checks, and its offsets table


app = pipes.App("sse_totals")

# The SSE source: one message per event; event="trade" skips the feed's other event types
# (heartbeats, say). Its checkpoint is the last event id, sent back as Last-Event-ID when it
# reconnects or the worker restarts, so a server that honours it resumes where we stopped.
app.source(pipes.io.SSE(SSE_URL, event="trade"), to="trades", name="feed")


@app.transform("trades", to="valid_trades")
def check_trade(trade):
    """Raising refuses an event: the default on_error sends it to the dead-letter topic
    "trades.dlq" (with the error in its headers) and the worker goes on."""
    symbol, qty, price = trade["symbol"], int(trade["qty"]), float(trade["price"])  # KeyError, ValueError
    if not symbol or qty <= 0 or price <= 0:
        raise ValueError(f"not a trade: {trade!r}")
    return {"symbol": symbol, "qty": qty, "price": price}


@app.transform("valid_trades", to="symbol_totals", key="symbol")
def total_by_symbol(trade, state):
    """key="symbol": `state` is this symbol's own dict, kept by pipes across restarts."""
    state["trades"] = state.get("trades", 0) + 1
    state["shares"] = state.get("shares", 0) + trade["qty"]
    state["notional"] = round(state.get("notional", 0.0) + trade["qty"] * trade["price"], 2)  # in cents
    return {"symbol": trade["symbol"], **state, "last_price": trade["price"]}  # a row of the table


# Each running total replaces the symbol's row (upsert_on the primary key). The sink writes
# exactly once: it records the offsets it wrote in the table pipes_offsets, in the same
# transaction as the rows.
app.sink("symbol_totals", TotalsSink(PG_DSN, TABLE, upsert_on=["symbol"]), name="totals_table")


# -- a demo feed ------------------------------------------------------------------------------
SYMBOLS = ["ACME", "GLOBX", "INITEC", "UMBRL", "WAYNE"]


def demo_trade(i: int) -> dict:
    """Trade number i of the demo feed: always the same for the same i."""
    rnd = random.Random(i)
    return {"symbol": rnd.choice(SYMBOLS), "qty": rnd.randint(1, 100), "price": round(rnd.uniform(5, 500), 2)}


def demo_server(count: int | None = None, rate: float = 20.0):
    """An aiohttp app serving GET /stream: trades 1, 2, ... with ids, `rate` a second, from
    the one after the Last-Event-ID header (so the worker resumes without gaps), with a
    heartbeat event every 10. After `count` trades (None: never) the stream ends and the
    next request gets 204 No Content, which ends the SSE source."""
    from aiohttp import web

    async def stream(request):
        start = int(request.headers.get("Last-Event-ID") or 0) + 1
        if count is not None and start > count:
            return web.Response(status=204)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        await resp.write(b"retry: 200\n\n")  # reconnect after 200 ms
        i = start
        try:
            while count is None or i <= count:
                if i % 10 == 0:
                    await resp.write(b'event: heartbeat\ndata: {"ok": true}\n\n')
                await resp.write(f"event: trade\nid: {i}\ndata: {json.dumps(demo_trade(i))}\n\n".encode())
                i += 1
                await asyncio.sleep(1 / rate)
        except ConnectionResetError:
            pass  # the client went away
        return resp

    server = web.Application()
    server.router.add_get("/stream", stream)
    return server


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="sse_totals: the app is run by `pipes worker -A apps.sse_totals`")
    parser.add_argument("--demo-server", action="store_true", help="serve a demo trade feed")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--rate", type=float, default=20.0, help="trades per second")
    parser.add_argument("--count", type=int, default=None, help="end the feed after this many trades")
    args = parser.parse_args()
    if not args.demo_server:
        parser.error("nothing to do: pass --demo-server, or run the app with `pipes worker -A apps.sse_totals`")
    from aiohttp import web

    print(f"demo feed on http://127.0.0.1:{args.port}/stream (Ctrl-C to stop)")
    web.run_app(demo_server(args.count, args.rate), host="127.0.0.1", port=args.port, print=None)
