"""The benchmark's input and user functions, shared by pipes and every peer.

Only orjson is imported here: the peers (Quix Streams, faust-streaming) import this
module from their own virtualenv (``.venv-peers``), where pipes is not installed.
"""

from __future__ import annotations

import orjson

N_USERS = 10_000


def make_value(i: int) -> dict:
    return {"id": i, "user": f"u{i % N_USERS}", "amount": (i % 400) / 8}


def encode_inputs(n: int) -> list[bytes]:
    """The N input values as JSON (about 40 bytes each). Copied: a bytes object from
    orjson 3.13's dumps() keeps a ~4 KB allocation, 800 MB for 200k inputs."""
    dumps = orjson.dumps
    return [bytes(memoryview(dumps(make_value(i)))) for i in range(n)]


def user_of(i: int) -> str:
    return f"u{i % N_USERS}"


def enrich(v: dict) -> dict:
    v["cents"] = int(v["amount"] * 100)
    return v


def tier(v: dict) -> dict:
    v["tier"] = "big" if v["cents"] >= 2500 else "small"
    return v


def stamp(v: dict) -> dict:
    v["v"] = 2
    return v


def keep_tenth(v: dict) -> dict | None:
    return v if v["id"] % 10 == 0 else None


def count(v: dict, state: dict) -> dict:
    n = state["n"] = state.get("n", 0) + 1
    return {"user": v["user"], "count": n}


def expected_outputs(workload: str, n: int) -> int:
    """How many outputs a workload makes of n inputs."""
    return (n + 9) // 10 if workload == "filter" else n
