"""The progress line of a long run on a terminal: messages, rate and lag, redrawn in place."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any, TextIO


def counts(workers: list[Any]) -> tuple[int, int]:
    """(messages consumed and produced so far, consumer lag) of the running topologies."""
    done = lag = 0
    for w in workers:
        done += sum(w.counts())
        r = w.runner
        if r is not None and r.started and r.consumer is not None:
            lag += sum(n for (t, _), n in r.consumer.lag().items() if t != r.lease)
    return done, lag


async def show_progress(workers: list[Any], stream: TextIO = sys.stderr, every: float = 0.5) -> None:
    """Redraw the line every `every` seconds until cancelled, then erase it."""
    began = last_t = time.monotonic()
    last_n = 0
    try:
        while True:
            await asyncio.sleep(every)
            n, lag = counts(workers)
            now = time.monotonic()
            rate = (n - last_n) / (now - last_t) if now > last_t else 0.0
            last_n, last_t = n, now
            stream.write(f"\r\x1b[Kpipes: {n:,} messages, {rate:,.0f} msg/s, lag {lag:,}, {now - began:,.0f} s")
            stream.flush()
    finally:
        stream.write("\r\x1b[K")
        stream.flush()
