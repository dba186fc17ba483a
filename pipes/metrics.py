"""What a worker counts, and its rendering in the Prometheus text format.

The runner updates a :class:`NodeMetrics` once per polled batch of a partition (not per
message) and a :class:`TopologyMetrics` once per checkpoint; everything else (errors,
DLQ counts, consumer lag, state size) is read when ``/metrics`` is scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Iterable

BATCH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CHECKPOINT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds
        self.count += 1


class NodeMetrics:
    """Messages in and out of one transform or sink, and how long its batches took."""

    __slots__ = ("messages_in", "messages_out", "batches")

    def __init__(self) -> None:
        self.messages_in = 0
        self.messages_out = 0  # to the node's declared output topics
        self.batches = Histogram(BATCH_BUCKETS)


class TopologyMetrics:
    """Survives the topology's restarts: counters keep counting across them."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeMetrics] = {}
        self.checkpoints = Histogram(CHECKPOINT_BUCKETS)
        self.restarts = 0
        self.last_checkpoint: float | None = None  # wall-clock time of the last durable checkpoint

    def node(self, node_id: str) -> NodeMetrics:
        m = self.nodes.get(node_id)
        if m is None:
            m = self.nodes[node_id] = NodeMetrics()
        return m


def _labels(labels: dict[str, Any]) -> str:
    def esc(v: Any) -> str:
        return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in labels.items()) + "}" if labels else ""


def _num(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


class Exposition:
    """Metric families written one after the other, each with its HELP and TYPE lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help: str, samples: Iterable[tuple[dict, float]]) -> None:
        self.lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
        self.lines += [f"{name}{_labels(labels)} {_num(value)}" for labels, value in samples]

    def histogram(self, name: str, help: str, items: Iterable[tuple[dict, Histogram]]) -> None:
        self.lines += [f"# HELP {name} {help}", f"# TYPE {name} histogram"]
        for labels, h in items:
            total = 0
            for bound, n in zip((*h.bounds, "+Inf"), h.counts):
                total += n
                le = bound if bound == "+Inf" else repr(float(bound))
                self.lines.append(f"{name}_bucket{_labels({**labels, 'le': le})} {total}")
            self.lines.append(f"{name}_sum{_labels(labels)} {_num(h.sum)}")
            self.lines.append(f"{name}_count{_labels(labels)} {h.count}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def node_stats(workers: list[Any]) -> dict[str, dict[str, Any]]:
    """Per node of the running topologies: kind, topology, messages in and out (a source's
    out: what it produced), errors, DLQ count and the consumer lag of its inputs."""
    out: dict[str, dict[str, Any]] = {}
    for w in workers:
        runner, metrics = w.runner, w.metrics
        lag = runner.consumer.lag() if runner is not None and runner.consumer is not None and runner.started else {}
        live_sources = {s.id: s.produced for s in runner.sources} if runner is not None else {}
        procs = {p.node.id: p for p in [*runner.transforms, *runner.sinks]} if runner is not None else {}
        for node in w.topology.nodes:
            m = metrics.node(node.id)
            row = {"kind": node.kind, "topology": w.topology.name, "in": m.messages_in,
                   "out": m.messages_out + live_sources.get(node.id, 0), "errors": 0, "dlq": 0,
                   "lag": sum(n for (t, _), n in lag.items() if t in node.inputs)}
            failures = getattr(procs.get(node.id), "failures", None)
            if failures is not None:
                row["errors"] = sum(failures.counts.values())
                row["dlq"] = row["errors"] if node.on_error == "dlq" else 0
            out[node.id] = row
    return out


def prometheus(workers: list[Any], store: Any) -> str:
    """Every metric of a worker in the Prometheus text format (version 0.0.4)."""
    from .store import state_prefix

    stats = node_stats(workers)
    nodes = [(w, n) for w in workers for n in w.topology.nodes]
    e = Exposition()

    def per_node(field: str, kinds: tuple[str, ...]) -> list[tuple[dict, float]]:
        return [({"topology": w.topology.name, "node": n.id}, stats[n.id][field]) for w, n in nodes if n.kind in kinds]

    e.family("pipes_messages_in_total", "counter", "Messages a transform or sink consumed.",
             per_node("in", ("transform", "sink")))
    e.family("pipes_messages_out_total", "counter",
             "Messages a node wrote to its declared output topics (a source: messages it produced).",
             per_node("out", ("source", "transform")))
    e.family("pipes_errors_total", "counter", "Messages a node failed on (undecodable, or its function raised).",
             per_node("errors", ("transform", "sink")))
    e.family("pipes_dlq_messages_total", "counter", "Messages a node sent to a dead-letter topic.",
             per_node("dlq", ("transform", "sink")))
    e.histogram("pipes_batch_seconds", "Time a node took for one polled batch of one partition.",
                [({"topology": w.topology.name, "node": n.id}, w.metrics.node(n.id).batches)
                 for w, n in nodes if n.kind != "source"])
    e.histogram("pipes_checkpoint_seconds", "Time from collecting a checkpoint's changes until they are durable.",
                [({"topology": w.topology.name}, w.metrics.checkpoints) for w in workers])
    e.family("pipes_last_checkpoint_timestamp_seconds", "gauge", "When the last checkpoint became durable.",
             [({"topology": w.topology.name}, w.metrics.last_checkpoint) for w in workers
              if w.metrics.last_checkpoint is not None])
    lag = []
    for w in workers:
        r = w.runner
        if r is not None and r.consumer is not None and r.started:
            lag += [({"topology": w.topology.name, "topic": t, "partition": p}, n)
                    for (t, p), n in sorted(r.consumer.lag().items()) if t != r.lease]
    e.family("pipes_consumer_lag", "gauge", "Messages of an assigned partition not yet consumed.", lag)
    sizes = []
    for w, n in nodes:
        if n.stateful and w.runner is not None:
            parts = {p for (t, p) in (w.runner.consumer.assignment() if w.runner.consumer else {}) if t in n.inputs}
            keys = sum(1 for p in parts for _ in store.scan("state", state_prefix(n.id, p)))
            sizes.append(({"topology": w.topology.name, "node": n.id}, keys))
    e.family("pipes_state_keys", "gauge", "Keys a stateful node holds, in the partitions assigned here "
             "(as of the last checkpoint).", sizes)
    e.family("pipes_restarts_total", "counter", "Times a topology was restarted after a crash.",
             [({"topology": w.topology.name}, w.metrics.restarts) for w in workers])
    e.family("pipes_ready", "gauge", "1 once the topology is started, assigned and restored.",
             [({"topology": w.topology.name}, int(w.ready)) for w in workers])
    return e.text()
