"""Built-in sources and sinks, written against the same API as user connectors.

A sink is an object with ``write(batch)`` (a list of values) and optionally
``flush()``, ``open()`` and ``close()``; each may be sync or async. The runtime calls
``flush()`` at every checkpoint, before the checkpoint is made durable.
"""

from .files import JsonLines
from .postgres import PostgresSink, PostgresSource
from .redis import RedisStreamSink, RedisStreamSource
from .stdio import Stdout

__all__ = ["JsonLines", "PostgresSink", "PostgresSource", "RedisStreamSink", "RedisStreamSource", "Stdout"]
