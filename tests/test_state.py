"""pipes.state.StateTable: a dict per key, read-your-writes, written back at checkpoints."""

from __future__ import annotations

import pickle

import pytest

from pipes.state import StateTable
from pipes.store import Store, state_prefix


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "db"))
    yield s
    s.close()


def commit(store: Store, table: StateTable) -> dict:
    """What a checkpoint does with a table: drain it into one write batch."""
    changes: dict = {}
    table.drain(changes)
    wb = store.batch()
    store.stage_state(wb, changes)
    store.write(wb)
    return changes


def test_a_new_key_has_an_empty_state_and_reads_its_own_writes(store):
    table = StateTable(store, "total")
    state = table.get(0, b"c1")
    assert state == {}
    state["sum"] = 10
    again = table.get(0, b"c1")
    assert again is state and again == {"sum": 10}


def test_keys_and_partitions_are_separate(store):
    table = StateTable(store, "total")
    table.get(0, b"a")["n"] = 1
    table.get(0, b"b")["n"] = 2
    table.get(1, b"a")["n"] = 3
    table.get(0, None)["n"] = 4
    assert [table.get(0, b"a"), table.get(0, b"b"), table.get(1, b"a"), table.get(0, None)] == [
        {"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}]
    commit(store, table)
    assert dict(store.scan("state", state_prefix("total", 0))) == {
        state_prefix("total", 0) + b"": pickle.dumps({"n": 4}, protocol=5),
        state_prefix("total", 0) + b"a": pickle.dumps({"n": 1}, protocol=5),
        state_prefix("total", 0) + b"b": pickle.dumps({"n": 2}, protocol=5),
    }
    assert [k for k, _ in store.scan("state", state_prefix("total", 1))] == [state_prefix("total", 1) + b"a"]


def test_nodes_do_not_share_state(store):
    StateTable(store, "one").get(0, b"k")["v"] = 1
    other = StateTable(store, "two")
    assert other.get(0, b"k") == {}


def test_drain_hands_over_touched_keys_once(store):
    table = StateTable(store, "total")
    table.get(0, b"a")["n"] = 1
    first = commit(store, table)
    assert first == {state_prefix("total", 0) + b"a": pickle.dumps({"n": 1}, protocol=5)}
    assert commit(store, table) == {}  # nothing touched since
    table.get(0, b"a")["n"] += 1  # cached: no read from the store, still read-your-writes
    assert commit(store, table) == {state_prefix("total", 0) + b"a": pickle.dumps({"n": 2}, protocol=5)}


def test_committed_state_is_given_back_to_a_new_table(store):
    table = StateTable(store, "total")
    table.get(2, b"c1").update({"sum": 1.5, "items": [1, 2]})
    commit(store, table)
    fresh = StateTable(store, "total")
    assert fresh.get(2, b"c1") == {"sum": 1.5, "items": [1, 2]}
    assert fresh.get(1, b"c1") == {}


def test_an_empty_dict_deletes_the_key(store):
    table = StateTable(store, "total")
    table.get(0, b"a")["n"] = 1
    table.get(0, b"b")["n"] = 2
    commit(store, table)

    table.get(0, b"a").clear()
    changes = commit(store, table)
    assert changes == {state_prefix("total", 0) + b"a": None}
    assert [k for k, _ in store.scan("state", state_prefix("total", 0))] == [state_prefix("total", 0) + b"b"]
    assert StateTable(store, "total").get(0, b"a") == {}
    assert table.get(0, b"a") == {}


def test_forget_drops_uncommitted_changes(store):
    table = StateTable(store, "total")
    table.get(0, b"a")["n"] = 1
    commit(store, table)
    table.get(0, b"a")["n"] = 99
    table.get(0, b"new")["n"] = 5
    table.forget()
    assert table.get(0, b"a") == {"n": 1}
    assert table.get(0, b"new") == {}
    changes = commit(store, table)
    assert changes[state_prefix("total", 0) + b"a"] == pickle.dumps({"n": 1}, protocol=5)
    assert changes.get(state_prefix("total", 0) + b"new") is None  # read, never written
    assert StateTable(store, "total").get(0, b"a") == {"n": 1}
