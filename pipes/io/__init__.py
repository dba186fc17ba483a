"""Built-in sources and sinks, written against the same API as user connectors.

A sink is an object with ``write(batch)`` (a list of values) and optionally
``flush()``, ``open()`` and ``close()``; each may be sync or async. The runtime calls
``flush()`` at every checkpoint, before the checkpoint is made durable.
"""

from .batching import Batcher
from .dataset import Dataset
from .files import CSV, Files, JsonLines, Parquet
from .http import HTTP, SSE, HTTPIngest
from .kafka_topic import KafkaTopic, KafkaTopicSink
from .mqtt import MQTT, MQTTSink
from .nats import NATS, NATSSink
from .postgres import PostgresSink, PostgresSource
from .redis import RedisStreamSink, RedisStreamSource
from .sqs import SQS, SQSSink
from .stdio import Stdout

__all__ = [
    "Batcher", "CSV", "Dataset", "Files", "HTTP", "HTTPIngest", "JsonLines", "KafkaTopic", "KafkaTopicSink", "MQTT",
    "MQTTSink", "NATS", "NATSSink", "Parquet", "PostgresSink", "PostgresSource", "RedisStreamSink",
    "RedisStreamSource", "SQS", "SQSSink", "SSE", "Stdout",
]
