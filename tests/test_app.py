"""pipes.App: what the decorators record, and the errors an app gets when it is loaded."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest

import pipes
from pipes.errors import ConfigError

THIS_FILE = __file__.rsplit("/", 1)[-1]


# -- destinations and names --------------------------------------------------------------


def test_transform_without_to_names_the_function_and_the_fix():
    app = pipes.App("shop")
    with pytest.raises(ConfigError) as e:

        @app.transform("orders")
        def enrich(order):
            return order

    text = str(e.value)
    assert "'enrich'" in text
    assert THIS_FILE in text  # where it is defined
    assert "to=" in text  # how to fix it


def test_transform_without_parameter_is_rejected():
    app = pipes.App("shop")
    with pytest.raises(ConfigError, match=r"'nothing'.*first argument"):

        @app.transform("orders", to="out")
        def nothing():
            return 1


def test_two_nodes_with_one_name_names_both_places_and_the_fix():
    app = pipes.App("shop")

    @app.transform("a", to="b")
    def step(v):
        return v

    first_line = step.__code__.co_firstlineno

    with pytest.raises(ConfigError) as e:

        @app.sink("b")
        def step(v):  # noqa: F811 -- the point of the test
            pass

    text = str(e.value)
    assert "'step'" in text
    assert f"{THIS_FILE}:{first_line}" in text
    assert text.count(THIS_FILE) == 2
    assert "name=" in text


def test_name_resolves_a_clash_and_names_are_unique_across_topologies():
    app = pipes.App("shop")

    @app.transform("a", to="b")
    def step(v):
        return v

    @app.transform("b", to="c", name="step2")
    def step_(v):
        return v

    assert {n.id for n in app.build().nodes()} == {"step", "step2"}

    with pytest.raises(ConfigError, match="'step'"):

        @app.topology("billing").transform("x", to="y")
        def step(v):  # noqa: F811
            return v


def test_decorators_return_the_function_unchanged():
    app = pipes.App("shop")

    def double(v):
        return v * 2

    assert app.transform("a", to="b")(double) is double
    assert double(21) == 42
    assert app.sink("b")(print) is print


def test_sources_from_objects_are_named_after_their_type_or_name():
    app = pipes.App("shop")
    app.source([1, 2], to="a")
    app.source((3, 4), to="a", name="more")
    with pytest.raises(ConfigError, match="'list'"):
        app.source([5], to="a")
    assert {n.id for n in app.build().nodes()} == {"list", "more"}


# -- serializers ---------------------------------------------------------------------------


def test_bad_serializer_name_lists_the_choices():
    app = pipes.App("shop")
    with pytest.raises(ValueError) as e:
        app.topic("orders", value_serializer="yaml")
    text = str(e.value)
    assert "'yaml'" in text and "'orders'" in text
    for name in ("json", "bytes", "str", "pickle", "msgpack"):
        assert repr(name) in text
    with pytest.raises(ValueError, match="key serializer of topic 'orders'"):
        app.topic("orders", key_serializer="nope")


def test_bad_serializer_name_is_a_config_error():
    app = pipes.App("shop")
    with pytest.raises(pipes.ConfigError):
        app.topic("orders", value_serializer="yaml")


def test_serializers_by_name_and_object_are_recorded_on_the_topic():
    app = pipes.App("shop")
    custom = pipes.Serializer("upper", lambda v: v.upper().encode(), lambda b: b.decode().lower())
    t = app.topic("orders", value_serializer="msgpack", key_serializer=custom)
    assert t.value_serializer.name == "msgpack"
    assert t.key_serializer is custom

    app.sink(t, print)
    spec = app.build().topics["orders"]
    assert spec.value_serializer.name == "msgpack" and spec.key_serializer is custom


# -- keyed state ---------------------------------------------------------------------------


def _stateful_app(**topic_kwargs):
    app = pipes.App("shop")
    app.topic("orders", **topic_kwargs)

    @app.transform("orders", to="totals")
    def total(order, state):
        state["n"] = state.get("n", 0) + 1
        return state["n"]

    return app


def test_state_on_an_unkeyed_transform_fails_at_build_not_at_decoration():
    app = _stateful_app()  # decorating works: keyedness is known only once the app is complete
    with pytest.raises(ConfigError) as e:
        app.build()
    text = str(e.value)
    assert "'total'" in text and THIS_FILE in text
    assert "'orders'" in text
    assert "key=" in text and "keyed=True" in text


def test_state_on_a_keyed_topic_builds():
    g = _stateful_app(keyed=True).build()
    node = g.node("total")
    assert node.stateful and node.inputs == ("orders",)


def test_state_over_the_output_of_a_keyed_transform_builds():
    app = pipes.App("shop")

    @app.transform("orders", to="by_customer", key="customer")
    def rekey(order):
        return order

    @app.transform("by_customer", to="totals")
    def total(order, state):
        return order

    g = app.build()
    assert g.node("total").stateful
    assert g.node("rekey").key == "customer"


@pytest.mark.parametrize("key", ["customer", lambda o: o["customer"]], ids=["field", "callable"])
def test_key_on_a_stateful_transform_goes_through_a_rekey_topic(key):
    app = pipes.App("shop")

    @app.transform("orders", to="totals", key=key)
    def total(order, state):
        return order

    g = app.build()
    rekey = g.node("total.rekey")
    assert rekey.internal and rekey.key is key
    assert rekey.inputs == ("orders",) and rekey.outputs == ("shop.total.rekey",)
    node = g.node("total")
    assert node.inputs == ("shop.total.rekey",) and node.key is None and node.outputs == ("totals",)
    assert g.topics["shop.total.rekey"].internal and g.topics["shop.total.rekey"].keyed


@pytest.mark.parametrize("key", ["customer", len], ids=["field", "callable"])
def test_key_on_a_stateless_transform_is_recorded_on_the_node(key):
    app = pipes.App("shop")

    @app.transform("orders", to="by_customer", key=key)
    def passthrough(order):
        return order

    g = app.build()
    assert g.node("passthrough").key is key
    assert g.topics["by_customer"].name == "by_customer"
    assert "shop.passthrough.rekey" not in g.topics


def test_key_must_be_a_field_name_or_callable():
    app = pipes.App("shop")
    with pytest.raises(ConfigError, match="key="):

        @app.transform("orders", to="x", key=42)
        def f(order):
            return order


# -- topics ------------------------------------------------------------------------------


def test_to_takes_a_topic_a_name_or_a_list():
    app = pipes.App("shop", partitions=2)
    audit = app.topic("audit", partitions=3)

    @app.transform("orders", to=["billing", audit, "shipping"])
    def fan(order):
        return order

    @app.source(to=audit)
    def numbers():
        return None

    g = app.build()
    assert g.node("fan").outputs == ("billing", "audit", "shipping")
    assert g.node("numbers").outputs == ("audit",)
    assert g.topics["audit"].partitions == 3
    assert g.topics["billing"].partitions == 2  # created on first use with the app's default
    assert ("fan", "topic:shipping") in g.edges() and ("topic:orders", "fan") in g.edges()


def test_empty_or_invalid_topic_lists_are_rejected():
    app = pipes.App("shop")
    with pytest.raises(ConfigError, match="empty"):
        app.source([1], to=[])
    with pytest.raises(ConfigError, match="not a topic"):
        app.source([1], to=[42], name="x")


def test_a_topic_declared_twice_with_different_settings_is_an_error():
    app = pipes.App("shop")
    app.topic("orders", partitions=4)
    assert app.topic("orders", partitions=4).partitions == 4  # the same again is fine
    with pytest.raises(ConfigError, match="'orders'"):
        app.topic("orders", partitions=8)


@pytest.mark.parametrize("partitions", [0, -1, 1.5, "4"])
def test_bad_partition_counts(partitions):
    with pytest.raises(ConfigError, match="partitions="):
        pipes.App("shop").topic("orders", partitions=partitions)


# -- topologies --------------------------------------------------------------------------


def test_nodes_belong_to_main_unless_declared_on_another_topology():
    app = pipes.App("shop")
    billing = app.topology("billing")
    assert app.topology("billing") is billing

    @app.source(to="orders")
    def numbers():
        return None

    @billing.transform("orders", to="invoices")
    def invoice(order):
        return order

    @billing.sink("invoices")
    def mail(inv):
        pass

    @app.sink("orders")
    def show(order):
        pass

    g = app.build()
    assert set(g.topologies) == {"main", "billing"}
    assert [n.id for n in g.topologies["main"].nodes] == ["numbers", "show"]
    assert [n.id for n in g.topologies["billing"].nodes] == ["invoice", "mail"]
    assert g.topologies["billing"].group == "shop.billing"
    assert g.topologies["main"].group == "shop.main"
    assert g.topologies["billing"].input_topics == ("orders", "invoices")
    assert [t.name for t in g.select(["billing"])] == ["billing"]
    with pytest.raises(ConfigError, match="no topology 'nope'"):
        g.select(["nope"])


# -- other load-time errors ----------------------------------------------------------------


def test_an_app_without_nodes_does_not_build():
    with pytest.raises(ConfigError, match="'empty'"):
        pipes.App("empty").build()


@pytest.mark.parametrize("name", ["", "a b", "a/b"])
def test_bad_app_names(name):
    with pytest.raises(ConfigError):
        pipes.App(name)


def test_unknown_setting_is_a_config_error():
    with pytest.raises(ConfigError, match="commit_intervall"):
        pipes.App("shop", commit_intervall=5)


def test_bad_on_error_policy_lists_the_choices():
    app = pipes.App("shop")
    with pytest.raises(ConfigError, match=r"on_error='retry'.*dlq, stop, skip"):
        app.sink("a", print, on_error="retry")
    with pytest.raises(ConfigError, match="on_error='ignore'"):
        pipes.App("shop2", on_error="ignore").sink("a", print)


def test_sink_arguments_are_checked():
    app = pipes.App("shop")
    with pytest.raises(ConfigError, match="batch="):
        app.sink("a", print, batch=0)
    with pytest.raises(ConfigError, match="write"):
        app.sink("a", object(), name="nothing")


def test_message_annotation_is_recognised():
    app = pipes.App("shop")

    @app.transform("a", to="b")
    def with_meta(msg: pipes.Message):
        return msg

    @app.transform("a", to="c")
    def plain(value: dict):
        return value

    g = app.build()
    assert g.node("with_meta").wants_message
    assert not g.node("plain").wants_message


# -- the package ---------------------------------------------------------------------------

EXPECTED_EXPORTS = [
    "App",
    "BrokerError",
    "ConfigError",
    "Message",
    "PipesError",
    "ProcessingError",
    "Serializer",
    "Settings",
    "Topic",
    "io",
    "windows",
]


def test_exported_members():
    assert pipes.__all__ == EXPECTED_EXPORTS
    for name in EXPECTED_EXPORTS:
        assert getattr(pipes, name) is not None
    # Every public, non-module name of the package is exported.
    public = {n for n, v in vars(pipes).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    assert public <= set(EXPECTED_EXPORTS)
    namespace: dict = {}
    exec("from pipes import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(EXPECTED_EXPORTS)


def test_errors_form_one_hierarchy():
    for err in (pipes.ConfigError, pipes.ProcessingError, pipes.BrokerError):
        assert issubclass(err, pipes.PipesError)
    assert issubclass(pipes.ConfigError, ValueError)


def test_import_pipes_has_no_side_effects(tmp_path):
    code = r"""
import asyncio, json, logging, os, signal, sys, threading
argv = ["prog", "worker", "-A", "nowhere", "--broker", "kafka://nowhere:1"]
sys.argv = list(argv)
signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
handlers = list(logging.getLogger().handlers)
import pipes
import pipes.io
print(json.dumps({
    "argv": sys.argv == argv,
    "signals": signals == {s: signal.getsignal(s) for s in signals},
    "handlers": logging.getLogger().handlers == handlers,
    "threads": threading.active_count(),
    "running_loop": asyncio._get_running_loop() is not None,
    "policy": getattr(asyncio.events, "_event_loop_policy", None) is not None,
    "files": sorted(os.listdir(".")),
}))
"""
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert json.loads(proc.stdout) == {"argv": True, "signals": True, "handlers": True, "threads": 1,
                                       "running_loop": False, "policy": False, "files": []}
