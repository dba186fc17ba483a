"""Throughput of pipes on local://, memory:// and kafka://, one worker process.

    make bench                                   # every workload, all brokers (N=500k; 200k on kafka://)
    python -m tests.bench.run --quick            # a smoke run (N=20k)
    python -m tests.bench.run --only keyed --broker local --n 200000
    python -m tests.bench.run --broker kafka     # kafka:// only (Tansu on loopback, see kafka.py)
    python -m tests.bench.run --profile --only stateless [--broker memory|kafka] [--sort cumulative]
    python -m tests.bench.run --set commit_every=50000 --set poll_records=20000

Each run opens a fresh database (a temporary directory for local://), preloads the input
topic outside the timed region, then times ``pipes.runtime.run(graph, settings,
until_done=True)`` from its start until the checkpoint that makes the last expected
output durable (``msg/s`` = input messages / that time). Every run's output is then read
back and checked message by message, together with the committed consumer offsets and
keyed state, so a run that drops or duplicates messages fails loudly instead of looking
fast. Baselines (see baselines.py) run in the same process, next to each workload.

kafka:// (kafka.py) is measured differently: one Tansu broker on loopback for the whole
run, the stateless enrich() and the keyed count as pipes apps next to a naive and a batched
hand-written aiokafka consume->produce loop, each timed from its first consumed batch.

Results: tables on stdout, bench-results/local.json (local://, memory://) and
bench-results/kafka.json (kafka://).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import inspect
import json
import os
import pickle
import platform
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from typing import Any

import orjson

import pipes
from pipes.brokers import Changes
from pipes.brokers.local import LocalBroker
from pipes.runtime import run

from . import baselines
from .workloads import IN, N_USERS, OUT, WORKLOADS, Workload, Wrong, make_value, user_of

BROKERS = ("local", "memory", "kafka")
PRELOAD_CHUNK = 50_000


def _loop_factory():
    """The event loop the CLI uses: uvloop when installed."""
    try:
        import uvloop
    except ImportError:
        return None, "asyncio"
    return uvloop.new_event_loop, f"uvloop {uvloop.__version__}"


def _run_async(coro: Any) -> Any:
    factory, _ = _loop_factory()
    return asyncio.run(coro, loop_factory=factory) if factory else asyncio.run(coro)


# -- one pipes run ----------------------------------------------------------------------
def encode_inputs(n: int) -> list[bytes]:
    dumps = orjson.dumps
    return [dumps(make_value(i)) for i in range(n)]


async def _open(broker: LocalBroker, graph: Any) -> None:
    """Create the app's topics (Broker.open took topic specs before it took the graph)."""
    first = next(iter(inspect.signature(broker.open).parameters))
    if first == "graph":
        await broker.open(graph, list(graph.topologies.values()))
    else:
        await broker.open(list(graph.topics.values()))


async def _preload(broker: LocalBroker, inputs: list[bytes], keyed: bool) -> None:
    from pipes.partitioner import split

    parts = broker.partitions(IN)
    ts = int(time.time() * 1000)
    for start in range(0, len(inputs), PRELOAD_CHUNK):
        chunk = inputs[start:start + PRELOAD_CHUNK]
        if keyed:
            recs = [(user_of(i).encode(), v, None, ts) for i, v in enumerate(chunk, start)]
        else:
            recs = [(None, v, None, ts) for v in chunk]
        changes = Changes()
        for p, part in enumerate(split(recs, parts) if parts > 1 else [recs]):
            if part:
                changes.records[(IN, p)] = part
        await broker.commit("bench.preload", changes)


def _read_topic(broker: LocalBroker, topic: str) -> list[tuple[int, bytes | None, bytes]]:
    out = []
    ends = broker.end_offsets(topic)
    for p, off in broker.start_offsets(topic).items():
        while off < ends[p]:
            recs = broker.read(topic, p, off, 50_000)
            if not recs:
                break
            out += [(p, r[1], r[2]) for r in recs]
            off = recs[-1][0] + 1
    return out


def _verify(wl: Workload, n: int, broker: LocalBroker, graph: Any, report: Any) -> None:
    """Raises Wrong unless the committed outputs, offsets and state are exactly right."""
    from pipes.store import state_prefix

    if not wl.preload and report.produced != n:
        raise Wrong(f"the source produced {report.produced} messages, expected {n}")
    wl.check(_read_topic(broker, OUT), n)
    # Every input topic consumed, and the consumed offsets committed.
    topology = next(iter(graph.topologies.values()))
    committed = broker.store.offsets(topology.group)
    for topic in topology.input_topics:
        for p, end in broker.end_offsets(topic).items():
            if committed.get((topic, p), 0) != end:
                raise Wrong(f"committed offset of {topic}[{p}] is {committed.get((topic, p))}, its end is {end}")
    for topic in topology.input_topics:  # the input and every intermediate topic hold n records
        total = sum(broker.end_offsets(topic).values())
        if total != n:
            raise Wrong(f"topic {topic} has {total} records, expected {n}")
    dlq = {t: sum(broker.end_offsets(t).values()) for t in broker.topics() if t.endswith(".dlq")}
    if any(dlq.values()):
        raise Wrong(f"dead letters: {dlq}")
    if wl.stateful_node:
        state = {}
        node = graph.node(wl.stateful_node)
        for p in range(max(broker.partitions(t) for t in node.inputs)):
            prefix = state_prefix(wl.stateful_node, p)
            for k, v in broker.store.scan("state", prefix):
                state[k[len(prefix):].decode()] = pickle.loads(v)
        from .workloads import check_keyed_state

        check_keyed_state(state, n)


async def run_pipes(wl: Workload, n: int, kind: str, inputs: list[bytes], base: pipes.Settings,
                    root: str | None, profiler: cProfile.Profile | None = None) -> dict:
    path = None if kind == "memory" else tempfile.mkdtemp(prefix=f"pipes-bench-{wl.name}-", dir=root)
    url = "memory://" if path is None else f"local://{path}"
    settings = base.override(broker=url)
    app = wl.app(n)
    graph = app.build(settings)
    broker = LocalBroker(path, settings, url=url)
    try:
        await _open(broker, graph)
        t = time.perf_counter()
        if wl.preload:
            await _preload(broker, inputs, wl.keyed_input)
        preload_s = time.perf_counter() - t

        # When did the checkpoint holding the last expected output land?
        expected = wl.expected(n)
        done_at: list[float] = []
        commit = broker.commit

        async def timed_commit(group: str, changes: Changes) -> None:
            await commit(group, changes)
            if not done_at and sum(broker.end_offsets(OUT).values()) >= expected:
                done_at.append(time.perf_counter())

        broker.commit = timed_commit
        gc.collect()
        if profiler is not None:
            profiler.enable()
        t0 = time.perf_counter()
        try:
            report = await run(graph, settings, until_done=True, broker=broker)
        finally:
            wall = time.perf_counter() - t0
            if profiler is not None:
                profiler.disable()
            broker.commit = commit
        if not done_at:
            raise Wrong(f"the run ended with {sum(broker.end_offsets(OUT).values())} outputs, expected {expected}")
        seconds = done_at[0] - t0
        _verify(wl, n, broker, graph, report)
        return {"seconds": seconds, "wall": wall, "msg_s": n / seconds, "commits": report.commits,
                "processed": report.processed, "produced": report.produced, "preload_s": preload_s}
    finally:
        await broker.close()
        if path:
            shutil.rmtree(path, ignore_errors=True)


# -- the whole benchmark ------------------------------------------------------------------
def measure(wl: Workload, n: int, kinds: list[str], inputs: list[bytes], base: pipes.Settings,
            root: str | None, repeat: int) -> list[dict]:
    rows = []
    cpu_s = min(baselines.cpu(wl, n, inputs) for _ in range(repeat))
    for kind in kinds:
        naive_s = min(baselines.naive(wl, n, inputs, memory=kind == "memory", root=root) for _ in range(repeat))
        runs = []
        error = None
        for _ in range(repeat):
            try:
                runs.append(_run_async(run_pipes(wl, n, kind, inputs, base, root)))
            except Wrong as e:
                error = str(e)
                break
        best = min(runs, key=lambda r: r["seconds"]) if runs and not error else None
        row = {"workload": wl.name, "title": wl.title, "broker": kind, "n": n, "ok": error is None,
               "error": error, "cpu_msg_s": n / cpu_s, "naive_msg_s": n / naive_s}
        if best:
            row.update(best)
            row["vs_naive"] = best["msg_s"] / row["naive_msg_s"]
            row["vs_cpu"] = best["msg_s"] / row["cpu_msg_s"]
            row["all_msg_s"] = [r["msg_s"] for r in runs]
        if wl.target and kind == "local":
            row["target_msg_s"] = wl.target
            row["meets_target"] = bool(best) and best["msg_s"] >= wl.target
        rows.append(row)
        _print_row(row)
    return rows


HEADER = (f"{'workload':<10} {'broker':<7} {'pipes msg/s':>12} {'naive msg/s':>12} {'pipes/naive':>11} "
          f"{'cpu msg/s':>11} {'pipes/cpu':>9} {'commits':>7}  target")


def _print_row(row: dict) -> None:
    if not row["ok"]:
        line = (f"{row['workload']:<10} {row['broker']:<7} {'WRONG':>12} {row['naive_msg_s']:>12,.0f} {'':>11} "
                f"{row['cpu_msg_s']:>11,.0f} {'':>9} {'':>7}  {row['error']}")
    else:
        target = ""
        if "target_msg_s" in row:
            target = f">= {row['target_msg_s'] // 1000}k {'ok' if row['meets_target'] else 'MISSED'}"
        line = (f"{row['workload']:<10} {row['broker']:<7} {row['msg_s']:>12,.0f} {row['naive_msg_s']:>12,.0f} "
                f"{row['vs_naive']:>10.2f}x {row['cpu_msg_s']:>11,.0f} {row['vs_cpu']:>8.2f}x {row['commits']:>7}  "
                f"{target}")
    print(line, flush=True)


def _environment(n: int, base: pipes.Settings, root: str | None) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), timeout=5).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "pipes"], capture_output=True, text=True,
                                    cwd=os.path.dirname(__file__), timeout=5).stdout.strip())
    except Exception:
        commit, dirty = "", False
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git": commit + ("+dirty" if dirty else ""),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "loop": _loop_factory()[1],
        "orjson": orjson.__version__,
        "rocksdict": _version("rocksdict"),
        "pipes": pipes.__version__,
        "n": n,
        "users": N_USERS,
        "value_bytes": len(orjson.dumps(make_value(n // 2))),
        "data_root": root or tempfile.gettempdir(),
        "settings": {f.name: getattr(base, f.name) for f in fields(base) if f.name not in ("broker", "data_dir")},
    }


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _settings(pairs: list[str]) -> pipes.Settings:
    base = pipes.Settings().with_env()
    changes: dict[str, Any] = {"on_error": "stop", "log_level": "WARNING"}
    types = {f.name: f.type for f in fields(pipes.Settings)}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or name not in types:
            raise SystemExit(f"--set takes NAME=VALUE with NAME one of {', '.join(types)}")
        kind = str(types[name])
        changes[name] = (int(raw) if kind.startswith("int") else float(raw) if kind.startswith("float")
                         else None if raw == "" and "None" in kind else raw)
    return base.override(**changes)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=None,
                   help="input messages per run (default 500000, 200000 on kafka://; 20000 with --quick)")
    p.add_argument("--kafka-n", type=int, default=None, help="input messages per kafka:// run (default: --n)")
    p.add_argument("--quick", action="store_true", help="a smoke run with a small N")
    p.add_argument("--only", action="append", default=[], metavar="WORKLOAD",
                   help=f"run only this workload (repeatable or comma-separated): {', '.join(WORKLOADS)}")
    p.add_argument("--broker", action="append", default=[], choices=BROKERS, help="only this broker (repeatable)")
    p.add_argument("--repeat", type=int, default=None,
                   help="runs per measurement; the best counts (default 1; 3 on kafka://, in interleaved rounds)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a pipes.Settings override")
    p.add_argument("--data-dir", default=None, help="where local:// databases are created (default: the temp dir)")
    p.add_argument("--out", default="bench-results/local.json", help="the JSON results file (local://, memory://)")
    p.add_argument("--kafka-out", default="bench-results/kafka.json", help="the JSON results file of kafka://")
    p.add_argument("--profile", action="store_true",
                   help="run the first --only workload (default stateless) on the first --broker (default local) "
                        "under cProfile and print the top functions instead of the table (on kafka://: from the "
                        "first consumed record to the checkpoint with the last output)")
    p.add_argument("--sort", default="tottime", help="profile sort key (tottime, cumulative, ncalls, ...)")
    p.add_argument("--top", type=int, default=25, help="profile lines to print")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    n = args.n or (20_000 if args.quick else 500_000)
    from . import kafka

    kafka_n = args.kafka_n or args.n or (kafka.QUICK_N if args.quick else kafka.DEFAULT_N)
    names = [w for item in args.only for w in item.split(",") if w]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workload {unknown[0]!r}: use {', '.join(WORKLOADS)}")
    kinds = list(dict.fromkeys(args.broker)) or list(BROKERS)
    base = _settings(args.set)
    root = args.data_dir
    if root:
        os.makedirs(root, exist_ok=True)
    env = _environment(n, base, root)

    if args.profile:
        if kinds[0] == "kafka":
            workload = names[0] if names else "stateless"
            if workload not in kafka.WORKLOADS:
                raise SystemExit(f"kafka:// profiles {' or '.join(kafka.WORKLOADS)}, not {workload!r}")
            return kafka.profile(workload, kafka_n, base, root, args.sort, args.top)
        return profile(WORKLOADS[names[0] if names else "stateless"], n, kinds[0], base, root, args.sort, args.top)

    status = 0
    local_kinds = [k for k in kinds if k != "kafka"]
    if local_kinds:
        status = _bench_local(args, names, n, local_kinds, base, root, env)
    if "kafka" in kinds:
        status = max(status, _bench_kafka(args, names, kafka_n, base, root, env))
    return status


def _bench_kafka(args: argparse.Namespace, names: list[str], n: int, base: pipes.Settings, root: str | None,
                 env: dict) -> int:
    from . import kafka

    selected = [w for w in (names or kafka.WORKLOADS) if w in kafka.WORKLOADS]
    if not selected:
        print(f"\nkafka://: nothing to measure (it runs {', '.join(kafka.WORKLOADS)})")
        return 0
    started = time.perf_counter()
    rows, kafka_env = kafka.bench(selected, n, base, root, args.repeat or 3)
    total = time.perf_counter() - started
    print(f"\n{len(rows)} kafka:// measurements in {total:.0f} s, Tansu start and stop included")
    wrong = [r for r in rows if not r["ok"]]
    for r in wrong:
        print(f"WRONG OUTPUT: {r['runner']} {r['workload']} on kafka://: {r['error']}")
    for r in rows:
        if r.get("meets_target") is False:
            print(f"below target: pipes {r['workload']} on kafka:// is {r['vs_naive']:.2f}x the naive loop, "
                  f"the target is >= {r['target_vs_naive']:.0f}x")
    os.makedirs(os.path.dirname(args.kafka_out) or ".", exist_ok=True)
    with open(args.kafka_out, "w") as f:
        json.dump({"environment": {**env, "n": n, "kafka": kafka_env}, "seconds": total, "results": rows}, f,
                  indent=2)
    print(f"wrote {args.kafka_out}")
    return 1 if wrong else 0


def _bench_local(args: argparse.Namespace, names: list[str], n: int, kinds: list[str], base: pipes.Settings,
                 root: str | None, env: dict) -> int:
    selected = [WORKLOADS[w] for w in names] if names else list(WORKLOADS.values())
    print(f"pipes bench: N={n:,} x ~{env['value_bytes']} B JSON values, {N_USERS:,} users; python {env['python']}, "
          f"{env['loop']}, {env['cpus']} cpus, git {env['git'] or '?'}; local:// under {env['data_root']}")
    print("pipes msg/s: input messages / seconds from run() start to the checkpoint with the last output; "
          "naive: hand loop on rocksdict; cpu: the same work without storage\n")
    print(HEADER)
    started = time.perf_counter()
    t = time.perf_counter()
    inputs = encode_inputs(n)
    encode_s = time.perf_counter() - t
    rows: list[dict] = []
    for wl in selected:
        rows += measure(wl, n, kinds, inputs, base, root, max(1, args.repeat or 1))
    total = time.perf_counter() - started
    print(f"\n{len(rows)} measurements in {total:.0f} s (encoding the input once: {encode_s:.2f} s)")
    wrong = [r for r in rows if not r["ok"]]
    missed = [r for r in rows if r.get("meets_target") is False]
    for r in wrong:
        print(f"WRONG OUTPUT: {r['workload']} on {r['broker']}: {r['error']}")
    for r in missed:
        print(f"below target: {r['workload']} on {r['broker']}: {r['msg_s']:,.0f} msg/s < {r['target_msg_s']:,}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"environment": env, "seconds": total, "results": rows}, f, indent=2)
    print(f"wrote {args.out}")
    return 1 if wrong else 0


def profile(wl: Workload, n: int, kind: str, base: pipes.Settings, root: str | None, sort: str, top: int) -> int:
    inputs = encode_inputs(n) if wl.preload else []
    profiler = cProfile.Profile()
    result = _run_async(run_pipes(wl, n, kind, inputs, base, root, profiler))
    print(f"profile of {wl.name} ({wl.title}) on {kind}://, N={n:,}: {result['msg_s']:,.0f} msg/s under cProfile "
          f"({result['commits']} checkpoints, output verified)\n")
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.strip_dirs().sort_stats(sort).print_stats(top)
    print("cProfile does not see calls into Cython functions (msgpack) or made through functools.partial\n"
          "(e.g. a partial of orjson.dumps): their time counts in the caller's tottime. The same calls on\n"
          f"{n:,} records in isolation, for reference:")
    for name, seconds in hidden_costs(n):
        print(f"  {name:<46} {seconds:6.3f} s  ({n / seconds:>12,.0f} /s)")
    return 0


def hidden_costs(n: int) -> list[tuple[str, float]]:
    """Seconds for the C-level calls a stateless hot path makes per message."""
    import functools

    import msgpack

    values = encode_inputs(n)
    ts = int(time.time() * 1000)
    pack = msgpack.Packer(use_bin_type=True).pack
    unpackb = msgpack.unpackb
    dumps = functools.partial(orjson.dumps, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
    tuples = [(None, v, None, ts) for v in values]
    packed = [pack(t) for t in tuples]
    decoded = [orjson.loads(v) for v in values]
    loads = orjson.loads
    out = []
    gc.collect()
    t = time.perf_counter()
    for x in tuples:
        pack(x)
    out.append(("msgpack pack((key, value, headers, ts))", time.perf_counter() - t))
    t = time.perf_counter()
    for x in packed:
        unpackb(x, use_list=False)
    out.append(("msgpack.unpackb(record, use_list=False)", time.perf_counter() - t))
    t = time.perf_counter()
    for x in values:
        loads(x)
    out.append(("orjson.loads(value)", time.perf_counter() - t))
    t = time.perf_counter()
    for x in decoded:
        dumps(x)
    out.append(("partial(orjson.dumps, option=...)(value)", time.perf_counter() - t))
    return out


if __name__ == "__main__":
    sys.exit(main())
