"""The ``pipes`` command. Every option also reads a ``PIPES_*`` environment variable."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pickle
import shutil
import sys
import time
import traceback
from typing import Any

import orjson

from .brokers import check_url, connect, data_dir
from .errors import ConfigError, PipesError, ProcessingError
from .loader import AppImportError, load_app
from .settings import Settings

log = logging.getLogger("pipes")


def _env(name: str, default: Any = None) -> Any:
    return os.environ.get(f"PIPES_{name}", default)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipes", description="Stream processing with Python functions.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def app_cmd(name: str, help: str, *, app_required: bool = True) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.add_argument("-A", "--app", default=_env("APP"), required=app_required and not _env("APP"),
                       help="module, module:attribute or path/to/file.py [PIPES_APP]")
        c.add_argument("--broker", default=_env("BROKER"), help="local://[DIR] (default), memory://, kafka://h:p [PIPES_BROKER]")
        c.add_argument("--data-dir", default=_env("DATA_DIR"), help="where local state lives (default ./.pipes/APP) [PIPES_DATA_DIR]")
        return c

    w = app_cmd("worker", "Run an app's topologies.")
    w.add_argument("--topology", action="append", default=_split(_env("TOPOLOGY")),
                   help="run only this topology (repeatable; default all) [PIPES_TOPOLOGY]")
    w.add_argument("--until-done", action="store_true", default=_flag("UNTIL_DONE"),
                   help="exit once every source is exhausted and every topic consumed [PIPES_UNTIL_DONE]")
    w.add_argument("--on-error", choices=("dlq", "stop", "skip"), default=None,
                   help="error policy for nodes that set none [PIPES_ON_ERROR]")
    w.add_argument("--commit-interval", type=float, default=None, help="seconds between checkpoints [PIPES_COMMIT_INTERVAL]")
    w.add_argument("--commit-every", type=int, default=None, help="messages between checkpoints [PIPES_COMMIT_EVERY]")
    w.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR [PIPES_LOG_LEVEL]")
    w.add_argument("--log-format", choices=("text", "json"), default=None,
                   help="text (default) or json: one JSON object per log line [PIPES_LOG_FORMAT]")
    w.add_argument("--web", default=None, metavar="HOST:PORT",
                   help="serve /health, /ready, /metrics, /topology, /tables/NODE/KEY and a live page; "
                        "PORT alone listens on 127.0.0.1 (default: off) [PIPES_WEB]")
    w.add_argument("--shutdown-timeout", type=float, default=None, metavar="SECONDS",
                   help="how long SIGTERM/SIGINT may take to drain and checkpoint (default 30) [PIPES_SHUTDOWN_TIMEOUT]")
    w.add_argument("--restart-attempts", type=int, default=None, metavar="N",
                   help="restarts of a crashed topology in a row before the worker gives up (default 5; 0: never) "
                        "[PIPES_RESTART_ATTEMPTS]")

    t = app_cmd("topology", "Print an app's topologies.")
    t.add_argument("--format", choices=("text", "mermaid", "dot"), default=_env("FORMAT", "text"))

    s = app_cmd("send", "Send one message (or one per line of stdin with '-') to a topic.", app_required=False)
    s.add_argument("topic")
    s.add_argument("value", help="the value (JSON for json topics), or - to read lines from stdin")
    s.add_argument("--key", default=None)
    s.add_argument("--header", action="append", default=[], metavar="NAME=VALUE")

    tl = app_cmd("tail", "Print a topic's messages, one JSON value per line.", app_required=False)
    tl.add_argument("topic")
    tl.add_argument("--from-beginning", action="store_true")
    tl.add_argument("--exit-at-end", action="store_true", help="stop at the end instead of waiting for more")
    tl.add_argument("--meta", action="store_true", help="print key, partition, offset, timestamp and headers too")

    st = app_cmd("state", "Print source checkpoints, consumer offsets and keyed state as JSON.")
    st.add_argument("node", nargs="?")
    st.add_argument("key", nargs="?")

    r = app_cmd("reset", "Forget offsets, source checkpoints and keyed state, to start over.")
    r.add_argument("--topology", action="append", default=None, help="reset only this topology (repeatable)")
    r.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    for module in _command_modules():
        COMMANDS.update(module.register(sub, app_cmd))
    return p


def _command_modules() -> list:
    """Modules adding commands: each has register(subparsers, app_cmd) -> {name: function(args) -> int}."""
    from .ops import commands as ops
    from .pipeline import commands as pipeline

    return [pipeline, ops]


def _split(v: str | None) -> list[str] | None:
    return [x for x in v.split(",") if x] if v else None


def _flag(name: str) -> bool:
    return _env(name, "").lower() in ("1", "true", "yes", "on")


def _settings(args: argparse.Namespace, base: Settings) -> Settings:
    s = base.with_env()
    return s.override(broker=args.broker, data_dir=args.data_dir,
                      on_error=getattr(args, "on_error", None),
                      commit_interval=getattr(args, "commit_interval", None),
                      commit_every=getattr(args, "commit_every", None),
                      log_level=getattr(args, "log_level", None),
                      log_format=getattr(args, "log_format", None),
                      web=getattr(args, "web", None),
                      shutdown_timeout=getattr(args, "shutdown_timeout", None),
                      restart_attempts=getattr(args, "restart_attempts", None))


def _app_and_settings(args: argparse.Namespace):
    app = load_app(args.app)
    return app, _settings(args, app.settings)


def _run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return asyncio.run(coro, loop_factory=uvloop.new_event_loop)


# -- commands ---------------------------------------------------------------------------
def cmd_worker(args: argparse.Namespace) -> int:
    from .runtime import run

    app, settings = _app_and_settings(args)
    settings.check()
    logging.getLogger("pipes").setLevel(settings.log_level.upper())
    if settings.log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    graph = app.build(settings)
    selected = [t.name for t in graph.select(args.topology)]
    check_url(settings.broker)
    where = settings.broker if not settings.broker.startswith("local") else f"local://{data_dir(app.name, settings)}"
    log.info("worker for app %r, topologies %s, on %s", app.name, ", ".join(selected), where)
    progress = args.until_done and sys.stderr.isatty() and settings.log_format == "text"
    report = _run_async(run(graph, settings, topologies=selected, until_done=args.until_done, install_signals=True,
                            restart=True, progress=progress))
    rate = report.processed / report.seconds if report.seconds else 0
    if args.until_done and report.processed == 0 and report.produced == 0:
        log.info("nothing to do: every source had finished and every topic was consumed before this run "
                 "(resumed from the checkpoint; nothing reprocessed)")
    log.info("processed %d messages (%.0f msg/s), sources produced %d, %d checkpoints in %.1f s",
             report.processed, rate, report.produced, report.commits, report.seconds)
    if report.restarts:
        log.info("topologies were restarted %d time%s after crashes", report.restarts, "s" if report.restarts > 1 else "")
    for line in report.lines:
        log.info("%s", line)
    return 0


class JsonFormatter(logging.Formatter):
    """One JSON object per log line: time, level, logger, message (and the traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()

    converter = time.gmtime


def cmd_topology(args: argparse.Namespace) -> int:
    from .render import FORMATS

    app, settings = _app_and_settings(args)
    print(FORMATS[args.format](app.build(settings)))
    return 0


def _broker_for(args: argparse.Namespace, *, read_only: bool):
    """The broker and topic serializers for commands that may or may not name an app."""
    if args.app:
        app, settings = _app_and_settings(args)
        return app.name, settings, app.build(settings), connect(app.name, settings, read_only=read_only)
    settings = _settings(args, Settings())
    if settings.broker.startswith("local") and settings.broker in ("local://", "local:") and not settings.data_dir:
        raise ConfigError("which app's data? pass -A APP, --data-dir DIR or --broker local://DIR")
    name = os.path.basename(os.path.normpath(settings.data_dir or "")) or "pipes"
    return name, settings, None, connect(name, settings, read_only=read_only)


def cmd_send(args: argparse.Namespace) -> int:
    from .brokers import Changes
    from .emit import encode_headers, serializers_of

    _, settings, graph, broker = _broker_for(args, read_only=False)
    vs, ks = serializers_of(graph, args.topic)
    lines = [l.rstrip("\n") for l in sys.stdin] if args.value == "-" else [args.value]
    headers = encode_headers(dict(h.split("=", 1) for h in args.header)) if args.header else None
    now = int(time.time() * 1000)
    key = ks.dumps(args.key) if args.key is not None else None
    outputs = [(key, vs.dumps(_parse_value(line, vs.name)), headers, now)
               for line in lines if line or args.value != "-"]

    async def send() -> None:
        try:
            await broker.open(graph, [])
            await broker.describe(args.topic)  # an existing topic keeps its partitions
            await broker.commit("pipes.send", Changes(outputs={args.topic: outputs}))
        finally:
            await broker.close()

    _run_async(send())
    print(f"sent {len(outputs)} message{'s' if len(outputs) != 1 else ''} to {args.topic}", file=sys.stderr)
    return 0


def _parse_value(text: str, serializer: str) -> Any:
    if serializer in ("json", "msgpack", "pickle"):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            if serializer == "json":
                raise ConfigError(f"not valid JSON for a json topic: {text[:80]!r} (quote strings: '\"text\"')") from None
            return text
    return text


def cmd_tail(args: argparse.Namespace) -> int:
    from .emit import decode_headers, serializers_of

    _, settings, graph, broker = _broker_for(args, read_only=True)
    vs, ks = serializers_of(graph, args.topic)

    def show(p: int, rec: tuple) -> None:
        off, key, raw, headers, ts = rec
        try:
            value = vs.loads(raw)
        except Exception:
            value = raw.decode(errors="replace")
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        if args.meta:
            value = {"topic": args.topic, "partition": p, "offset": off, "timestamp": ts,
                     "key": ks.loads(key) if key is not None else None,
                     "headers": {k: v.decode(errors="replace") for k, v in decode_headers(headers).items()},
                     "value": value}
        sys.stdout.buffer.write(orjson.dumps(value, default=str) + b"\n")

    async def tail() -> None:
        try:
            await broker.open(None, [])
            if await broker.describe(args.topic) is None:
                known = ", ".join(sorted(t for t in broker.topics() if not t.endswith(".sources"))) or "none yet"
                raise ConfigError(f"no topic {args.topic!r} (topics: {known})")
            consumer = broker.consumer(None, [args.topic])
            await consumer.start()
            if not args.from_beginning:
                await consumer.seek_to_end()
            idle = 0
            while True:
                polled = await consumer.poll(10_000, 0.2)
                for _, p, recs in polled:
                    for rec in recs:
                        show(p, rec)
                sys.stdout.flush()
                idle = 0 if polled else idle + 1
                # Exit once caught up and a few polls have brought nothing new.
                if args.exit_at_end and idle >= 2 and consumer.caught_up():
                    return
        finally:
            await broker.close()

    try:
        _run_async(tail())
    except KeyboardInterrupt:
        pass
    return 0


def cmd_state(args: argparse.Namespace) -> int:
    from .emit import serializers_of
    from .store import state_prefix

    app, settings = _app_and_settings(args)
    graph = app.build(settings)
    broker = connect(app.name, settings, read_only=True)
    store = broker.store
    try:
        if args.node:
            node = graph.node(args.node)
            out: Any
            if node.kind == "source":
                raw = store.get("sources", node.id.encode())
                out = pickle.loads(raw) if raw else None
            elif node.stateful:
                ks = serializers_of(graph, node.inputs[0])[1]
                out = {}
                for p in range(max(graph.topics[t].partitions for t in node.inputs)):
                    prefix = state_prefix(node.id, p)
                    for k, v in store.scan("state", prefix):
                        out[str(ks.loads(k[len(prefix):]))] = pickle.loads(v)
                if args.key is not None:
                    out = out.get(args.key)
            else:
                raise ConfigError(f"node {node.id!r} is a stateless {node.kind}: it has no state")
        else:
            out = {"sources": {}, "offsets": {}, "state": {}, "checkpoints": _checkpoint_ages(graph, store)}
            for n in graph.nodes():
                if n.kind == "source":
                    raw = store.get("sources", n.id.encode())
                    out["sources"][n.id] = pickle.loads(raw) if raw else None
                if n.stateful:
                    out["state"][n.id] = sum(1 for p in range(max(graph.topics[t].partitions for t in n.inputs))
                                             for _ in store.scan("state", state_prefix(n.id, p)))
            # Ends and lag where the data dir holds the topics (local://); on Kafka, the
            # offsets this worker processed.
            ends_of = getattr(broker, "end_offsets", None)
            for topo in graph.topologies.values():
                ends: dict[str, dict[int, int]] = {}
                for (topic, p), off in sorted(store.offsets(topo.group).items()):
                    entry: dict[str, int] = {"offset": off}
                    if ends_of is not None and topic in broker.topics():
                        end = ends.setdefault(topic, ends_of(topic)).get(p, off)
                        entry.update(end=end, lag=end - off)
                    out["offsets"].setdefault(topo.group, {})[f"{topic}[{p}]"] = entry
            out["state"] = {k: f"{v} keys" for k, v in out["state"].items()}
        print(orjson.dumps(out, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS, default=repr).decode())
    except KeyError as e:
        raise ConfigError(f"no node {args.node!r} in app {app.name!r}") from e
    finally:
        _run_async(broker.close())
    return 0


def _checkpoint_ages(graph: Any, store: Any) -> dict[str, Any]:
    """Per consumer group: when its last checkpoint became durable, and how long ago."""
    from .runtime import checkpoint_time_key

    out: dict[str, Any] = {}
    for topo in graph.topologies.values():
        raw = store.get("meta", checkpoint_time_key(topo.group))
        if raw is None:
            out[topo.group] = None
            continue
        ms = int.from_bytes(raw, "big")
        out[topo.group] = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000)),
                           "age_seconds": round(time.time() - ms / 1000, 1)}
    return out


def cmd_reset(args: argparse.Namespace) -> int:
    from .store import Store, offset_key, state_prefix

    app, settings = _app_and_settings(args)
    graph = app.build(settings)
    topologies = graph.select(args.topology)
    path = data_dir(app.name, settings)
    what = (f"the whole embedded database {path} (topics, offsets, checkpoints, state)" if not args.topology
            else f"offsets, source checkpoints and keyed state of topolog{'ies' if len(topologies) > 1 else 'y'} "
                 f"{', '.join(t.name for t in topologies)}")
    if not args.yes:
        if not sys.stdin.isatty():
            raise ConfigError(f"reset would forget {what}; pass --yes to confirm")
        try:
            answer = input(f"Forget {what}? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing changed")
            return 1
    if not args.topology and settings.broker.startswith("local"):
        if os.path.isdir(path):
            Store(path).close()  # fails clearly if a worker holds the data dir (any pipes version's)
        shutil.rmtree(path, ignore_errors=True)
        print(f"removed {path}")
        return 0
    broker = connect(app.name, settings)
    store = broker.store
    try:
        n = 0
        for topo in topologies:
            n += store.delete_prefix("offsets", offset_key(topo.group, "", 0)[:-5])
            for node in topo.nodes:
                if node.kind == "source":
                    n += store.delete_prefix("sources", node.id.encode())
                if node.stateful:
                    for p in range(max(graph.topics[t].partitions for t in node.inputs)):
                        n += store.delete_prefix("state", state_prefix(node.id, p))
        print(f"forgot {n} entries of {', '.join(t.name for t in topologies)}")
    finally:
        _run_async(broker.close())
    return 0


COMMANDS = {"worker": cmd_worker, "topology": cmd_topology, "send": cmd_send, "tail": cmd_tail,
            "state": cmd_state, "reset": cmd_reset}


def _error(e: BaseException) -> None:
    """The one line a failed command ends with (a JSON log record under --log-format json)."""
    if any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers):
        log.error("error: %s", e)
    else:
        print(f"pipes: error: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="pipes: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except AppImportError as e:
        traceback.print_exception(e.__cause__, file=sys.stderr)
        _error(e)
        return 2
    except ProcessingError as e:
        _error(e)
        return 1
    except PipesError as e:
        _error(e)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `pipes tail ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
