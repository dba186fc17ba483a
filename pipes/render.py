"""Drawing a Graph as text, mermaid or Graphviz dot."""

from __future__ import annotations

from .topology import Graph, Node


def _label(n: Node) -> str:
    extra = []
    if n.stateful:
        extra.append("keyed state")
    if n.key is not None:
        extra.append(f"key={n.key if isinstance(n.key, str) else getattr(n.key, '__name__', 'fn')}")
    if n.batch:
        extra.append(f"batch={n.batch}")
    return f"{n.kind} {n.id}" + (f" ({', '.join(extra)})" if extra else "")


def text(graph: Graph) -> str:
    lines = [f"app {graph.app}"]
    for topo in graph.topologies.values():
        lines.append(f"  topology {topo.name} (consumer group {topo.group})")
        for n in topo.nodes:
            ins = ", ".join(n.inputs)
            outs = ", ".join(n.outputs)
            arrow = f"{ins or '-'} -> {outs or '-'}"
            lines.append(f"    {_label(n):<40} {arrow}")
    lines.append("  topics")
    for t in graph.topics.values():
        flags = [f"{t.partitions} partition{'s' if t.partitions != 1 else ''}", t.value_serializer.name]
        if t.keyed:
            flags.append("keyed")
        if t.internal:
            flags.append("internal")
        lines.append(f"    {t.name:<30} {', '.join(flags)}")
    return "\n".join(lines)


def _ids(graph: Graph) -> dict[str, str]:
    ids = {}
    for i, t in enumerate(graph.topics):
        ids[f"topic:{t}"] = f"t{i}"
    for i, n in enumerate(graph.nodes()):
        ids[n.id] = f"n{i}"
    return ids


def mermaid(graph: Graph) -> str:
    ids = _ids(graph)
    lines = ["flowchart LR"]
    for t in graph.topics:
        lines.append(f'  {ids["topic:" + t]}[("{t}")]')
    for topo in graph.topologies.values():
        lines.append(f'  subgraph {topo.name}["topology {topo.name}"]')
        for n in topo.nodes:
            lines.append(f'    {ids[n.id]}["{_label(n)}"]')
        lines.append("  end")
    for a, b in graph.edges():
        lines.append(f"  {ids[a]} --> {ids[b]}")
    return "\n".join(lines)


def dot(graph: Graph) -> str:
    ids = _ids(graph)
    lines = [f'digraph "{graph.app}" {{', "  rankdir=LR;"]
    for t in graph.topics:
        lines.append(f'  {ids["topic:" + t]} [label="{t}", shape=cylinder];')
    for topo in graph.topologies.values():
        lines.append(f'  subgraph "cluster_{topo.name}" {{ label="topology {topo.name}";')
        for n in topo.nodes:
            lines.append(f'    {ids[n.id]} [label="{_label(n)}", shape=box];')
        lines.append("  }")
    for a, b in graph.edges():
        lines.append(f"  {ids[a]} -> {ids[b]};")
    lines.append("}")
    return "\n".join(lines)


FORMATS = {"text": text, "mermaid": mermaid, "dot": dot}
