"""The app tests/test_kafka_faults.py runs on Kafka and breaks: one keyed aggregation.

    "<app>.input" (6 partitions, keyed by "k{i % 1000}") -> aggregate(state) -> "<app>.output"

``aggregate`` keeps a count and a sum of ``v`` per key and emits both after every
message, so every output record names the input it came from (``i``) and the running
values it saw; the test recomputes all of it from the input topic. The app's name comes
from KAFKA_FAULT_APP, so every test run has its own topics, changelog and consumer group.
"""

import os

import pipes

NAME = os.environ.get("KAFKA_FAULT_APP", "kfault")
PARTITIONS = 6

app = pipes.App(NAME)
app.topic(f"{NAME}.input", partitions=PARTITIONS, keyed=True)
app.topic(f"{NAME}.output", partitions=PARTITIONS)


@app.transform(f"{NAME}.input", to=f"{NAME}.output")
def aggregate(m, state):
    state["count"] = state.get("count", 0) + 1
    state["sum"] = state.get("sum", 0) + m["v"]
    return {"k": m["k"], "i": m["i"], "count": state["count"], "sum": state["sum"]}
