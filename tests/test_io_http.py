"""pipes.io.http against real aiohttp servers on 127.0.0.1 (free ports), in the test's own
event loop: the SSE source across dropped connections and a worker restart, the ingest
endpoint answering only once a checkpoint is durable, and the HTTP sink retrying.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import orjson
import pytest
from aiohttp import web

import pipes
from pipes.brokers.local import LocalBroker
from pipes.io.http import HTTP, SSE, HTTPIngest
from pipes.testing import run_app_async
from helpers import read_topic


# -- helpers ----------------------------------------------------------------------------------
async def serve(handler, path: str = "/", method: str = "GET") -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route(method, path, handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}{path}"


async def wait_for(cond, task=None, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        if task is not None and task.done():
            task.result()
            raise AssertionError("the run ended early")
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


# -- SSE --------------------------------------------------------------------------------------
def data_of(i: int) -> str:
    """Event i's data: JSON mostly, plain text every 7th, two lines every 11th."""
    if i % 11 == 0:
        return f"line one {i}\ndata: line two {i}"
    if i % 7 == 0:
        return f"text {i}"
    return orjson.dumps({"i": i}).decode()


def value_of(i: int):
    if i % 11 == 0:
        return f"line one {i}\nline two {i}"
    if i % 7 == 0:
        return f"text {i}"
    return {"i": i}


class SSEServer:
    """Events 1..n with ids "1".."n", resuming after Last-Event-ID; drops every connection
    after `per_conn` events (alternately a clean close and an abort in the middle of an
    event); 503 for the first `fail_first` requests; 204 once everything was sent. With
    `pause_at`, holds the stream before that event until `gate` is set."""

    def __init__(self, n: int, per_conn: int = 40, fail_first: int = 0, pause_at: int | None = None):
        self.n, self.per_conn, self.fail_first, self.pause_at = n, per_conn, fail_first, pause_at
        self.last_event_ids: list[str | None] = []  # per request
        self.sent = 0
        self.paused = asyncio.Event()
        self.gate = asyncio.Event()

    async def handler(self, request: web.Request) -> web.StreamResponse:
        self.last_event_ids.append(request.headers.get("Last-Event-ID"))
        if len(self.last_event_ids) <= self.fail_first:
            return web.Response(status=503, text="warming up")
        last = request.headers.get("Last-Event-ID")
        start = int(last) + 1 if last else 1
        if start > self.n:
            return web.Response(status=204)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b": hello\nretry: 5\n\n")
        conn = len(self.last_event_ids)
        for i in range(start, self.n + 1):
            if i == self.pause_at and not self.gate.is_set():
                self.paused.set()
                await asyncio.wait_for(self.gate.wait(), 10)
                return resp  # (the client is gone by then)
            etype = "tick" if i % 5 else "tock"
            await resp.write(f"event: {etype}\nid: {i}\ndata: {data_of(i)}\n\n".encode())
            self.sent = max(self.sent, i)
            if i % 10 == 0:
                await asyncio.sleep(0.002)
            if i - start + 1 == self.per_conn and i < self.n:
                if conn % 2:
                    await resp.write(f"id: {i + 1}\ndata: half an ev".encode())  # never completed
                    request.transport.abort()
                return resp
        return resp


def sse_app(url: str, **options) -> pipes.App:
    app = pipes.App("sse")
    app.source(SSE(url, reconnect=(0.01, 0.05), **options), to="events", name="sse")
    return app


def test_sse_nothing_lost_or_duplicated_across_drops_and_a_restart(tmp_path, caplog):
    n, data = 300, tmp_path / "data"
    settings = pipes.Settings(broker=f"local://{data}", commit_interval=0.05)
    server = SSEServer(n, per_conn=40, pause_at=170)

    async def main() -> None:
        runner, url = await serve(server.handler, "/events")
        try:
            # First life: stopped while the stream is held at event 170.
            stop = asyncio.Event()
            task = asyncio.create_task(pipes.runtime.run(sse_app(url).build(settings), settings, stop=stop))
            await wait_for(server.paused.is_set, task)
            await asyncio.sleep(0.15)  # a checkpoint or two while waiting
            stop.set()
            await asyncio.wait_for(task, 10)
            first_requests = len(server.last_event_ids)
            server.gate.set()
            # Second life: resumes, reads to the end (204), and finishes.
            await asyncio.wait_for(pipes.runtime.run(sse_app(url).build(settings), settings, until_done=True), 15)
            assert server.last_event_ids[first_requests] == "169"  # resumed after the checkpoint
        finally:
            server.gate.set()
            await runner.cleanup()

    with caplog.at_level(logging.INFO, logger="pipes"):
        asyncio.run(main())

    got = read_topic(data, "events")
    assert [m.headers["id"] for m in got] == [str(i).encode() for i in range(1, n + 1)]
    assert [m.value for m in got] == [value_of(i) for i in range(1, n + 1)]
    assert [m.headers["event"] for m in got] == [b"tock" if i % 5 == 0 else b"tick" for i in range(1, n + 1)]
    # Every reconnection after a drop asked to resume after the last event received.
    ids = server.last_event_ids
    assert ids[0] is None and ids[-1] == str(n)
    assert all(i is not None for i in ids[1:])
    assert sorted(int(i) for i in ids[1:]) == [int(i) for i in ids[1:]]  # never went back
    assert ids[1:5] == ["40", "80", "120", "160"]  # after the dropped half event, too
    lost = [r for r in caplog.records if "connection lost" in r.getMessage()]
    assert 6 <= len(lost) <= 9, [r.getMessage() for r in lost]  # one line per drop


def test_sse_backs_off_while_the_server_fails_logs_the_outage_once_and_filters_events(caplog):
    server = SSEServer(30, per_conn=100, fail_first=4)

    async def main():
        runner, url = await serve(server.handler, "/events")
        try:
            t0 = time.monotonic()
            result = await asyncio.wait_for(run_app_async(sse_app(url, event="tock")), 15)
            return result, time.monotonic() - t0
        finally:
            await runner.cleanup()

    with caplog.at_level(logging.INFO, logger="pipes"):
        result, took = asyncio.run(main())

    assert result["events"] == [value_of(i) for i in range(5, 31, 5)]  # only "tock" events
    assert server.last_event_ids == [None] * 5 + ["30"]  # 4 failures, the stream, 204
    cannot = [r for r in caplog.records if "cannot connect" in r.getMessage()]
    assert len(cannot) == 1 and "HTTP 503" in cannot[0].getMessage()
    assert any("reconnected after" in r.getMessage() and "4 failed" in r.getMessage() for r in caplog.records)
    assert took >= 0.01 + 0.02 + 0.04  # backed off: 10, 20, 40(, 50) ms, with jitter down to 90 %


def test_sse_a_4xx_answer_fails_the_source():
    async def handler(request):
        return web.Response(status=401, text="no token")

    async def main():
        runner, url = await serve(handler, "/events")
        try:
            with pytest.raises(pipes.errors.ProcessingError, match="HTTP 401.*no token"):
                await asyncio.wait_for(run_app_async(sse_app(url)), 10)
        finally:
            await runner.cleanup()

    asyncio.run(main())


# -- HTTPIngest -------------------------------------------------------------------------------
def test_ingest_answers_200_only_after_the_checkpoint_is_durable(tmp_path):
    data = tmp_path / "data"
    settings = pipes.Settings(broker=f"local://{data}", commit_interval=0.1)
    source = HTTPIngest(port=0, path="/in")
    app = pipes.App("ingest")
    app.source(source, to="ingested", name="http")
    events: list = []  # ("durable", n values committed so far) and ("answered", n values sent so far)
    bodies = [
        ("application/json", orjson.dumps({"a": 1})),
        ("application/json", orjson.dumps([{"b": 2}, {"b": 3}, "four", 5])),
        ("application/x-ndjson", b'{"c": 6}\n\n[7, 8]\r\n"nine"\n'),
        ("application/json; charset=utf-8", orjson.dumps([{"i": i} for i in range(200)])),
        ("application/json", b"[]"),
    ]
    expected = [{"a": 1}, {"b": 2}, {"b": 3}, "four", 5, {"c": 6}, [7, 8], "nine"] + [{"i": i} for i in range(200)]

    async def main():
        broker = LocalBroker(str(data), settings)
        real_commit = broker.commit
        committed = 0

        async def commit(group, changes):
            nonlocal committed
            await asyncio.sleep(0.05)  # a slow disk: an early answer would show
            await real_commit(group, changes)
            committed += len(changes.outputs.get("ingested", []))
            events.append(("durable", committed))

        broker.commit = commit
        stop = asyncio.Event()
        task = asyncio.create_task(pipes.runtime.run(app.build(settings), settings, broker=broker, stop=stop))
        try:
            await wait_for(lambda: source._runner is not None, task)
            url = f"http://127.0.0.1:{source.port}/in"
            sent = 0
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
                for ctype, body in bodies:
                    async with http.post(url, data=body, headers={"Content-Type": ctype}) as resp:
                        assert resp.status == 200, await resp.text()
                        answer = await resp.json()
                    sent += answer["accepted"]
                    events.append(("answered", sent))
                # Concurrent requests: each is answered after the checkpoint holding it.
                answers = await asyncio.gather(*[http.post(url, json={"k": k}) for k in range(20)])
                assert [r.status for r in answers] == [200] * 20
                for r in answers:
                    r.release()
            stop.set()
            await asyncio.wait_for(task, 10)
        finally:
            stop.set()
            await broker.close()

    asyncio.run(main())

    assert [a for kind, a in events if kind == "answered"] == [1, 5, 8, 208, 208]
    for i, (kind, n) in enumerate(events):
        if kind == "answered":
            durable = max([d for k, d in events[:i] if k == "durable"], default=0)
            assert durable >= n, f"answered with {n} values sent but only {durable} durable: {events}"
    got = [m.value for m in read_topic(data, "ingested")]
    assert got[:208] == expected
    assert sorted(v["k"] for v in got[208:]) == list(range(20))


def test_ingest_rejects_bad_bodies_with_a_reason():
    source = HTTPIngest(port=0, max_body=1000)
    app = pipes.App("ingestbad")
    app.source(source, to="ingested", name="http")

    async def main():
        stop = asyncio.Event()
        task = asyncio.create_task(pipes.runtime.run(app.build(pipes.Settings(broker="memory://")),
                                                     pipes.Settings(broker="memory://"), stop=stop))
        try:
            await wait_for(lambda: source._runner is not None, task)
            url = f"http://127.0.0.1:{source.port}/ingest"
            out = []
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
                for ctype, body in [("application/json", b'{"a": 1'), ("application/x-ndjson", b'{"a": 1}\n{nope}\n'),
                                    ("text/plain", b'{"a": 1}'), ("application/x-www-form-urlencoded", b"a=1"),
                                    ("application/json", b"[" + b"1," * 600 + b"1]")]:
                    async with http.post(url, data=body, headers={"Content-Type": ctype}) as resp:
                        out.append((resp.status, (await resp.json())["error"]))
                async with http.get(url) as resp:
                    out.append((resp.status, None))
            return out
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)

    out = asyncio.run(main())
    assert [s for s, _ in out] == [400, 400, 415, 415, 413, 405]
    assert out[0][1].startswith("invalid JSON")
    assert "line 2" in out[1][1]
    assert "text/plain" in out[2][1] and "application/json" in out[2][1]
    assert source._seq == 0  # nothing was given out


def test_ingest_answers_503_while_stopping_and_for_values_not_made_durable():
    """The contract step by step: values given out but not covered by a durable checkpoint,
    and values never given out, are answered 503 at close(); a stopping source refuses."""
    source = HTTPIngest(port=0)

    async def main():
        source.restore({"seq": 10})
        await source.open()
        url = f"http://127.0.0.1:{source.port}/ingest"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            first = asyncio.create_task(http.post(url, json=[1, 2]))
            second = asyncio.create_task(http.post(url, json=[3, 4]))
            assert [await source.read() for _ in range(3)] == [1, 2, 3]
            at = source.checkpoint()
            assert at == {"seq": 13}
            source.committed({"seq": 12})  # the checkpoint holding 1 and 2 is durable
            r1 = await asyncio.wait_for(first, 5)
            assert r1.status == 200 and await r1.json() == {"accepted": 2}
            assert not second.done()
            reader = asyncio.create_task(source.read())  # 4 is there: given out
            assert await reader == 4
            source.committed({"seq": 13})  # covers 3, not 4: no answer yet
            await asyncio.sleep(0.02)
            assert not second.done()
            reader = asyncio.create_task(source.read())
            await asyncio.sleep(0.01)
            reader.cancel()  # the runner stops the source
            with pytest.raises(asyncio.CancelledError):
                await reader
            async with http.post(url, json=[5]) as r:
                assert r.status == 503 and r.headers["Retry-After"] == "1"
                assert "stopping" in (await r.json())["error"]
            await source.close()  # the checkpoint covering 3 and 4 never became durable
            r2 = await asyncio.wait_for(second, 5)
            assert r2.status == 503 and "send them again" in (await r2.json())["error"]
            r1.release()
            r2.release()

    asyncio.run(main())


# -- the HTTP sink ----------------------------------------------------------------------------
class Receiver:
    """Answers 503 to the first `fail` requests (and drops the connection of every third of
    those), 200 afterwards, keeping what it received."""

    def __init__(self, fail: int = 0, status: int = 503):
        self.fail, self.status = fail, status
        self.requests = 0
        self.received: list = []  # (content type, values)

    async def handler(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = await request.read()
        if self.requests <= self.fail:
            if self.requests % 3 == 0:
                request.transport.abort()
                return web.Response(status=500)
            return web.Response(status=self.status, text="busy")
        if request.content_type == "application/x-ndjson":
            values = [orjson.loads(line) for line in body.splitlines()]
        else:
            values = orjson.loads(body)
        self.received.append((request.content_type, values))
        return web.Response(status=200)


@pytest.mark.parametrize("batch_format", ["json", "ndjson"])
def test_sink_posts_every_batch_retrying_failures(batch_format):
    receiver = Receiver(fail=4)
    values = [{"i": i, "t": "x" * (i % 3)} for i in range(1200)]

    async def main():
        runner, url = await serve(receiver.handler, "/hook", "POST")
        try:
            app = pipes.App("httpsink")
            sink = HTTP(url, batch_format=batch_format, retries=5, backoff=(0.01, 0.05))
            app.sink("values", sink, batch=500)
            await asyncio.wait_for(run_app_async(app, {"values": values}), 15)
            return sink
        finally:
            await runner.cleanup()

    sink = asyncio.run(main())
    ctype = "application/json" if batch_format == "json" else "application/x-ndjson"
    assert [c for c, _ in receiver.received] == [ctype] * len(receiver.received)
    assert [v for _, batch in receiver.received for v in batch] == values  # all, once, in order
    assert max(len(b) for _, b in receiver.received) == 500
    assert sink.sent == 1200 and receiver.requests == 4 + len(receiver.received)


def test_sink_gives_up_after_its_retries_and_the_batch_goes_to_the_dead_letter_topic():
    receiver = Receiver(fail=100)
    bad_request = Receiver(fail=100, status=400)

    async def main():
        runner, url = await serve(receiver.handler, "/hook", "POST")
        runner2, url2 = await serve(bad_request.handler, "/hook", "POST")
        try:
            app = pipes.App("httpsinkfail")
            app.sink("values", HTTP(url, retries=2, backoff=(0.01, 0.02)), batch=2, name="retried")
            app.sink("values", HTTP(url2, retries=2, backoff=(0.01, 0.02)), batch=2, name="rejected")
            return await asyncio.wait_for(run_app_async(app, {"values": [1, 2, 3]}), 15)
        finally:
            await runner.cleanup()
            await runner2.cleanup()

    result = asyncio.run(main())
    assert receiver.requests == 2 * 3  # each of two batches: one try and two retries
    assert bad_request.requests == 2  # a 400 is not retried
    assert sorted(result["values.dlq"]) == [1, 1, 2, 2, 3, 3]
