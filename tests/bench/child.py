"""One measurement in a process of its own (``.venv/bin/python -m tests.bench.child SPEC``),
so its peak RSS is its own: pipes on kafka://, local:// or memory://, the aiokafka loops,
the hand loop on rocksdict, or the quickstart worker. Peers have their own entry points (peer_quix.py, peer_faust.py).

SPEC (JSON): runner (pipes | naive | batched | rocksdict | quickstart), workload, broker (kafka | local |
memory), mode (throughput | latency), n, settings (NAME=VALUE overrides), and for kafka://
the topics and group the suite prepared (kafka.prepare).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from typing import Any

from . import protocol


def run_async(coro: Any) -> Any:
    """asyncio.run on uvloop when installed, as the pipes CLI does."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return asyncio.run(coro, loop_factory=uvloop.new_event_loop)


def quickstart(spec: dict) -> dict:
    """`pipes worker -A apps.quickstart --until-done` (the README's quickstart) on a fresh
    local:// data dir, through the CLI's own entry point."""
    import os
    import time

    root = tempfile.mkdtemp(prefix="pipes-bench-quickstart-", dir=spec.get("root"))
    os.environ["PIPES_QUICKSTART_OUT"] = os.path.join(root, "out")
    from pipes.cli import main

    try:
        t = time.monotonic()
        code = main(["worker", "-A", "apps.quickstart", "--until-done", "--data-dir", os.path.join(root, "data")])
        seconds = time.monotonic() - t
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"seconds": seconds} if code == 0 else {"error": f"the quickstart worker exited with {code}"}


def measure(spec: dict) -> dict:
    from .run import settings_from

    runner, broker, mode = spec["runner"], spec["broker"], spec.get("mode", "throughput")
    if runner == "quickstart":
        return quickstart(spec)
    base = settings_from(spec.get("settings", []))
    if broker == "kafka":
        if runner == "pipes":
            from .kafka import run_pipes

            return run_async(run_pipes(spec, base))
        from .loops import run_loop

        return run_async(run_loop(spec))
    root = spec.get("root")
    if mode == "latency":
        from .latency import run_local

        path = None if broker == "memory" else tempfile.mkdtemp(prefix="pipes-bench-latency-", dir=root)
        try:
            return run_async(run_local(broker, spec["rate"], spec["seconds"], base, path))
        finally:
            if path:
                shutil.rmtree(path, ignore_errors=True)
    from .functions import encode_inputs
    from .workloads import WORKLOADS

    wl, n = WORKLOADS[spec["workload"]], spec["n"]
    inputs = encode_inputs(n) if wl.preload else []
    if runner == "rocksdict":
        from .baselines import naive

        seconds = naive(wl, n, inputs, memory=broker == "memory", root=root)
        return {"seconds": seconds, "msg_s": n / seconds}
    from .local import run_pipes

    return run_async(run_pipes(wl, n, broker, inputs, base, root))


def main() -> None:
    spec = protocol.spec()
    from .workloads import Wrong

    try:
        result = measure(spec)
    except Wrong as e:
        result = {"error": str(e)}
    protocol.report(result)


if __name__ == "__main__":
    main()
