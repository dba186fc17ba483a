"""Event time: timestamps from the broker, a field or a callable; stream time per
partition; late messages to the late topic or the DLQ, never silently dropped."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

import pipes
from pipes import windows as w
from pipes.eventtime import duration_ms, timestamp_getter, to_ms
from pipes.testing import run_app


def test_timestamps_in_every_form():
    at = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc)
    ms = 1767323045678
    assert to_ms(ms) == to_ms(float(ms)) == to_ms(at) == to_ms(at.isoformat()) == ms
    with pytest.raises(TypeError):
        to_ms(None)
    assert timestamp_getter("t", "x")({"t": ms}) == ms
    assert timestamp_getter(lambda v: v["when"], "x")({"when": at}) == ms
    assert timestamp_getter(None, "x") is None
    with pytest.raises(KeyError, match="no field 't'"):
        timestamp_getter("t", "x")({})
    with pytest.raises(pipes.ConfigError, match="timestamp="):
        timestamp_getter(3, "x")
    assert duration_ms(1.5, "d") == duration_ms(timedelta(milliseconds=1500), "d") == 1500
    with pytest.raises(pipes.ConfigError, match="grace"):
        duration_ms(-1, "grace")


def _app(late: str | None) -> pipes.App:
    app = pipes.App("et", partitions=2)
    app.topic("events", keyed=True, partitions=2)
    app.window("events", to="out", window=w.tumbling(10), agg=w.count(), grace=2, late=late, name="agg")
    return app


def _events(keys: list[str], times: list[int]) -> list[pipes.Message]:
    return [pipes.Message({"n": n}, key=k, timestamp=t) for n, (k, t) in enumerate(zip(keys, times))]


def test_broker_timestamps_and_stream_time_per_partition():
    # Find two keys that land on different partitions.
    probe = run_app(_app(None), {"events": [pipes.Message({}, key=f"k{i}", timestamp=0) for i in range(8)]})
    part = {m.key: m.partition for m in probe.messages("events")}
    a = next(k for k, p in part.items() if p == 0)
    b = next(k for k, p in part.items() if p == 1)
    # a's partition reaches 100 s; b's stays at 5 s, so b's 3.5 s message is on time and a's 1 s one is late.
    keys = [a, a, b, b, a, b]
    times = [1_000, 100_000, 5_000, 4_000, 1_000, 3_500]
    result = run_app(_app("late"), {"events": _events(keys, times)})
    assert [(m.key, m.value["n"]) for m in result.messages("late")] == [(a, 4)]
    late = result.messages("late")[0]
    assert late.timestamp == 1_000 and late.headers["pipes.late.node"] == b"agg"
    assert b"stream time 100000" in late.headers["pipes.late.reason"]
    # a's first window closed (stream time 100 s >= 10 s + grace); b's window is still open.
    assert [(o["key"], o["start"], o["value"]) for o in result["out"]] == [(a, 0, 1)]
    assert result.state("agg")[b] == {0: 3}


def test_late_messages_go_to_the_dlq_without_a_late_topic():
    result = run_app(_app(None), {"events": _events(["k", "k", "k"], [50_000, 1_000, 49_000])})
    dlq = result.messages("events.dlq")
    assert [m.value["n"] for m in dlq] == [1]
    assert dlq[0].headers["pipes.error.type"] == b"LateMessage"
    assert dlq[0].headers["pipes.error.node"] == b"agg"
    assert "late messages" in " ".join(result.report.lines)
