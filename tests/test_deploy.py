"""`pipes deploy`: one Kubernetes Deployment or compose service per topology, checked by
parsing the YAML (no cluster runs here): structure, replicas, env, probes, grace period."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

yaml = pytest.importorskip("yaml")

APP = textwrap.dedent('''
    import pipes

    app = pipes.App("Shop_App", commit_interval=0.5, shutdown_timeout=20)
    orders = app.topic("orders", partitions=6)
    billing = app.topology("billing")
    app.source([{"id": 1}], to=orders, name="orders_in")


    @app.transform(orders, to="big_orders")
    def big(order):
        return order


    @billing.sink(app.topic("big_orders", partitions=4))
    def invoice(order):
        pass
''')


def deploy(tmp_path, *args: str) -> subprocess.CompletedProcess:
    app = tmp_path / "shop.py"
    app.write_text(APP)
    return subprocess.run([sys.executable, "-m", "pipes", "deploy", "-A", str(app), *args], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)


def test_k8s_deployment_per_topology_on_kafka(tmp_path):
    out = tmp_path / "k8s"
    run = deploy(tmp_path, "--broker", "kafka://kafka-0:9092,kafka-1:9092", "--format", "k8s", "--out", str(out),
                 "--image", "registry.local/shop:1.2")
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["shop-app-billing.yaml", "shop-app-main.yaml"]
    for topology, partitions in (("main", 6), ("billing", 4)):
        docs = list(yaml.safe_load_all((out / f"shop-app-{topology}.yaml").read_text()))
        assert [d["kind"] for d in docs] == ["Deployment"]  # state comes back from changelogs: no volume claim
        d = docs[0]
        assert d["apiVersion"] == "apps/v1" and d["metadata"]["name"] == f"shop-app-{topology}"
        assert d["metadata"]["annotations"]["pipes/consumer-group"] == f"Shop_App.{topology}"
        spec = d["spec"]
        assert spec["replicas"] == partitions  # one worker per partition of its largest input, at most
        assert spec["selector"]["matchLabels"] == spec["template"]["metadata"]["labels"]
        pod = spec["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] > 20  # outlasts shutdown_timeout: SIGTERM drains first
        (c,) = pod["containers"]
        assert c["image"] == "registry.local/shop:1.2"
        assert c["command"] == ["pipes", "worker", "-A", str(tmp_path / "shop.py"), "--topology", topology,
                                "--web", "0.0.0.0:6066"]
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["PIPES_BROKER"] == "kafka://kafka-0:9092,kafka-1:9092"
        assert env["PIPES_COMMIT_INTERVAL"] == "0.5" and env["PIPES_SHUTDOWN_TIMEOUT"] == "20"
        assert all(isinstance(v, str) for v in env.values())
        assert c["ports"] == [{"name": "web", "containerPort": 6066}]
        assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "web"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "web"}
        assert spec["template"]["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"

    fewer = deploy(tmp_path, "--broker", "kafka://k:9092", "--topology", "main", "--replicas", "2")
    assert fewer.returncode == 0, fewer.stderr
    (d,) = yaml.safe_load_all(fewer.stdout)
    assert d["spec"]["replicas"] == 2 and d["metadata"]["name"] == "shop-app-main"
    more = deploy(tmp_path, "--broker", "kafka://k:9092", "--topology", "main", "--replicas", "50")
    assert yaml.safe_load(more.stdout)["spec"]["replicas"] == 6  # idle workers would be pointless


def test_on_local_one_replica_with_a_volume(tmp_path):
    run = deploy(tmp_path, "--topology", "main")
    assert run.returncode == 0, run.stderr
    deployment, claim = yaml.safe_load_all(run.stdout)
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert deployment["spec"]["template"]["spec"]["volumes"] == [
        {"name": "data", "persistentVolumeClaim": {"claimName": "shop-app-main-data"}}]
    assert claim["kind"] == "PersistentVolumeClaim" and claim["metadata"]["name"] == "shop-app-main-data"


def test_compose_service_per_topology(tmp_path):
    run = deploy(tmp_path, "--broker", "kafka://kafka:9092", "--format", "compose", "--out", str(tmp_path / "c"),
                 "--port", "7000")
    assert run.returncode == 0, run.stderr
    doc = yaml.safe_load((tmp_path / "c" / "compose.yaml").read_text())
    assert set(doc["services"]) == {"shop-app-main", "shop-app-billing"}
    s = doc["services"]["shop-app-billing"]
    assert s["command"][-4:] == ["--topology", "billing", "--web", "0.0.0.0:7000"]
    assert s["environment"]["PIPES_BROKER"] == "kafka://kafka:9092"
    assert s["stop_signal"] == "SIGTERM" and s["stop_grace_period"] == "35s"
    assert "http://127.0.0.1:7000/ready" in s["healthcheck"]["test"][-1]
    assert s["deploy"]["replicas"] == 4
