"""A CPU-bound pure-Python transform in mode="global" and mode="isolated", side by side.

    .venv/bin/python -m tests.bench.modes                      # N=20000, isolated with 2 workers
    .venv/bin/python -m tests.bench.modes --n 40000 --rounds 3 --modes global,isolated,process
    .venv/bin/python -m tests.bench.modes --iterations 0       # the cost of the pool itself

Each run is a real app on memory:// (``pipes.testing.run_app``): N JSON values in, one
transform doing a few thousand iterations of integer arithmetic per message, N out.
``msg/s`` is N over the time between the first and the last call of the function (each
output carries the ``time.perf_counter()`` of its call, a clock shared by the main
interpreter, sub-interpreters and processes), so pool start-up is not counted; the wall
time of the whole run, start-up included, is printed beside it, and the CPU time it used
over that wall time ("cores used": near 1 for global, near 2 for isolated with two
workers, unless other processes take the cores). Every run's outputs are checked against
a recomputation before its figure counts.

The workers import this module by name to find ``crunch``: it imports only pipes at the
top (pipes.testing imports rocksdict, which refuses sub-interpreters).
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import pipes

# Set by --iterations through the environment, which workers (sub-interpreters, processes) share.
ITERATIONS = int(os.environ.get("PIPES_BENCH_ITERATIONS", "3000"))


def crunch(order: dict) -> dict:
    """A few thousand rounds of a linear congruential generator: pure-Python CPU work."""
    x = order["id"]
    for _ in range(ITERATIONS):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
    return {"id": order["id"], "h": x, "t": time.perf_counter()}


def expected(i: int) -> int:
    x = i
    for _ in range(ITERATIONS):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
    return x


def build(mode: str, workers: int) -> pipes.App:
    app = pipes.App("bench-modes")
    app.transform("bench.in", to="bench.out", mode=mode, workers=workers)(crunch)
    return app


def _cpu() -> float:
    """CPU seconds of this process (all its threads and sub-interpreters) and its ended children."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def one_run(mode: str, workers: int, inputs: list[dict], want: list[int]) -> tuple[float, float, float]:
    """(msg/s between the first and last call, wall seconds of the whole run, CPU seconds)."""
    from pipes.testing import run_app

    began, cpu = time.perf_counter(), _cpu()
    out = run_app(build(mode, workers), {"bench.in": inputs})["bench.out"]
    wall, cpu = time.perf_counter() - began, _cpu() - cpu
    if [(o["id"], o["h"]) for o in out] != list(enumerate(want)):
        raise SystemExit(f"mode={mode}: wrong output")
    times = [o["t"] for o in out]
    return len(out) / (max(times) - min(times)), wall, cpu


def main() -> None:
    global ITERATIONS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default="global,isolated")
    parser.add_argument("--iterations", type=int, default=ITERATIONS, help="arithmetic rounds per message")
    args = parser.parse_args()
    ITERATIONS = args.iterations
    os.environ["PIPES_BENCH_ITERATIONS"] = str(args.iterations)
    modes = args.modes.split(",")
    inputs = [{"id": i} for i in range(args.n)]
    want = [expected(i) for i in range(args.n)]
    best: dict[str, float] = {}
    print(f"N={args.n}, {ITERATIONS} iterations per message, workers={args.workers} for the pooled modes")
    print(f"{'round':>5}  {'mode':<16} {'msg/s':>9}  {'wall s':>7}  {'cores used':>10}")
    for r in range(1, args.rounds + 1):
        for mode in modes:
            rate, wall, cpu = one_run(mode, 1 if mode == "global" else args.workers, inputs, want)
            best[mode] = max(best.get(mode, 0.0), rate)
            print(f"{r:>5}  {mode:<16} {rate:>9,.0f}  {wall:>7.2f}  {cpu / wall:>10.2f}")
    print("best of rounds:")
    for mode in modes:
        ratio = f"  {best[mode] / best['global']:.2f}x global" if "global" in best and mode != "global" else ""
        print(f"  {mode:<16} {best[mode]:>9,.0f} msg/s{ratio}")


if __name__ == "__main__":
    main()
