"""The worker's web server: /metrics (parsed with prometheus_client) against what was
processed, /ready only after state restore, /health, /topology, /tables, and the live
page rendered by headless Chromium with every node of the quickstart topology."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import pipes
import pipes.runtime
from pipes.brokers.local import LocalBroker
from tansu import free_port

ROOT = Path(__file__).resolve().parent.parent


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def aget(port: int, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(get, port, path)


def shop() -> pipes.App:
    app = pipes.App("webshop")
    app.source([{"id": i, "customer": f"c{i % 7}", "amount": i} for i in range(1000)], to="orders", name="orders_in")

    @app.transform("orders", to="checked")
    def check(order):
        if order["id"] % 100 == 13:
            raise ValueError("suspicious order")
        return order

    @app.transform("checked", to="totals", key="customer")
    def total(order, state):
        state["sum"] = state.get("sum", 0) + order["amount"]
        return {"customer": order["customer"], "sum": state["sum"]}

    app.sink("totals", print, name="show", batch=100)
    return app


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def test_metrics_parse_and_count_what_was_processed(tmp_path, capsys):
    port = free_port()
    settings = pipes.Settings(broker=f"local://{tmp_path / 'data'}", partitions=3, web=f"127.0.0.1:{port}")

    async def main():
        stop = asyncio.Event()
        task = asyncio.create_task(pipes.runtime.run(shop().build(settings), settings, stop=stop))
        deadline = time.monotonic() + 60
        while True:
            assert not task.done(), task.exception()
            assert time.monotonic() < deadline
            try:
                status, stats = await aget(port, "/stats")
            except OSError:  # not listening yet
                status = None
            if status == 200 and json.loads(stats)["nodes"]["show"]["in"] == 990 and \
                    json.loads(stats)["topologies"]["main"]["last_checkpoint"]:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.2)  # a checkpoint covering everything (commit_interval 1 s)
        status, text = await aget(port, "/metrics")
        stop.set()
        await task
        return status, text

    status, text = asyncio.run(main())
    assert status == 200
    m = samples(text)

    def node(name: str, n: str) -> float:
        return m[(name, frozenset({"topology": "main", "node": n}.items()))]

    # Recomputed: 1000 orders, ids ending in 13 (10 of them) raise and go to the DLQ.
    assert node("pipes_messages_out_total", "orders_in") == 1000
    assert node("pipes_messages_in_total", "check") == 1000
    assert node("pipes_messages_out_total", "check") == 990
    assert node("pipes_errors_total", "check") == 10 and node("pipes_dlq_messages_total", "check") == 10
    for n in ("total.rekey", "total", "show"):
        assert node("pipes_messages_in_total", n) == 990
    assert node("pipes_errors_total", "show") == 0
    batches = node("pipes_batch_seconds_count", "check")
    assert batches >= 1 and node("pipes_batch_seconds_sum", "check") > 0
    assert m[("pipes_batch_seconds_bucket", frozenset({"topology": "main", "node": "check", "le": "+Inf"}.items()))] == batches
    assert m[("pipes_checkpoint_seconds_count", frozenset({"topology": "main"}.items()))] >= 1
    lags = {dict(k[1])["topic"] + f"[{dict(k[1])['partition']}]": v for k, v in m.items() if k[0] == "pipes_consumer_lag"}
    assert set(lags) == {f"{t}[{p}]" for t in ("orders", "checked", "webshop.total.rekey", "totals") for p in range(3)}
    assert set(lags.values()) == {0}
    assert node("pipes_state_keys", "total") == 7  # customers c0..c6
    assert m[("pipes_ready", frozenset({"topology": "main"}.items()))] == 1
    assert m[("pipes_restarts_total", frozenset({"topology": "main"}.items()))] == 0
    assert abs(m[("pipes_last_checkpoint_timestamp_seconds", frozenset({"topology": "main"}.items()))] - time.time()) < 30


class SlowRestore(LocalBroker):
    """A broker whose state restore takes until the test says so (as a long changelog would)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.release = asyncio.Event()
        self.restoring = asyncio.Event()

    async def restore(self, topology, tps):
        self.restoring.set()
        await self.release.wait()


def test_ready_only_after_restore_and_the_other_routes(tmp_path):
    port = free_port()
    settings = pipes.Settings(broker=f"local://{tmp_path / 'data'}", web=f"127.0.0.1:{port}")
    graph = shop().build(settings)

    async def main():
        broker = SlowRestore(str(tmp_path / "data"), settings)
        stop = asyncio.Event()
        task = asyncio.create_task(pipes.runtime.run(graph, settings, stop=stop, broker=broker))
        try:
            await asyncio.wait_for(broker.restoring.wait(), 10)
            assert await aget(port, "/health") == (200, "ok\n")
            for _ in range(3):
                assert await aget(port, "/ready") == (503, "not ready: main\n")
                await asyncio.sleep(0.05)
            broker.release.set()
            deadline = time.monotonic() + 10
            while (await aget(port, "/ready"))[0] != 200:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            while json.loads((await aget(port, "/stats"))[1])["nodes"]["show"]["in"] < 990:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.2)  # checkpointed
            return {path: await aget(port, path) for path in
                    ("/topology", "/tables/total/c3", "/tables/total/c9", "/tables/check/c3", "/tables/nope/x",
                     "/nope", "/")}
        finally:
            stop.set()
            await task
            await broker.close()

    got = asyncio.run(main())
    status, topology = got["/topology"]
    assert status == 200
    topology = json.loads(topology)
    assert [n["id"] for n in topology["nodes"]] == ["orders_in", "check", "total.rekey", "total", "show"]
    assert topology["topics"]["webshop.total.rekey"]["internal"] is True
    expected = sum(i for i in range(1000) if i % 7 == 3 and i % 100 != 13)
    assert got["/tables/total/c3"] == (200, json.dumps({"sum": expected}, separators=(",", ":")))
    assert got["/tables/total/c9"][0] == 404 and "no state for key 'c9'" in got["/tables/total/c9"][1]
    assert got["/tables/check/c3"][0] == 404 and "no keyed state" in got["/tables/check/c3"][1]
    assert got["/tables/nope/x"][0] == 404 and got["/nope"][0] == 404
    assert got["/"][0] == 200 and "<svg" in got["/"][1]


def test_the_web_address_is_checked(tmp_path):
    from pipes.web import parse_address

    assert parse_address("6066") == ("127.0.0.1", 6066)
    assert parse_address(":6066") == ("127.0.0.1", 6066)
    assert parse_address("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_address("[::1]:80") == ("::1", 80)
    with pytest.raises(pipes.ConfigError, match="HOST:PORT"):
        pipes.Settings(web="localhost").check()


# -- the live page in headless Chromium --------------------------------------------------
def png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """Width, height and rows of pixels of an 8-bit RGB(A) PNG (what Chromium writes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, (w, h, bpp) = 8, b"", (0, 0, 0)
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            w, h, depth, color = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and color in (2, 6)
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = w * bpp
    rows, prev = [], bytearray(stride)
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return w, h, rows


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="headless Chromium is not installed (make tools installs it as root)")
def test_live_page_shows_every_quickstart_node_with_numbers(tmp_path):
    port = free_port()
    env = {**os.environ, "PIPES_QUICKSTART_OUT": str(tmp_path / "out")}
    worker = subprocess.Popen([sys.executable, "-m", "pipes", "worker", "-A", str(ROOT / "apps" / "quickstart.py"),
                               "--broker", f"local://{tmp_path / 'data'}", "--web", f"127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    orders = len((ROOT / "apps" / "data" / "orders.jsonl").read_bytes().splitlines())
    try:
        deadline = time.monotonic() + 60
        while True:  # the whole file read and every order through the first transform
            assert worker.poll() is None, worker.communicate()
            assert time.monotonic() < deadline
            try:
                stats = json.loads(get(port, "/stats")[1])
                if stats["nodes"]["only_paid"]["in"] == orders and stats["nodes"]["summarize"]["lag"] == 0:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/"
        base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--virtual-time-budget=5000", f"--user-data-dir={tmp_path / 'chromium'}"]
        dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=90).stdout
        shot = tmp_path / "artifacts" / "live-page.png"
        shot.parent.mkdir()
        subprocess.run([*base, "--window-size=1600,700", f"--screenshot={shot}", url], capture_output=True,
                       timeout=90, cwd=tmp_path)
    finally:
        worker.terminate()
        worker.communicate(timeout=30)

    nodes = ["read_orders", "only_paid", "split_items", "total_by_sku.rekey", "total_by_sku", "write_totals",
             "summarize"]
    for n in nodes:
        assert f'data-id="{n}"' in dom, n  # its box in the SVG
        assert f'<tr id="row-{n}">' in dom, n  # and its row of numbers
    # Numbers the page rendered, from /stats: the source produced every order; only_paid took them all.
    assert f'<tr id="row-read_orders"><td>read_orders</td><td>source</td><td>0</td><td>0.0</td><td>{orders}</td>' in dom
    assert f'<tr id="row-only_paid"><td>only_paid</td><td>transform</td><td>{orders}</td>' in dom
    assert f"out {orders / 1000:.1f}k" in dom  # inside the read_orders box
    assert "main: ready" in dom

    w, h, rows = png_pixels(shot)
    assert (w, h) == (1600, 700)
    colors = {row[i:i + 3] for row in rows[::4] for i in range(0, len(row), 12)}
    assert len(colors) > 20, "the screenshot is (nearly) blank"
    blue = b"\xe8\xf0\xff"  # the fill of a transform's box
    assert sum(row.count(blue) for row in rows) > 1000
