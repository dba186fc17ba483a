"""Deployment manifests: one Kubernetes Deployment or compose service per topology.

Each topology is one consumer group, so it is one deployable unit. Its workers share the
partitions of its input topics, so more replicas than the largest input's partition count
would sit idle: that is the maximum. On ``local://`` the data directory belongs to one
process, so a topology gets one replica, a persistent volume and the ``Recreate``
strategy. Every worker serves ``--web 0.0.0.0:PORT``: the probes use ``/health`` and
``/ready``, and the grace period outlasts ``shutdown_timeout`` so SIGTERM can drain.
"""

from __future__ import annotations

import re
from dataclasses import fields
from typing import Any

import orjson

from .errors import ConfigError
from .settings import Settings
from .topology import Graph, Topology

DATA_DIR = "/var/lib/pipes"
_NOT_PASSED = {"broker", "data_dir", "web", "log_format"}  # set explicitly below


def dns_name(text: str) -> str:
    """A Kubernetes object name (RFC 1123 label) from an app and topology name."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63].strip("-")
    if not name:
        raise ConfigError(f"cannot make a Kubernetes name from {text!r}")
    return name


def max_replicas(graph: Graph, topology: Topology) -> int:
    """How many workers of `topology` get work: the partition count of its largest input."""
    return max([graph.topics[t].partitions for t in topology.input_topics] or [1])


def environment(settings: Settings) -> dict[str, str]:
    """PIPES_* variables for every setting that differs from the default."""
    env = {"PIPES_BROKER": settings.broker, "PIPES_DATA_DIR": DATA_DIR, "PIPES_LOG_FORMAT": "json"}
    default = Settings()
    for f in fields(Settings):
        value = getattr(settings, f.name)
        if f.name not in _NOT_PASSED and value != getattr(default, f.name) and value is not None:
            env[f"PIPES_{f.name.upper()}"] = str(value)
    return env


def manifests(graph: Graph, settings: Settings, *, app_ref: str, fmt: str, topologies: list[str] | None,
              image: str, port: int, replicas: int | None) -> dict[str, str]:
    """File name -> YAML text: ``<app>-<topology>.yaml`` per topology (k8s), or one
    ``compose.yaml`` holding a service per topology."""
    if replicas is not None and replicas < 1:
        raise ConfigError(f"--replicas {replicas}: must be at least 1")
    local = not settings.broker.startswith("kafka")
    units = []
    for topo in graph.select(topologies):
        most = 1 if local else max_replicas(graph, topo)
        units.append((topo, min(replicas or most, most)))
    if fmt == "k8s":
        return {f"{dns_name(f'{graph.app}-{t.name}')}.yaml": "---\n".join(
            to_yaml(doc) for doc in k8s(graph, t, settings, app_ref, image, port, n, local)) for t, n in units}
    services = {dns_name(f"{graph.app}-{t.name}"): compose_service(graph, t, settings, app_ref, image, port, n, local)
                for t, n in units}
    doc: dict[str, Any] = {"services": services}
    if local:
        doc["volumes"] = {f"{name}-data": {} for name in services}
    return {"compose.yaml": to_yaml(doc)}


def _command(app_ref: str, topo: Topology, port: int) -> list[str]:
    return ["pipes", "worker", "-A", app_ref, "--topology", topo.name, "--web", f"0.0.0.0:{port}"]


def k8s(graph: Graph, topo: Topology, settings: Settings, app_ref: str, image: str, port: int, replicas: int,
        local: bool) -> list[dict[str, Any]]:
    name = dns_name(f"{graph.app}-{topo.name}")
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": dns_name(graph.app),
              "pipes/topology": dns_name(topo.name)}
    probe = {"port": "web"}
    container = {
        "name": "worker", "image": image, "command": _command(app_ref, topo, port),
        "env": [{"name": k, "value": v} for k, v in environment(settings).items()],
        "ports": [{"name": "web", "containerPort": port}],
        "livenessProbe": {"httpGet": {"path": "/health", **probe}, "periodSeconds": 10, "failureThreshold": 3},
        "readinessProbe": {"httpGet": {"path": "/ready", **probe}, "periodSeconds": 5},
        "startupProbe": {"httpGet": {"path": "/health", **probe}, "periodSeconds": 2, "failureThreshold": 30},
        "volumeMounts": [{"name": "data", "mountPath": DATA_DIR}],
    }
    volume = ({"name": "data", "persistentVolumeClaim": {"claimName": f"{name}-data"}} if local
              else {"name": "data", "emptyDir": {}})  # on Kafka, state is restored from changelogs
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": labels,
                     "annotations": {"pipes/consumer-group": topo.group,
                                     "pipes/max-replicas": str(1 if local else max_replicas(graph, topo))}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "strategy": {"type": "Recreate"} if local else {"type": "RollingUpdate"},
            "template": {
                "metadata": {"labels": labels, "annotations": {"prometheus.io/scrape": "true",
                                                               "prometheus.io/port": str(port),
                                                               "prometheus.io/path": "/metrics"}},
                "spec": {
                    # SIGTERM drains and checkpoints within shutdown_timeout; the kill comes later.
                    "terminationGracePeriodSeconds": int(settings.shutdown_timeout) + 15,
                    "containers": [container],
                    "volumes": [volume],
                },
            },
        },
    }
    docs = [deployment]
    if local:
        docs.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                     "metadata": {"name": f"{name}-data", "labels": labels},
                     "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}}}})
    return docs


def compose_service(graph: Graph, topo: Topology, settings: Settings, app_ref: str, image: str, port: int,
                    replicas: int, local: bool) -> dict[str, Any]:
    name = dns_name(f"{graph.app}-{topo.name}")
    ready = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/ready', timeout=2)"
    service: dict[str, Any] = {
        "image": image,
        "command": _command(app_ref, topo, port),
        "environment": environment(settings),
        "stop_signal": "SIGTERM",
        "stop_grace_period": f"{int(settings.shutdown_timeout) + 15}s",
        "healthcheck": {"test": ["CMD", "python", "-c", ready], "interval": "10s", "timeout": "3s", "retries": 3},
        "restart": "unless-stopped",
        "labels": {"pipes.consumer-group": topo.group},
        "deploy": {"replicas": replicas},
    }
    if local:
        service["volumes"] = [f"{name}-data:{DATA_DIR}"]
    return service


def to_yaml(value: Any, indent: int = 0) -> str:
    """Block-style YAML; every string value double-quoted (JSON escapes are valid YAML), so
    nothing is read back as a number, a boolean or null by mistake."""
    return "\n".join(_lines(value, indent)) + "\n"


_PLAIN_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_./-]*")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


def _key(k: Any) -> str:
    k = str(k)
    return k if _PLAIN_KEY.fullmatch(k) and k.lower() not in _YAML_WORDS else _scalar(k)


def _scalar(v: Any) -> str:
    if isinstance(v, bool) or v is None or isinstance(v, (int, float)):
        return orjson.dumps(v).decode()
    return orjson.dumps(str(v)).decode()


def _lines(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return [pad + "{}"]
        out = []
        for k, v in value.items():
            key = _key(k)
            if isinstance(v, (dict, list)) and v:
                out.append(f"{pad}{key}:")
                out += _lines(v, indent + 2)
            else:
                out.append(f"{pad}{key}: {_lines(v, 0)[0]}")
        return out
    if isinstance(value, list):
        if not value:
            return [pad + "[]"]
        out = []
        for item in value:
            inner = _lines(item, indent + 2)
            out.append(f"{pad}- {inner[0].lstrip()}")
            out += inner[1:]
        return out
    return [pad + _scalar(value)]
