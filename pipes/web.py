"""The worker's web server (``pipes worker --web HOST:PORT``), on the worker's own loop.

A small HTTP/1.1 server on :func:`asyncio.start_server`, one request per connection:

* ``/health``  200 while the worker's loop runs (liveness);
* ``/ready``   200 once every topology is started, assigned its partitions and has
  restored their state, else 503 (readiness);
* ``/metrics`` Prometheus text format (:mod:`pipes.metrics`);
* ``/topology`` the app's graph as JSON; ``/stats`` per-node counters and lag as JSON;
* ``/tables/NODE/KEY`` the keyed state of stateful node NODE for KEY (as of the last
  checkpoint), 404 if there is none;
* ``/`` a live page drawing the topology with per-node rates and lag.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from importlib import resources
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson

from .errors import ConfigError
from .metrics import node_stats, prometheus
from .partitioner import key_hash
from .store import state_prefix
from .topology import Graph

log = logging.getLogger("pipes")
_MAX_HEAD = 16 * 1024


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT``, ``:PORT`` or ``PORT`` (on 127.0.0.1) -> (host, port)."""
    host, sep, port = str(text).rpartition(":")
    host = host.strip("[]") if sep else ""
    try:
        number = int(port)
        if not 0 <= number <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigError(f"web={text!r}: use HOST:PORT, :PORT or PORT (e.g. 127.0.0.1:6066, 0.0.0.0:6066)") from None
    return host or "127.0.0.1", number


def graph_json(graph: Graph) -> dict[str, Any]:
    return {
        "app": graph.app,
        "topologies": {name: {"group": t.group, "nodes": [n.id for n in t.nodes]} for name, t in graph.topologies.items()},
        "nodes": [{"id": n.id, "kind": n.kind, "topology": n.topology, "inputs": list(n.inputs),
                   "outputs": list(n.outputs), "stateful": n.stateful, "on_error": n.on_error,
                   "internal": n.internal, "where": n.where} for n in graph.nodes()],
        "topics": {t.name: {"partitions": t.partitions, "value_serializer": t.value_serializer.name,
                            "key_serializer": t.key_serializer.name, "internal": t.internal}
                   for t in graph.topics.values()},
    }


class WebApp:
    """Answers the routes above from the running topologies (:class:`pipes.runtime.Supervisor`)."""

    def __init__(self, graph: Graph, broker: Any, workers: list[Any]):
        self.graph = graph
        self.broker = broker
        self.workers = workers
        self.started = time.time()

    def respond(self, path: str) -> tuple[int, str, bytes]:
        if path == "/health":
            return 200, "text/plain", b"ok\n"
        if path == "/ready":
            waiting = [w.topology.name for w in self.workers if not w.ready]
            if waiting:
                return 503, "text/plain", f"not ready: {', '.join(waiting)}\n".encode()
            return 200, "text/plain", b"ready\n"
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", prometheus(self.workers, self.broker.store).encode()
        if path == "/topology":
            return 200, "application/json", orjson.dumps(graph_json(self.graph))
        if path == "/stats":
            body = {"time": time.time(), "started": self.started, "nodes": node_stats(self.workers),
                    "topologies": {w.topology.name: {"ready": w.ready, "restarts": w.metrics.restarts,
                                                     "last_checkpoint": w.metrics.last_checkpoint}
                                   for w in self.workers}}
            return 200, "application/json", orjson.dumps(body)
        if path.startswith("/tables/"):
            return self.table(path)
        if path in ("/", "/index.html"):
            return 200, "text/html; charset=utf-8", resources.files("pipes").joinpath("page.html").read_bytes()
        return 404, "text/plain", b"not found\n"

    def table(self, path: str) -> tuple[int, str, bytes]:
        from .emit import serializers_of

        node_id, _, key = path[len("/tables/"):].partition("/")
        node_id, key = unquote(node_id), unquote(key)
        try:
            node = self.graph.node(node_id)
        except KeyError:
            return 404, "application/json", orjson.dumps({"error": f"no node {node_id!r}"})
        if not node.stateful:
            return 404, "application/json", orjson.dumps({"error": f"node {node_id!r} has no keyed state"})
        topic = node.inputs[0]
        kbytes = serializers_of(self.graph, topic)[1].dumps(key)
        partition = key_hash(kbytes) % self.broker.partitions(topic)
        raw = self.broker.store.get("state", state_prefix(node_id, partition) + kbytes)
        if raw is None:
            return 404, "application/json", orjson.dumps({"error": f"no state for key {key!r} in node {node_id!r}"})
        return 200, "application/json", orjson.dumps(pickle.loads(raw), default=repr,
                                                     option=orjson.OPT_NON_STR_KEYS)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, target, _ = head[:head.index(b"\r\n")].decode("latin-1").split(" ", 2)
            if method not in ("GET", "HEAD"):
                status, ctype, body = 405, "text/plain", b"only GET\n"
            else:
                try:
                    status, ctype, body = self.respond(urlsplit(target).path)
                except Exception as e:  # a bug here must not take the worker down
                    log.exception("web: %s failed", target)
                    status, ctype, body = 500, "text/plain", f"{type(e).__name__}: {e}\n".encode()
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error",
                      503: "Service Unavailable"}[status]
            writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         f"Cache-Control: no-store\r\nConnection: close\r\n\r\n".encode())
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError,
                ConnectionError):
            pass
        finally:
            writer.close()


async def serve(address: str, graph: Graph, broker: Any, workers: list[Any]) -> asyncio.Server:
    host, port = parse_address(address)
    app = WebApp(graph, broker, workers)
    try:
        server = await asyncio.start_server(app.handle, host, port, limit=_MAX_HEAD)
    except OSError as e:
        raise ConfigError(f"web server: cannot listen on {host}:{port}: {e.strerror or e}") from None
    bound = server.sockets[0].getsockname()
    log.info("web server on http://%s:%d/ (/health /ready /metrics /topology /tables/NODE/KEY)",
             bound[0] if ":" not in bound[0] else f"[{bound[0]}]", bound[1])
    return server
