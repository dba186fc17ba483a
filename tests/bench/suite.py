"""The whole comparison: every runner on every workload, each measurement in a child process.

kafka:// (one Tansu broker for the whole run): the naive and batched aiokafka loops,
pipes, Quix Streams and faust-streaming on (a) stateless, (b) chain3, (c) keyed, (d) filter,
then (e) the latency run at a fixed rate. local:// and memory:// (pipes only; no peer has
an embedded broker): pipes next to the hand loop on rocksdict, and the latency run. Plus
the quickstart worker's peak RSS.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field

from . import kafka, latency, procs
from .functions import encode_inputs
from .workloads import Wrong

THROUGHPUT = ("stateless", "chain3", "keyed", "filter")
KAFKA_RUNNERS = ("naive", "batched", "pipes", "quix", "faust")
LATENCY_ONLY = ("forward",)  # the latency floor: no acks awaited, no commits (tests/bench/loops.py)
LOCAL_RUNNERS = ("pipes", "rocksdict")
TIMEOUT = 180.0  # seconds one child may take before its row counts as failed


@dataclass(frozen=True)
class Plan:
    workloads: tuple[str, ...]  # of THROUGHPUT, plus "latency" for the latency run
    runners: tuple[str, ...]
    brokers: tuple[str, ...]
    n_local: int
    n_kafka: int
    n_faust: int
    rate: int
    seconds: float
    settings: tuple[str, ...]
    root: str
    repeat: int = 1
    quickstart: bool = True
    unavailable: dict = field(default_factory=dict)  # peer -> why it cannot run


def run_async(coro):
    from .child import run_async as run

    return run(coro)


def _row(workload: str, broker: str, runner: str, **values) -> dict:
    return {"workload": workload, "broker": broker, "runner": runner, "ok": "error" not in values, **values}


def _say(row: dict) -> None:
    from .report import line

    print(line(row), flush=True)


def _best(rows: list[dict]) -> dict:
    """Of repeated measurements: the fastest (throughput) or the lowest p99 (latency)."""
    good = [r for r in rows if r["ok"]]
    if not good:
        return rows[-1]
    if "msg_s" in good[0]:
        best = max(good, key=lambda r: r["msg_s"])
        best["all_msg_s"] = [r["msg_s"] for r in good]
    else:
        best = min(good, key=lambda r: r["p99_ms"])
    return best


# -- kafka:// ----------------------------------------------------------------------------
def kafka_throughput(url: str, runner: str, workload: str, inputs: list[bytes], plan: Plan) -> dict:
    spec = run_async(kafka.prepare(url, runner, workload, inputs, plan.root))
    spec.update(broker="kafka", settings=list(plan.settings))
    n = spec["n"]
    started = time.monotonic()
    try:
        result = procs.start(spec, plan.root).result(TIMEOUT)
        if "error" in result:
            return _row(workload, "kafka", runner, n=n, error=result["error"])
        if not result.get("t_last"):
            return _row(workload, "kafka", runner, n=n, error=f"no end time reported: {result}")
        run_async(kafka.verify(spec, result))
    except (procs.ChildFailed, Wrong) as e:
        return _row(workload, "kafka", runner, n=n, error=str(e))
    finally:
        shutil.rmtree(spec["data_dir"], ignore_errors=True)
    seconds = result["t_last"] - result["t_first"]
    return _row(workload, "kafka", runner, n=n, msg_s=n / seconds, seconds=seconds, rss_mb=result["rss_mb"],
                join_s=result["t_first"] - started, preload_s=spec["preload_s"],
                **{k: result[k] for k in ("commits", "batches") if k in result})


def kafka_latency(url: str, runner: str, plan: Plan) -> dict:
    spec = run_async(kafka.prepare(url, runner, "stateless", None, plan.root))
    spec.update(broker="kafka", mode="latency", settings=list(plan.settings))
    child = procs.start(spec, plan.root)
    try:
        try:
            stats = run_async(latency.drive(spec["bootstrap"], spec["in_topic"], spec["out_topic"], plan.rate,
                                            plan.seconds))
        finally:
            child.stop()
        result = child.result(60)
    except (procs.ChildFailed, TimeoutError) as e:
        try:
            child.result(30)  # reaped (killed if it ignores SIGTERM)
        except procs.ChildFailed:
            pass
        return _row("latency", "kafka", runner, error=str(e))
    finally:
        shutil.rmtree(spec["data_dir"], ignore_errors=True)
    return _latency_row("kafka", runner, stats, result.get("rss_mb"))


def _latency_row(broker: str, runner: str, stats: dict, rss_mb: float | None) -> dict:
    if not stats.get("received"):
        return _row("latency", broker, runner, error=f"no output came back ({stats})")
    row = _row("latency", broker, runner, **{**stats, "n": stats["sent"], "rss_mb": rss_mb})
    if stats["received"] < stats["sent"]:
        row["note"] = f"{stats['received']:,} of {stats['sent']:,} outputs within 15 s: cannot keep up"
    return row


def bench_kafka(plan: Plan) -> list[dict]:
    from ..tansu import tansu

    rows: list[dict] = []
    runners = [r for r in KAFKA_RUNNERS if r in plan.runners]
    for peer, why in plan.unavailable.items():
        if peer in runners:
            runners.remove(peer)
            rows.append(_row("*", "kafka", peer, error=f"not measured: {why}"))
            _say(rows[-1])
    inputs = {n: encode_inputs(n) for n in {plan.n_kafka, plan.n_faust}}
    with tansu() as url:
        for workload in [w for w in THROUGHPUT if w in plan.workloads]:
            for runner in runners:
                n = plan.n_faust if runner == "faust" else plan.n_kafka
                rows.append(_best([kafka_throughput(url, runner, workload, inputs[n], plan)
                                   for _ in range(plan.repeat)]))
                _say(rows[-1])
        if "latency" in plan.workloads:
            for runner in runners + [r for r in LATENCY_ONLY if r in plan.runners]:
                rows.append(_best([kafka_latency(url, runner, plan) for _ in range(plan.repeat)]))
                _say(rows[-1])
    return rows


# -- local:// and memory:// ----------------------------------------------------------------
def local_one(spec: dict, plan: Plan) -> dict:
    workload, broker, runner = spec["workload"], spec["broker"], spec["runner"]
    spec = {**spec, "root": plan.root, "settings": list(plan.settings)}
    try:
        result = procs.start(spec, plan.root).result(TIMEOUT)
    except procs.ChildFailed as e:
        return _row(workload, broker, runner, error=str(e))
    if "error" in result:
        return _row(workload, broker, runner, error=result["error"])
    if spec.get("mode") == "latency":
        return _latency_row(broker, runner, result, result["rss_mb"])
    return _row(workload, broker, runner, n=spec["n"], msg_s=result["msg_s"], seconds=result["seconds"],
                rss_mb=result["rss_mb"], **{k: result[k] for k in ("commits",) if k in result})


def bench_local(plan: Plan) -> list[dict]:
    rows = []
    brokers = [b for b in ("local", "memory") if b in plan.brokers]
    for workload in [w for w in THROUGHPUT if w in plan.workloads]:
        for broker in brokers:
            for runner in [r for r in LOCAL_RUNNERS if r in plan.runners]:
                spec = {"runner": runner, "workload": workload, "broker": broker, "n": plan.n_local}
                rows.append(_best([local_one(spec, plan) for _ in range(plan.repeat)]))
                _say(rows[-1])
    if "latency" in plan.workloads and "pipes" in plan.runners:
        for broker in brokers:
            spec = {"runner": "pipes", "workload": "latency", "broker": broker, "mode": "latency",
                    "rate": plan.rate, "seconds": plan.seconds}
            rows.append(_best([local_one(spec, plan) for _ in range(plan.repeat)]))
            _say(rows[-1])
    return rows


def bench_quickstart(plan: Plan) -> list[dict]:
    spec = {"runner": "quickstart", "workload": "quickstart", "broker": "local"}
    try:
        result = procs.start({**spec, "root": plan.root}, plan.root).result(TIMEOUT)
    except procs.ChildFailed as e:
        result = {"error": str(e)}
    row = (_row("quickstart", "local", "pipes", error=result["error"]) if "error" in result else
           _row("quickstart", "local", "pipes", rss_mb=result["rss_mb"], seconds=result["seconds"]))
    _say(row)
    return [row]


def run(plan: Plan) -> list[dict]:
    os.makedirs(plan.root, exist_ok=True)
    rows: list[dict] = []
    if plan.quickstart:
        rows += bench_quickstart(plan)
    if {"local", "memory"} & set(plan.brokers):
        rows += bench_local(plan)
    if "kafka" in plan.brokers:
        rows += bench_kafka(plan)
    return rows

