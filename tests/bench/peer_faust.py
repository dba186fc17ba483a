"""faust-streaming on the benchmark's workloads (run by ``.venv-peers/bin/python -m tests.bench.peer_faust SPEC``).

Written as a faust user would: one agent over a JSON topic, ``await topic.send(...)`` per
output, defaults otherwise. The chain is three calls in the agent; the keyed count is
``stream.group_by(...)`` (a repartition topic) and a Table (in-memory store with its
changelog topic).

Timing (the group join excluded): from the first value handed to the agent to the
producer flushed after the N-th input. Then the worker stops itself (SIGTERM to
itself, which faust handles); in the latency mode it runs until the suite's SIGTERM.
"""

from __future__ import annotations

import atexit
import os
import signal
import time

import faust

from . import protocol
from .functions import enrich, keep_tenth, stamp, tier


def main() -> None:
    spec = protocol.spec()
    n = spec.get("n") or 0
    workload = spec["workload"]
    times = {"t_first": None, "t_last": None, "consumed": 0}
    atexit.register(lambda: protocol.report(times))
    app = faust.App(spec["name"], broker=f"kafka://{spec['bootstrap']}", store="memory://", web_enabled=False,
                    datadir=spec["data_dir"], topic_partitions=1, topic_replication_factor=1,
                    consumer_auto_offset_reset="earliest", broker_session_timeout=6.0,
                    broker_heartbeat_interval=1.0)
    src = app.topic(spec["in_topic"], value_serializer="json")
    out = app.topic(spec["out_topic"], value_serializer="json", key_serializer="raw")
    counts = app.Table("counts", default=int, partitions=1) if workload == "keyed" else None

    async def done() -> None:
        await app.producer.flush()
        times["t_last"] = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)

    @app.agent(src)
    async def process(stream):
        if workload == "keyed":
            stream = stream.group_by(lambda v: v["user"], name="user")
        async for v in stream:
            if times["t_first"] is None:
                times["t_first"] = time.monotonic()
            if workload == "stateless":
                await out.send(value=enrich(v))
            elif workload == "chain3":
                await out.send(value=stamp(tier(enrich(v))))
            elif workload == "filter":
                if keep_tenth(v) is not None:
                    await out.send(value=v)
            else:
                user = v["user"]
                c = counts[user] = counts[user] + 1
                await out.send(key=user.encode(), value={"user": user, "count": c})
            times["consumed"] += 1
            if times["consumed"] == n:
                await done()

    faust.Worker(app, loglevel="WARNING", quiet=True, redirect_stdouts=False).execute_from_commandline()


if __name__ == "__main__":
    main()
