"""The two per-record steps of kafka:// that aiokafka's public API makes slow, done directly.

* Consuming: aiokafka builds a ``ConsumerRecord`` (eleven fields, in Python) for every
  fetched record, which pipes then turned into its own ``Polled`` tuple, one at a time. A
  consumer made with ``value_deserializer=AS_TUPLES`` gets the tuples straight from the
  record batches, a whole batch per list comprehension (0.30 µs a record instead of 1.05
  µs through ConsumerRecord and 0.34 µs through a generator, on 5,000-record batches).
* Producing: ``BatchBuilder.append`` wraps the record-batch builder with keyword
  arguments, a serializer step and a metadata object; :func:`fill` appends to the
  builder itself (0.17 µs a record instead of 0.35 µs).

Both use aiokafka internals (``PartitionRecords``, ``FetchResult.getall``, ``BatchBuilder._builder``),
which is why pyproject pins aiokafka to the 0.14 series; tests/test_kafka.py checks that
pipes' consumers get tuples. Other consumers in the process, without the marker, are
untouched.
"""

from __future__ import annotations

import sys
from typing import Any

from aiokafka.consumer import fetcher
from aiokafka.errors import CorruptRecordException

_NO_HEADERS: list = []  # the builder only reads it


class _AsTuples:
    """The value deserializer that marks a pipes consumer: records come as Polled tuples
    ``(offset, key, value, headers, timestamp_ms)``, a missing value as b\"\"."""

    def __call__(self, value: bytes | None) -> bytes | None:  # not called on the fast path
        return value

    def __repr__(self) -> str:
        return "pipes.AS_TUPLES"


AS_TUPLES = _AsTuples()


class PartitionRecords(fetcher.PartitionRecords):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # pipes' consumers reading uncommitted records take whole record batches at a time.
        self.whole_batches = (self._value_deserializer is AS_TUPLES
                              and self._isolation_level == fetcher.READ_UNCOMMITTED)
        self._floor = self.next_fetch_offset  # past every record batch read so far
        self._left: list = []  # read, not yet handed out

    def __iter__(self) -> Any:
        # FetchResult.getall() loops `for msg in` this: hand it the generator itself, so each
        # record skips __next__'s extra call (getone() still goes through __next__).
        return self._records_iterator if self._records_iterator is not None else iter(())

    def take(self, limit: int) -> list:
        """Up to `limit` records as Polled tuples, read a whole record batch at a time (a
        batch's rest waits for the next call): 0.30 µs a record against 0.34 one at a time."""
        out = self._left
        records = self._records
        while len(out) < limit and records.has_next():
            batch = records.next_batch()
            if self._check_crcs and not batch.validate_crc():
                raise CorruptRecordException(f"Invalid CRC - {self._tp}")
            if not batch.is_control_batch:
                got = [(r.offset, r.key, r.value or b"", tuple(r.headers) or None, r.timestamp) for r in batch]
                if got and got[0][0] < self._floor:  # a compacted or re-fetched batch starts before it
                    floor = self._floor
                    got = [rec for rec in got if rec[0] >= floor]
                out += got
            self._floor = batch.next_offset
        if len(out) > limit:
            out, self._left = out[:limit], out[limit:]
            self.next_fetch_offset = out[-1][0] + 1
        else:
            self._left = []
            self.next_fetch_offset = self._floor
        return out

    @property
    def exhausted(self) -> bool:
        return not self._left and not self._records.has_next()

    def _unpack_records(self) -> Any:
        if self._value_deserializer is not AS_TUPLES:
            yield from super()._unpack_records()
            return
        if self._isolation_level != fetcher.READ_UNCOMMITTED:  # exactly-once: aiokafka drops aborted records
            for m in super()._unpack_records():
                yield m.offset, m.key, m.value or b"", m.headers or None, m.timestamp
            return
        while not self.exhausted:  # getone(): one record at a time
            yield from self.take(1)


class FetchResult(fetcher.FetchResult):
    def getall(self, max_records: int | None = None) -> list:
        records = self._partition_records
        if records is None or not records.whole_batches:
            return super().getall(max_records)
        if not self.check_assignment(self._topic_partition):
            return []
        out = records.take(max_records or sys.maxsize)
        self._update_position()
        if records.exhausted:
            self._partition_records = None
        return out


# The classes aiokafka's Fetcher instantiates.
fetcher.PartitionRecords = PartitionRecords
fetcher.FetchResult = FetchResult


def fill(batch: Any, outputs: list, start: int) -> int:
    """Append ``outputs[start:]`` (key, value, headers, timestamp_ms) to a producer batch
    until it is full; close it and return how many went in."""
    append = batch._builder.append
    n = 0
    for i in range(start, len(outputs)):
        key, value, headers, ts = outputs[i]
        if append(n, ts or None, key, value, list(headers) if headers else _NO_HEADERS) is None:
            break
        n += 1
    batch._relative_offset = n
    batch.close()
    return n


def position(consumer: Any, tp: Any) -> int | None:
    """A consumer's position in an assigned partition, or None while it has none (during a
    rebalance, before its committed offset is known). Past what records it handed out, it
    also moves past transaction markers, which no record reports."""
    subscription = consumer._subscription.subscription
    if subscription is None or subscription.assignment is None:
        return None
    state = subscription.assignment.state_value(tp)
    return state.position if state is not None and state.has_valid_position else None
