"""Apps that tests/test_io_acceptance.py runs as `pipes worker` subprocesses.

Pick one with ACCEPT_APP:

* ``pg``: a function source with `state` emits rows ``{"id": i, "v": ...}`` for i in
  0..ACCEPT_N-1 (default 100,000) into "rows", sunk by PostgresSink into ACCEPT_TABLE
  (offsets in ACCEPT_TABLE_offsets) at ACCEPT_DSN.
* ``http``: HTTPIngest on 127.0.0.1:ACCEPT_PORT/ingest into the topic "events".

Run as a script, it is instead the load generator of the ingest test (a second process):

    python acceptance_apps.py URL OUT_JSON --seconds S --max-requests N --concurrency C

POSTs events ``{"id": i, ...}`` (i = 0, 1, ...) with C concurrent keep-alive connections
until S seconds or N requests, every 100th body malformed JSON, and writes OUT_JSON: the
ids answered 200, the malformed ids with their status and reason, any other answers, and
the requests/s achieved.
"""

import os

import pipes

WHICH = os.environ.get("ACCEPT_APP", "load" if __name__ == "__main__" else "")

if WHICH == "pg":
    from pipes.io.postgres import PostgresSink

    N = int(os.environ.get("ACCEPT_N", "100000"))
    TABLE = os.environ["ACCEPT_TABLE"]

    app = pipes.App("acceptpg", commit_every=int(os.environ.get("ACCEPT_COMMIT_EVERY", "1000")),
                    commit_interval=float(os.environ.get("ACCEPT_COMMIT_INTERVAL", "0.05")))

    @app.source(to="rows")
    def numbers(state):
        """One row per call; `state["i"]` is checkpointed with what was emitted."""
        i = state.get("i", 0)
        if i == N:
            return None
        state["i"] = i + 1
        return {"id": i, "v": i % 1009, "name": f"row {i}"}

    app.sink("rows", PostgresSink(os.environ["ACCEPT_DSN"], TABLE, offsets_table=TABLE + "_offsets"),
             batch=int(os.environ.get("ACCEPT_SINK_BATCH", "500")), name="pg")

elif WHICH == "http":
    from pipes.io.http import HTTPIngest

    app = pipes.App("acceptingest", commit_every=int(os.environ.get("ACCEPT_COMMIT_EVERY", "10000")),
                    commit_interval=float(os.environ.get("ACCEPT_COMMIT_INTERVAL", "0.02")))
    app.source(HTTPIngest("127.0.0.1", int(os.environ["ACCEPT_PORT"]), "/ingest"), to="events", name="ingest")

elif WHICH == "load":
    import argparse
    import asyncio
    import time

    import aiohttp
    import orjson

    def body_of(i: int) -> tuple[bytes, bool]:
        """Event i's body, and whether it is malformed (every 100th, at 37 mod 100)."""
        if i % 100 == 37:
            return b'{"id": %d, "broken": [1, 2' % i, True  # truncated JSON
        return orjson.dumps({"id": i, "k": f"k{i % 64}", "pad": "x" * (i % 50)}), False

    async def load(url: str, seconds: float, max_requests: int, concurrency: int) -> dict:
        ok: list[int] = []  # ids answered 200 {"accepted": 1}
        bad: dict[int, list] = {}  # malformed id -> [status, reason]
        other: list[list] = []  # [id, status or exception, text] of anything else
        counter = iter(range(max_requests))
        headers = {"Content-Type": "application/json"}
        start = time.monotonic()
        deadline = start + seconds

        async def client(session: aiohttp.ClientSession) -> None:
            for i in counter:
                if time.monotonic() >= deadline:
                    return
                body, malformed = body_of(i)
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        text = await resp.text()
                        status = resp.status
                except Exception as e:  # noqa: BLE001 - recorded, judged by the test
                    other.append([i, f"{type(e).__name__}: {e}", ""])
                    continue
                if malformed:
                    try:
                        reason = orjson.loads(text).get("error")
                    except Exception:  # noqa: BLE001
                        reason = None
                    bad[i] = [status, reason]
                elif status == 200 and orjson.loads(text) == {"accepted": 1}:
                    ok.append(i)
                else:
                    other.append([i, status, text[:200]])

        connector = aiohttp.TCPConnector(limit=concurrency)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.monotonic() - start
        done = len(ok) + len(bad) + len(other)
        return {"ok": ok, "bad": {str(k): v for k, v in bad.items()}, "other": other, "requests": done,
                "seconds": elapsed, "rate": done / elapsed, "concurrency": concurrency}

    if __name__ == "__main__":
        ap = argparse.ArgumentParser()
        ap.add_argument("url")
        ap.add_argument("out")
        ap.add_argument("--seconds", type=float, default=10.0)
        ap.add_argument("--max-requests", type=int, default=100_000)
        ap.add_argument("--concurrency", type=int, default=100)
        a = ap.parse_args()
        try:
            import uvloop
            result = uvloop.run(load(a.url, a.seconds, a.max_requests, a.concurrency))
        except ImportError:
            result = asyncio.run(load(a.url, a.seconds, a.max_requests, a.concurrency))
        with open(a.out, "wb") as f:
            f.write(orjson.dumps(result))
        print(f"{result['requests']} requests in {result['seconds']:.2f} s: {result['rate']:.0f} req/s, "
              f"{len(result['ok'])} x 200, {len(result['bad'])} malformed, {len(result['other'])} other")

else:
    raise SystemExit(f"ACCEPT_APP={WHICH!r}: pg or http")
