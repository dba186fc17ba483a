"""The app tests/test_crash.py kills with SIGKILL: a source with `state`, a filter, a
generator transform and a keyed transform with `state`, all topics in 4 partitions.

    numbers(state) -> "raw" -> keep -> "kept" -> fan -> "items"
      -> tally (key="k": "crash.tally.rekey") -> "totals"

Everything is a pure function of the message number ``i``, so test_crash.py can recompute
every topic and every key's state in plain Python. CRASH_N (default 200,000) sets how many
numbers the source emits.
"""

import os

import pipes

N = int(os.environ.get("CRASH_N", "200000"))
KEYS = 1000

app = pipes.App("crash", partitions=4, commit_every=2_000, commit_interval=0.2)


@app.source(to="raw")
def numbers(state):
    """One message per call; `state["i"]` is checkpointed with what was emitted."""
    i = state.get("i", 0)
    if i == N:
        return None
    state["i"] = i + 1
    return {"i": i, "v": i % 97}


@app.transform("raw", to="kept")
def keep(m):
    """A filter: drops about one message in five."""
    if m["v"] % 5:
        return m


@app.transform("kept", to="items")
def fan(m):
    """A generator transform: 1 to 3 items per message."""
    i = m["i"]
    for j in range(1 + i % 3):
        yield {"i": i, "j": j, "k": f"k{(i * 7 + j * 13) % KEYS}", "x": (i + j) % 11}


@app.transform("items", to="totals", key="k")
def tally(item, state):
    """Keyed by item["k"]: a count and a sum per key, emitted after every item."""
    state["n"] = state.get("n", 0) + 1
    state["sum"] = state.get("sum", 0) + item["x"]
    return {"k": item["k"], "i": item["i"], "j": item["j"], "n": state["n"], "sum": state["sum"]}
