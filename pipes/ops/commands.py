"""``pipes dlq replay``, ``pipes topics`` and ``pipes deploy``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections import Counter
from typing import Any

from ..brokers import Changes
from ..errors import ConfigError

# Headers pipes.failures adds to a dead letter; replay removes them.
ERROR_HEADERS = ("pipes.topic", "pipes.partition", "pipes.offset")
REPLAY_CHUNK = 5_000


def register(sub: Any, app_cmd: Any) -> dict[str, Any]:
    from ..cli import _env

    d = sub.add_parser("dlq", help="Dead-letter topics: replay their messages after a fix.",
                       description="Dead-letter topics: replay their messages after a fix.")
    dsub = d.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    r = dsub.add_parser("replay", help="re-send a dead-letter topic's messages to the topics they came from",
                        description="Re-send each message of TOPIC.dlq, without its error headers, to the topic "
                                    "and partition it came from (its pipes.topic and pipes.partition headers). "
                                    "Progress is recorded: a second replay sends only dead letters added since.")
    r.add_argument("topic", help="the dead-letter topic, e.g. orders.dlq")
    # The options app_cmd() gives the other commands (it makes top-level commands only).
    r.add_argument("-A", "--app", default=_env("APP"), help="module, module:attribute or path/to/file.py [PIPES_APP]")
    r.add_argument("--broker", default=_env("BROKER"), help="local://[DIR] (default), kafka://h:p [PIPES_BROKER]")
    r.add_argument("--data-dir", default=_env("DATA_DIR"), help="where local data lives [PIPES_DATA_DIR]")
    r.add_argument("--dry-run", action="store_true", help="count what would be sent; send nothing, record nothing")

    t = app_cmd("topics", "List topics: partitions, end offsets, and each consumer group's offsets and lag.",
                app_required=False)
    t.add_argument("--json", action="store_true", help="print JSON instead of a table")

    dp = app_cmd("deploy", "Write deployment manifests: one Kubernetes Deployment or compose service per topology.")
    dp.add_argument("--topology", action="append", default=None, help="only this topology (repeatable)")
    dp.add_argument("--format", choices=("k8s", "compose"), default="k8s")
    dp.add_argument("--out", default=None, metavar="DIR", help="write files into DIR (default: print to stdout)")
    dp.add_argument("--image", default="pipes-app:latest", help="container image holding the app and pipes")
    dp.add_argument("--port", type=int, default=6066, help="port of the worker's web server (probes, metrics)")
    dp.add_argument("--replicas", type=int, default=None,
                    help="workers per topology (default and maximum: the partition count of its inputs)")
    return {"dlq": cmd_dlq, "topics": cmd_topics, "deploy": cmd_deploy}


# -- dlq replay ---------------------------------------------------------------------------
def cmd_dlq(args: argparse.Namespace) -> int:
    from ..cli import _broker_for, _run_async

    if not args.topic.endswith(".dlq"):
        raise ConfigError(f"{args.topic!r} is not a dead-letter topic: they are named <topic>.dlq")
    name, _, graph, broker = _broker_for(args, read_only=args.dry_run)
    counts = _run_async(_replay(broker, graph, name, args.topic, dry_run=args.dry_run))
    what = ", ".join(f"{n} to {t}" for t, n in sorted(counts.items()) if t) or "nothing"
    missing = counts.get(None, 0)
    verb = "would re-send" if args.dry_run else "re-sent"
    print(f"{args.topic}: {verb} {what}" + (f"; {missing} without a pipes.topic header left alone" if missing else ""),
          file=sys.stderr)
    return 0


def replay_group(app_name: str) -> str:
    """The consumer group whose offsets record how far a DLQ has been replayed."""
    return f"{app_name}.dlq-replay"


async def _replay(broker: Any, graph: Any, app_name: str, topic: str, *, dry_run: bool) -> Counter:
    sent: Counter = Counter()
    try:
        await broker.open(graph, [])
        if await broker.describe(topic) is None:
            raise ConfigError(f"no topic {topic!r}: nothing has been sent to it")
        group = replay_group(app_name)
        done = broker.store.offsets(group)
        consumer = broker.consumer(None, [topic])
        await consumer.start()
        for p in range(broker.partitions(topic)):
            if done.get((topic, p)):
                consumer.seek((topic, p), done[(topic, p)])
        ends_of = getattr(broker, "end_offsets", None)
        total = sum(e - done.get((topic, p), 0) for p, e in ends_of(topic).items()) if ends_of else None
        partitions: dict[str, int] = {}  # of the destinations, as they exist on the broker
        tty = sys.stderr.isatty()
        idle = 0
        while idle < 2 or not consumer.caught_up():
            polled = await consumer.poll(REPLAY_CHUNK, 0.2)
            idle = 0 if polled else idle + 1
            if not polled:
                continue
            changes = Changes()
            for _, p, recs in polled:
                for off, key, value, headers, ts in recs:
                    found = dict(headers or ())
                    dest = found.get("pipes.topic")
                    if dest is None:
                        sent[None] += 1
                        continue
                    dest = dest.decode()
                    if dest not in partitions:
                        partitions[dest] = await broker.describe(dest) or broker.partitions(dest)
                    kept = tuple((k, v) for k, v in headers if not k.startswith("pipes.error.") and k not in ERROR_HEADERS)
                    part = int(found.get("pipes.partition", b"0"))
                    if part >= partitions[dest]:  # the topic has fewer partitions now
                        part = 0
                    changes.records.setdefault((dest, part), []).append((key, value, kept or None, ts))
                    sent[dest] += 1
                changes.offsets[(topic, p)] = recs[-1][0] + 1
            if not dry_run:
                await broker.commit(group, changes)
            if tty:
                n = sum(sent.values())
                sys.stderr.write(f"\r\x1b[Kpipes: {n:,}" + (f" of {total:,}" if total else "") + " dead letters")
                sys.stderr.flush()
        if tty:
            sys.stderr.write("\r\x1b[K")
        await consumer.close()
    finally:
        await broker.close()
    return sent


# -- topics -------------------------------------------------------------------------------
def cmd_topics(args: argparse.Namespace) -> int:
    import orjson

    from ..cli import _broker_for, _run_async

    _, _, graph, broker = _broker_for(args, read_only=True)
    rows = _run_async(_topics(broker, graph))
    if args.json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return 0
    for t in rows:
        print(f"{t['topic']}  ({t['partitions']} partition{'s' if t['partitions'] != 1 else ''})")
        for p, end in enumerate(t["end_offsets"]):
            groups = "  ".join(f"{g}: offset {o['offset']}, lag {o['lag']}" for g, parts in t["groups"].items()
                               for q, o in parts.items() if int(q) == p)
            print(f"  [{p}] end {end}" + (f"  {groups}" if groups else ""))
    if not rows:
        print("no topics")
    return 0


async def _topics(broker: Any, graph: Any) -> list[dict[str, Any]]:
    """Per topic: partitions, end offsets, and per consumer group the committed offset and lag."""
    try:
        await broker.open(None, [])
        if hasattr(broker, "end_offsets"):  # local:// holds the topics and every group's offsets
            ends = {t: broker.end_offsets(t) for t in broker.topics()}
            committed = _local_groups(broker.store)
        else:
            ends, committed = await _kafka_listing(broker)
    finally:
        await broker.close()
    wanted = set(ends)
    if graph is not None:
        mine = set(graph.topics) | {f"{t}.dlq" for t in graph.topics} | {f"{g.group}.sources" for g in graph.topologies.values()}
        wanted &= mine
    rows = []
    for topic in sorted(wanted):
        end = ends[topic]
        groups: dict[str, dict[str, dict[str, int]]] = {}
        for (group, t, p), off in sorted(committed.items()):
            if t == topic and p in end:
                groups.setdefault(group, {})[str(p)] = {"offset": off, "lag": max(0, end[p] - off)}
        rows.append({"topic": topic, "partitions": len(end), "end_offsets": [end[p] for p in sorted(end)],
                     "groups": groups})
    return rows


async def _kafka_listing(broker: Any) -> tuple[dict[str, dict[int, int]], dict[tuple[str, str, int], int]]:
    """End offsets of every topic on the cluster, and every consumer group's committed offsets
    (asked as each group's consumer asks at start: OffsetFetch, which every broker answers)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    from ..brokers.kafka import client_options

    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap, **client_options(broker.options, "admin"))
    await admin.start()
    try:
        groups = sorted(g for g, *_ in await admin.list_consumer_groups())
    finally:
        await admin.close()
    c = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False,
                         **client_options(broker.options, "consumer"))
    await c.start()
    try:
        names = [t for t in await c.topics() if not t.startswith("__")]
        tps = [TopicPartition(t, p) for t in sorted(names) for p in sorted(c.partitions_for_topic(t) or ())]
        found = await c.end_offsets(tps) if tps else {}
        # Some brokers answer ListOffsets inexactly; a fetch reports each partition's high
        # watermark, and the larger of the two is the end.
        c.assign(tps)
        deadline = asyncio.get_running_loop().time() + 5
        while tps and any(c.highwater(tp) is None for tp in tps) and asyncio.get_running_loop().time() < deadline:
            await c.getmany(timeout_ms=200, max_records=len(tps))
        ends: dict[str, dict[int, int]] = {}
        for tp, end in found.items():
            ends.setdefault(tp.topic, {})[tp.partition] = max(end, c.highwater(tp) or 0)
    finally:
        await c.stop()
    committed: dict[tuple[str, str, int], int] = {}
    for group in groups:
        g = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=group, enable_auto_commit=False,
                             **client_options(broker.options, "consumer"))
        await g.start()
        try:
            for tp in tps:
                off = await g.committed(tp)
                if off is not None and off >= 0:
                    committed[(group, tp.topic, tp.partition)] = off
        finally:
            await g.stop()
    return ends, committed


def _local_groups(store: Any) -> dict[tuple[str, str, int], int]:
    out = {}
    for k, v in store.scan("offsets", b""):
        group, topic, part = k.split(b"\0", 2)
        out[(group.decode(), topic.decode(), int.from_bytes(part, "big"))] = int.from_bytes(v, "big")
    return out


# -- deploy -------------------------------------------------------------------------------
def cmd_deploy(args: argparse.Namespace) -> int:
    from ..cli import _app_and_settings
    from ..deploy import manifests

    app, settings = _app_and_settings(args)
    graph = app.build(settings)
    files = manifests(graph, settings, app_ref=args.app, fmt=args.format, topologies=args.topology,
                      image=args.image, port=args.port, replicas=args.replicas)
    if args.out is None:
        sys.stdout.write("---\n".join(files.values()))
        return 0
    os.makedirs(args.out, exist_ok=True)
    for name, text in files.items():
        path = os.path.join(args.out, name)
        with open(path, "w") as f:
            f.write(text)
        print(f"wrote {path}", file=sys.stderr)
    return 0
