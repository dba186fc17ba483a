"""The table, the ratios pipes/peer and the issue's targets, from the suite's rows."""

from __future__ import annotations

RUNNER_NAMES = {"pipes": "pipes", "naive": "aiokafka naive loop", "batched": "aiokafka batched loop",
                "forward": "aiokafka forward-only",
                "quix": "Quix Streams", "faust": "faust-streaming", "rocksdict": "hand loop on rocksdict"}

HEADER = (f"{'workload':<10} {'broker':<6} {'runner':<22} {'N':>8} {'msg/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'RSS MB':>7} {'pipes/this':>10}")


def _num(row: dict, key: str, fmt: str, width: int) -> str:
    return format(row[key], fmt).rjust(width) if row.get(key) is not None else " " * width


def line(row: dict) -> str:
    head = f"{row['workload']:<10} {row['broker']:<6} {RUNNER_NAMES.get(row['runner'], row['runner']):<22}"
    if not row["ok"]:
        return f"{head} {'FAILED':>8}  {row['error']}"
    text = (f"{head} {_num(row, 'n', ',', 8)} {_num(row, 'msg_s', ',.0f', 10)} {_num(row, 'p50_ms', '.1f', 8)} "
            f"{_num(row, 'p99_ms', '.1f', 8)} {_num(row, 'rss_mb', '.0f', 7)} ")
    ratio = row.get("pipes_vs")
    text += f"{ratio:>9.2f}x" if ratio is not None else " " * 10
    return text + (f"  {row['note']}" if row.get("note") else "")


def add_ratios(rows: list[dict]) -> None:
    """Each non-pipes row gets pipes' msg/s on the same workload and broker divided by its own."""
    pipes = {(r["workload"], r["broker"]): r for r in rows if r["runner"] == "pipes" and r["ok"] and "msg_s" in r}
    for r in rows:
        p = pipes.get((r["workload"], r["broker"]))
        if r["runner"] != "pipes" and r["ok"] and "msg_s" in r and p is not None:
            r["pipes_vs"] = p["msg_s"] / r["msg_s"]


def _find(rows: list[dict], workload: str, broker: str, runner: str) -> dict | None:
    for r in rows:
        if (r["workload"], r["broker"], r["runner"]) == (workload, broker, runner) and r["ok"]:
            return r
    return None


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, each with the measured figure and met (True/False) or None
    when its rows were not measured."""
    out = []

    def ratio(workload: str, peer: str, want: float) -> None:
        row = _find(rows, workload, "kafka", peer)
        got = row.get("pipes_vs") if row else None
        out.append({"target": f"{workload} on kafka://: pipes >= {want:g}x {RUNNER_NAMES[peer]}",
                    "measured": None if got is None else f"{got:.2f}x", "met": None if got is None else got >= want})

    def at_least(workload: str, broker: str, want: float) -> None:
        row = _find(rows, workload, broker, "pipes")
        got = row.get("msg_s") if row else None
        out.append({"target": f"{workload} on {broker}://: pipes >= {want:,.0f} msg/s",
                    "measured": None if got is None else f"{got:,.0f} msg/s",
                    "met": None if got is None else got >= want})

    def at_most(workload: str, broker: str, key: str, want: float, what: str, unit: str) -> None:
        row = _find(rows, workload, broker, "pipes")
        got = row.get(key) if row else None
        measured = None if got is None else f"{got:.1f} {unit}"
        floor = _find(rows, workload, broker, "forward")  # the latency floor, when it was measured
        if measured and floor and floor.get(key) is not None:
            measured += f" (forward-only {floor[key]:.1f})"
        out.append({"target": f"{what} <= {want:g} {unit}", "measured": measured,
                    "met": None if got is None else got <= want})

    ratio("stateless", "naive", 3)
    ratio("stateless", "quix", 8)
    ratio("stateless", "faust", 50)
    ratio("stateless", "batched", 0.5)
    ratio("keyed", "quix", 5)
    at_least("stateless", "local", 300_000)
    at_least("keyed", "local", 200_000)
    at_most("latency", "kafka", "p99_ms", 20, "p99 at the fixed rate on kafka://", "ms")
    at_most("latency", "local", "p99_ms", 20, "p99 at the fixed rate on local://", "ms")
    at_most("quickstart", "local", "rss_mb", 150, "peak RSS of the quickstart worker", "MB")
    return out


def print_all(rows: list[dict], goals: list[dict]) -> None:
    print()
    print(HEADER)
    for r in rows:
        print(line(r))
    print("\ntargets (issue 7):")
    for t in goals:
        mark = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        print(f"  {mark:<12} {t['target']:<58} {t['measured'] or ''}")


def markdown(rows: list[dict], goals: list[dict]) -> str:
    """The same table and targets as Markdown (bench-results/bench.md, for docs/performance.md)."""
    def cell(r: dict, key: str, fmt: str) -> str:
        return format(r[key], fmt) if r.get(key) is not None else ""

    out = ["| workload | broker | runner | N | msg/s | p50 ms | p99 ms | peak RSS MB | pipes/this |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = RUNNER_NAMES.get(r["runner"], r["runner"])
        if not r["ok"]:
            out.append(f"| {r['workload']} | {r['broker']} | {name} | | {r['error'].splitlines()[0]} | | | | |")
            continue
        ratio = f"{r['pipes_vs']:.2f}×" if r.get("pipes_vs") is not None else ""
        note = f" ({r['note']})" if r.get("note") else ""
        out.append(f"| {r['workload']} | {r['broker']} | {name} | {cell(r, 'n', ',')} | {cell(r, 'msg_s', ',.0f')} | "
                   f"{cell(r, 'p50_ms', '.1f')} | {cell(r, 'p99_ms', '.1f')}{note} | {cell(r, 'rss_mb', '.0f')} | "
                   f"{ratio} |")
    out += ["", "| target (issue 7) | measured | |", "|---|---:|---|"]
    for t in goals:
        out.append(f"| {t['target']} | {t['measured'] or ''} | "
                   f"{ {True: 'met', False: '**missed**', None: 'not measured'}[t['met']]} |")
    return "\n".join(out) + "\n"
