"""Quix Streams on the benchmark's workloads (run by ``.venv-peers/bin/python -m tests.bench.peer_quix SPEC``).

Written as a Quix user would: JSON topics (Quix's orjson serializers), one
StreamingDataFrame, defaults for everything else (commit_interval 5 s, changelog topics
on). The chain is three ``apply`` steps in one dataframe; the keyed count is
``group_by("user")`` (a repartition topic) and a stateful ``apply`` (RocksDB state and a
changelog topic, checkpointed).

Timing (the group join excluded): from the first value handed to user code to the end of the last checkpoint
commit (the producer flushed: every output acknowledged); the app stops itself once the
last step has seen all N inputs. In the latency mode it runs until SIGTERM.
"""

from __future__ import annotations

import time

from quixstreams import Application
from quixstreams.checkpointing import checkpoint as quix_checkpoint

from . import protocol
from .functions import enrich, keep_tenth, stamp, tier


# On Tansu, librdkafka's second JoinGroup (after MEMBER_ID_REQUIRED) waits out the session
# timeout (45 s by default, ~23 s of join): a short one makes the join take ~3 s. The join
# is outside the timed region either way.
JOIN_FAST = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}


def quix_count(v: dict, state) -> dict:
    """functions.count on Quix's State (get/set instead of a dict)."""
    n = state.get("n", 0) + 1
    state.set("n", n)
    return {"user": v["user"], "count": n}


def main() -> None:
    spec = protocol.spec()
    n = spec.get("n") or 0
    times = {"t_first": None, "t_last": None, "seen": 0}
    commit = quix_checkpoint.Checkpoint.commit

    def timed_commit(self, *args, **kwargs):
        result = commit(self, *args, **kwargs)
        times["t_last"] = time.monotonic()
        return result

    quix_checkpoint.Checkpoint.commit = timed_commit
    app = Application(broker_address=spec["bootstrap"], consumer_group=spec["group"], auto_offset_reset="earliest",
                      state_dir=spec["data_dir"], loglevel=spec.get("loglevel", "WARNING"),
                      consumer_extra_config=JOIN_FAST)

    def first(fn):
        def call(*args):
            if times["t_first"] is None:
                times["t_first"] = time.monotonic()
            return fn(*args)
        return call

    def last(fn):
        def call(*args):
            r = fn(*args)
            times["seen"] += 1
            if times["seen"] == n:
                app.stop()
            return r
        return call

    workload = spec["workload"]
    src = app.topic(spec["in_topic"], value_deserializer="json")
    out = app.topic(spec["out_topic"], value_serializer="json", key_serializer="str" if workload == "keyed" else "bytes")
    sdf = app.dataframe(src)
    if workload == "stateless":
        sdf = sdf.apply(last(first(enrich)))
    elif workload == "chain3":
        sdf = sdf.apply(first(enrich)).apply(tier).apply(last(stamp))
    elif workload == "filter":
        sdf = sdf.filter(last(first(lambda v: keep_tenth(v) is not None)))
    elif workload == "keyed":
        sdf = sdf.group_by(first(lambda v: v["user"]), name="user")
        sdf = sdf.apply(last(quix_count), stateful=True)
    else:
        raise SystemExit(f"no Quix version of {workload!r}")
    sdf.to_topic(out)
    app.run()
    protocol.report({**times, "consumed": times["seen"]})


if __name__ == "__main__":
    main()
