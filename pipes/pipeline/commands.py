"""``pipes run``, ``pipes lint`` and ``pipes test`` for YAML pipeline files."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any, Callable

from ..errors import ConfigError
from ..script import Envelope, encode, loads_json
from .compile import compile_pipeline, load

log = logging.getLogger("pipes")


def register(sub: Any, app_cmd: Callable) -> dict[str, Callable[[argparse.Namespace], int]]:
    r = sub.add_parser("run", help="Run a YAML pipeline until its input ends.",
                       description="Run a Redpanda Connect-style YAML pipeline until its input ends and "
                                   "everything is written. Ephemeral (memory://) unless the file's broker: "
                                   "or --broker names a topic-backed broker, which makes it resumable.")
    r.add_argument("file", help="the pipeline, FILE.yaml")
    r.add_argument("--broker", default=None, help="local://[DIR], kafka://h:p or memory:// (overrides broker:)")
    r.add_argument("--data-dir", default=None, help="where local:// keeps its data (default ./.pipes/NAME)")
    lint = sub.add_parser("lint", help="Check a YAML pipeline: unknown fields, wrong types, invalid Python.")
    lint.add_argument("file")
    t = sub.add_parser("test", help="Run the tests: block of a YAML pipeline against its processors.")
    t.add_argument("file")
    return {"run": cmd_run, "lint": cmd_lint, "test": cmd_test}


def _problems(filename: str) -> tuple[Any, bool]:
    """The document and whether it has problems (printed to stderr)."""
    try:
        doc, issues = load(filename)
    except ConfigError as e:  # not YAML, or a key given twice
        print(e, file=sys.stderr)
        return None, True
    for issue in issues:
        print(issue.format(filename), file=sys.stderr)
    return doc, bool(issues)


def cmd_lint(args: argparse.Namespace) -> int:
    _, bad = _problems(args.file)
    if not bad:
        print(f"{args.file}: ok")
    return 1 if bad else 0


def cmd_run(args: argparse.Namespace) -> int:
    from ..cli import _run_async
    from ..runtime import run

    doc, bad = _problems(args.file)
    if bad:
        print(f"pipes: error: {args.file} has problems (above); nothing was run", file=sys.stderr)
        return 2
    compiled = compile_pipeline(doc, args.file, broker=args.broker)
    settings = compiled.app.settings.override(data_dir=args.data_dir)
    logging.getLogger("pipes").setLevel(settings.log_level.upper())
    progress = sys.stderr.isatty() and settings.log_format == "text"  # a progress line on a terminal only
    report = _run_async(run(compiled.app.build(settings), settings, until_done=True, install_signals=True,
                            progress=progress))
    log.info("pipeline %s: %d batches from the input in %.2f s", args.file, report.produced, report.seconds)
    for line in report.lines:
        log.info("%s", line)
    return 0


# -- pipes test ---------------------------------------------------------------------------------
def _contains(actual: Any, expected: Any) -> bool:
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(k in actual and _contains(actual[k], v) for k, v in expected.items())
    return actual == expected


def _failures(env: Envelope, conditions: dict) -> list[str]:
    out = []
    for name, want in conditions.items():
        if name == "content_equals":
            got = env.content.decode(errors="replace")
            if got != want:
                out.append(f"content_equals: got {got!r}, want {want!r}")
        elif name == "metadata_equals":
            for k, v in want.items():
                if env.meta.get(k) != v:
                    out.append(f"metadata_equals: {k!r} is {env.meta.get(k)!r}, want {v!r}")
        else:
            try:
                got = loads_json(env.content)
            except ValueError:
                out.append(f"{name}: the content is not JSON: {env.content[:80]!r}")
                continue
            ok = got == want if name == "json_equals" else _contains(got, want)
            if not ok:
                out.append(f"{name}: got {got!r}, want {want!r}")
    return out


async def _run_case(pipeline: Any, case: dict) -> list[str]:
    batch = [Envelope(encode(m.get("content", "")), dict(m.get("metadata") or {})) for m in case["input_batch"]]
    out = await pipeline(batch)
    got = [out] if out else []
    want = case.get("output_batches")
    if want is None:
        return []
    problems = []
    if len(got) != len(want):
        return [f"{len(got)} output batches, want {len(want)}"]
    for b, (batch_got, batch_want) in enumerate(zip(got, want)):
        if len(batch_got) != len(batch_want):
            problems.append(f"batch {b}: {len(batch_got)} messages, want {len(batch_want)}")
            continue
        for i, (env, conditions) in enumerate(zip(batch_got, batch_want)):
            problems += [f"batch {b} message {i}: {p}" for p in _failures(env, conditions)]
    return problems


def cmd_test(args: argparse.Namespace) -> int:
    doc, bad = _problems(args.file)
    if bad:
        return 2
    cases = doc.get("tests") or []
    if not cases:
        print(f"{args.file}: no tests: block", file=sys.stderr)
        return 1
    pipeline = compile_pipeline(doc, args.file, broker="memory://").pipeline

    async def run_all() -> list[tuple[str, list[str]]]:
        await pipeline.chain.open()
        try:
            return [(case["name"], await _run_case(pipeline, case)) for case in cases]
        finally:
            await pipeline.chain.close()

    results = asyncio.run(run_all())
    failed = 0
    for name, problems in results:
        print(f"{'FAIL' if problems else 'PASS'} {name}")
        for p in problems:
            print(f"    {p}")
        failed += bool(problems)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0
