"""pipes.checkpoint.Checkpoint: when a checkpoint is due, and the order commit() does things in.

The broker is a recording fake here: the seam under test is what the checkpoint hands it
and when. One test runs the same commit against the real embedded broker.
"""

from __future__ import annotations

import asyncio
import pickle

import pytest

import pipes
from pipes.brokers import Changes
from pipes.brokers.local import LocalBroker
from pipes.checkpoint import Checkpoint
from pipes.partitioner import key_hash


class RecordingBroker:
    def __init__(self, calls: list, fail: Exception | None = None):
        self.calls = calls
        self.fail = fail

    def partitions(self, topic: str) -> int:
        return 1

    async def commit(self, group: str, changes: Changes) -> None:
        self.calls.append(("commit", group, {t: list(o) for t, o in changes.outputs.items()},
                           dict(changes.offsets), dict(changes.state), dict(changes.sources)))
        if self.fail is not None:
            raise self.fail


class RecordingSink:
    def __init__(self, name: str, calls: list, dlq: tuple | None = None, fail: Exception | None = None):
        self.name, self.calls, self.dlq, self.fail = name, calls, dlq, fail

    async def flush(self, ckpt: Checkpoint) -> None:
        self.calls.append(("flush", self.name))
        if self.fail is not None:
            raise self.fail
        if self.dlq is not None:  # a sink that failed on a message routes it to the DLQ while flushing
            ckpt.buffer("in.dlq").append(self.dlq)

    async def committed(self) -> None:
        self.calls.append(("committed", self.name))


class FakeTable:
    def __init__(self, changes: dict):
        self.changes = changes

    def drain(self, into: dict) -> None:
        into.update(self.changes)
        self.changes = {}

    def committed(self) -> None:
        pass


class FakeSource:
    def __init__(self, node: str, payload: bytes, calls: list | None = None):
        self.node, self.payload, self.calls = node, payload, calls

    def snapshot(self, into: dict) -> None:
        into[self.node] = self.payload

    async def committed(self) -> None:
        if self.calls is not None:
            self.calls.append(("committed", self.node))


def make(calls, *, broker=None, every=100, interval=3600.0) -> Checkpoint:
    return Checkpoint(broker or RecordingBroker(calls), "shop.main", commit_interval=interval, commit_every=every)


# -- due ----------------------------------------------------------------------------------


def test_nothing_pending_is_never_due():
    ckpt = make([], interval=0.0, every=1)
    assert not ckpt.pending
    assert not ckpt.due(backlog=False) and not ckpt.due(backlog=True)
    ckpt.buffer("out")  # an empty buffer is not something to commit
    assert not ckpt.pending and not ckpt.due(backlog=False)


def test_due_when_the_input_is_drained_so_a_lone_message_is_not_held():
    ckpt = make([])
    ckpt.offsets[("in", 0)] = 1
    assert ckpt.pending
    assert ckpt.due(backlog=False)
    assert not ckpt.due(backlog=True)  # under load, wait for more


@pytest.mark.parametrize("what", ["offsets", "outputs", "count"])
def test_any_kind_of_work_is_pending(what):
    ckpt = make([])
    if what == "offsets":
        ckpt.offsets[("in", 0)] = 3
    elif what == "outputs":
        ckpt.buffer("out").append((None, b"1", None, 0))
    else:
        ckpt.count = 1
    assert ckpt.pending and ckpt.due(backlog=False)


def test_due_under_backlog_after_commit_every_messages():
    ckpt = make([], every=10)
    ckpt.count = 9
    assert not ckpt.due(backlog=True)
    ckpt.count = 10
    assert ckpt.due(backlog=True)


def test_due_under_backlog_after_commit_interval():
    ckpt = make([], every=10, interval=0.0)
    ckpt.count = 1
    assert ckpt.due(backlog=True)


# -- commit --------------------------------------------------------------------------------


def test_commit_flushes_sinks_before_the_broker_commits_and_hands_over_everything():
    calls: list = []
    ckpt = make(calls)
    ckpt.sinks = [RecordingSink("a", calls), RecordingSink("b", calls, dlq=(None, b"bad", None, 7))]
    ckpt.tables = [FakeTable({b"total\0k": b"s", b"total\0gone": None})]
    ckpt.sources = [FakeSource("numbers", b"ckpt", calls)]
    ckpt.on_commit.append(lambda: calls.append(("hook",)))
    ckpt.buffer("out").extend([(b"k", b"1", None, 1), (None, b"2", None, 2)])
    ckpt.buffer("empty")
    ckpt.offsets[("in", 0)] = 5
    ckpt.count = 3

    asyncio.run(ckpt.commit())

    assert calls == [
        ("flush", "a"),
        ("flush", "b"),
        ("commit", "shop.main",
         {"out": [(b"k", b"1", None, 1), (None, b"2", None, 2)], "in.dlq": [(None, b"bad", None, 7)]},
         {("in", 0): 5},
         {b"total\0k": b"s", b"total\0gone": None},
         {"numbers": b"ckpt"}),
        ("committed", "numbers"),  # sources and sinks hear of it only once the broker made it durable
        ("committed", "a"),
        ("committed", "b"),
        ("hook",),
    ]
    assert not ckpt.pending and not any(ckpt.outputs.values()) and ckpt.offsets == {} and ckpt.count == 0
    assert (ckpt.commits, ckpt.committed_messages) == (1, 3)


def test_a_commit_with_nothing_to_make_durable_does_not_call_the_broker():
    calls: list = []
    ckpt = make(calls)
    ckpt.sinks = [RecordingSink("a", calls)]
    asyncio.run(ckpt.commit())
    assert calls == [("flush", "a"), ("committed", "a")]  # the previous checkpoint is still the durable one
    assert ckpt.commits == 1


def test_outputs_after_a_commit_go_to_the_next_one():
    calls: list = []
    ckpt = make(calls)

    async def main():
        ckpt.buffer("out").append((None, b"1", None, 0))
        await ckpt.commit()
        ckpt.buffer("out").append((None, b"2", None, 0))
        await ckpt.commit()

    asyncio.run(main())
    assert [c[2] for c in calls] == [{"out": [(None, b"1", None, 0)]}, {"out": [(None, b"2", None, 0)]}]


def test_a_failing_sink_flush_stops_the_checkpoint_before_the_broker():
    calls: list = []
    ckpt = make(calls)
    ckpt.sinks = [RecordingSink("a", calls, fail=OSError("disk full")), RecordingSink("b", calls)]
    ckpt.on_commit.append(lambda: calls.append(("hook",)))
    ckpt.offsets[("in", 0)] = 5
    with pytest.raises(OSError, match="disk full"):
        asyncio.run(ckpt.commit())
    assert calls == [("flush", "a")]
    assert ckpt.commits == 0


def test_a_failing_broker_commit_is_not_reported_as_committed():
    calls: list = []
    ckpt = make(calls, broker=RecordingBroker(calls, fail=pipes.BrokerError("gone")))
    ckpt.on_commit.append(lambda: calls.append(("hook",)))
    ckpt.offsets[("in", 0)] = 5
    with pytest.raises(pipes.BrokerError):
        asyncio.run(ckpt.commit())
    assert [c[0] for c in calls] == ["commit"]
    assert ckpt.commits == 0 and ckpt.committed_messages == 0


def test_room_holds_sources_until_the_checkpoint_is_committed():
    calls: list = []
    ckpt = make(calls, every=2)
    woken = []
    ckpt.wake = lambda: woken.append(True)

    async def main():
        ckpt.count = 2
        waiting = asyncio.create_task(ckpt.room())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiting.done() and woken  # the runner was asked to commit
        await ckpt.commit()
        await asyncio.wait_for(waiting, 1)
        ckpt.count = 1
        await asyncio.wait_for(ckpt.room(), 1)  # below commit_every: no wait

    asyncio.run(main())


# -- sending ahead (Kafka, at least once) ----------------------------------------------------


class SendingBroker(RecordingBroker):
    """Records outputs handed over ahead of a checkpoint; each commit waits for a release."""

    sends_ahead = True

    def __init__(self, calls: list):
        super().__init__(calls)
        self.release = asyncio.Event()

    def send_ahead(self, outputs: dict) -> asyncio.Future:
        self.calls.append(("send", {t: list(o) for t, o in outputs.items()}))
        sent = asyncio.get_running_loop().create_future()
        sent.set_result({})
        return sent

    async def commit(self, group: str, changes: Changes) -> None:
        await self.release.wait()
        self.calls.append(("commit", {t: list(o) for t, o in changes.outputs.items()}, len(changes.sent),
                           dict(changes.offsets)))


def sending(calls: list, every: int = 100) -> Checkpoint:
    return Checkpoint(SendingBroker(calls), "shop.main", commit_interval=3600.0, commit_every=every,
                      sends_ahead=True)


def test_outputs_sent_ahead_are_pending_and_the_next_checkpoint_waits_for_their_acks():
    calls: list = []
    ckpt = sending(calls)

    async def main():
        ckpt.broker.release.set()
        ckpt.buffer("out").append((None, b"1", None, 0))
        ckpt.send_ahead()
        assert not any(ckpt.outputs.values()) and ckpt.pending  # handed over, not yet covered
        ckpt.buffer("out").append((None, b"2", None, 0))
        ckpt.offsets[("in", 0)] = 2
        await ckpt.commit()

    asyncio.run(main())
    assert calls == [("send", {"out": [(None, b"1", None, 0)]}),
                     ("commit", {"out": [(None, b"2", None, 0)]}, 1, {("in", 0): 2})]
    assert not ckpt.pending


def test_while_a_checkpoint_lands_the_next_outputs_go_ahead_and_the_runner_is_not_held():
    calls: list = []
    ckpt = sending(calls, every=10)

    async def main():
        ckpt.offsets[("in", 0)] = 1
        ckpt.count = 10
        await ckpt.advance()  # nothing in flight: taken, and landing (the broker waits)
        assert ckpt.landing
        ckpt.buffer("out").append((None, b"b", None, 0))
        ckpt.offsets[("in", 0)] = 2
        ckpt.count = 10
        ckpt.send_ahead()  # as the runner does after each batch
        await asyncio.wait_for(ckpt.advance(), 1)  # not held by the landing
        assert calls == [("send", {"out": [(None, b"b", None, 0)]})]
        ckpt.count = 20  # twice commit_every collected: now the runner waits for the landing
        advancing = asyncio.ensure_future(ckpt.advance())
        await asyncio.sleep(0.01)
        assert not advancing.done()
        ckpt.broker.release.set()
        await asyncio.wait_for(advancing, 1)
        await ckpt.landed()

    asyncio.run(main())
    assert calls == [("send", {"out": [(None, b"b", None, 0)]}),
                     ("commit", {}, 0, {("in", 0): 1}),
                     ("commit", {}, 1, {("in", 0): 2})]


def test_commit_on_the_embedded_broker_partitions_outputs_by_key(tmp_path):
    async def main():
        broker = LocalBroker(str(tmp_path / "db"), pipes.Settings(partitions=4))
        try:
            ckpt = Checkpoint(broker, "shop.main", commit_interval=1.0, commit_every=100)
            ckpt.tables = [FakeTable({b"total\0\0\0\0\0k": pickle.dumps({"n": 1})})]
            keys = [f"k{i}".encode() for i in range(20)]
            ckpt.buffer("out").extend((k, b"v", None, 0) for k in keys)
            ckpt.offsets[("in", 0)] = 20
            await ckpt.commit()
            placed = {}
            for p in range(4):
                for rec in broker.read("out", p, 0, 100):
                    placed[rec[1]] = p
            return (placed, {k: key_hash(k) % 4 for k in keys}, broker.store.offsets("shop.main"),
                    broker.store.get("state", b"total\0\0\0\0\0k"))
        finally:
            await broker.close()

    placed, expected, offsets, state = asyncio.run(main())
    assert placed == expected
    assert len(set(placed.values())) > 1
    assert offsets == {("in", 0): 20}
    assert pickle.loads(state) == {"n": 1}

