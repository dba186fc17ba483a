"""Pipeline processors, composed once into one chain that runs as one pipes transform.

A step takes a list of batches (each a list of Envelopes) and returns as many batches.
The chain runs its steps in turn on everything one poll brought, so a pooled step
crosses to its workers once per poll, not once per message.
"""

from __future__ import annotations

import logging
import pickle
from collections import Counter
from typing import Any

from ..failures import Failures
from ..script import Envelope, Script

log = logging.getLogger("pipes")

Batches = list[list[Envelope]]


class Step:
    """A processor."""

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def run(self, batches: Batches) -> Batches:
        raise NotImplementedError


class Errors:
    """Messages a script flagged: the first is logged with its traceback, the rest counted.
    `where` names the component: ``processor python (file.yaml:12)``."""

    def __init__(self, where: str, then: str = "the message goes on flagged with this error"):
        self.where = where
        self.then = then
        self.counts: Counter[str] = Counter()

    def seen(self, env: Envelope) -> None:
        kind = env.error.split(":", 1)[0]
        self.counts[kind] += 1
        if sum(self.counts.values()) == 1:
            log.error("%s: %s (%s; further errors here are counted)\n%s",
                      self.where, env.error, self.then, (env.trace or "").rstrip())
        env.trace = None

    def summary(self) -> str | None:
        if not self.counts:
            return None
        return f"{self.where}: " + ", ".join(f"{n} {k}" for k, n in self.counts.most_common()) + " flagged"


class Python(Step):
    """``python`` in the main interpreter: the script runs per message."""

    def __init__(self, script: Script, where: str):
        self.script = script
        self.errors = Errors(where)

    async def run(self, batches: Batches) -> Batches:
        apply = self.script.apply
        out = []
        for batch in batches:
            n = len(batch)
            done = []
            for i, env in enumerate(batch):
                res = apply(env, i, n)
                if res is not None:
                    if res.trace is not None:
                        self.errors.seen(res)
                    done.append(res)
            out.append(done)
        return out


class PooledPython(Step):
    """``python`` with ``mode`` isolated, isolated_legacy or process: the script runs in a
    pool of `workers` (pipes.modes), messages crossing as pickled (content, metadata)."""

    def __init__(self, script: Script, where: str, mode: str, workers: int):
        from ..modes import Pool

        self.errors = Errors(where)
        arg = pickle.dumps((script.source, script.filename, script.line), protocol=5)
        self.pool = Pool(mode, workers, "pipes.script:worker_handler", arg)

    async def open(self) -> None:
        await self.pool.start()

    async def close(self) -> None:
        await self.pool.close()

    async def run(self, batches: Batches) -> Batches:
        dumps = pickle.dumps
        items = [dumps((env.content, env.meta, env.error, i, len(batch)), protocol=5)
                 for batch in batches for i, env in enumerate(batch)]
        if not items:
            return batches
        results = iter(await self.pool.run(items, [None] * len(items)))
        out = []
        for batch in batches:
            done = []
            for _ in batch:
                res = pickle.loads(next(results))
                if res is not None:
                    env = Envelope(res[0], res[1], error=res[2], trace=res[3])
                    if env.trace is not None:
                        self.errors.seen(env)
                    done.append(env)
            out.append(done)
        return out


class Chain(Step):
    """Steps run one after the other."""

    def __init__(self, steps: list[Step]):
        self.steps = steps

    async def open(self) -> None:
        for s in self.steps:
            await s.open()

    async def close(self) -> None:
        for s in self.steps:
            await s.close()

    async def run(self, batches: Batches) -> Batches:
        for step in self.steps:
            batches = await step.run(batches)
        return batches

    def summaries(self) -> list[str]:
        out = []
        for s in self.steps:
            errors = getattr(s, "errors", None)
            if errors is not None and errors.summary():
                out.append(errors.summary())
            if isinstance(s, Chain):
                out += s.summaries()
            for chain in getattr(s, "chains", ()):
                out += chain.summaries()
        return out


def _each_alone(batches: Batches, chosen: list[list[bool]]) -> Batches:
    return [[env] for batch, marks in zip(batches, chosen) for env, m in zip(batch, marks) if m]


def _merge(batches: Batches, chosen: list[list[Any]], results: dict[Any, Any]) -> Batches:
    """Each message, or for a chosen one what its chain made of it, in the original order."""
    out = []
    for batch, marks in zip(batches, chosen):
        done = []
        for env, m in zip(batch, marks):
            if m is None:
                done.append(env)
            else:
                done.extend(next(results[m]))
        out.append(done)
    return out


class Catch(Step):
    """``catch``: its processors run on each message an earlier step flagged (each in a
    batch of its own, as in Redpanda Connect); then the flag is cleared."""

    def __init__(self, chain: Chain):
        self.chain = chain
        self.chains = (chain,)

    async def open(self) -> None:
        await self.chain.open()

    async def close(self) -> None:
        await self.chain.close()

    async def run(self, batches: Batches) -> Batches:
        chosen = [[True if env.error is not None else None for env in batch] for batch in batches]
        failed = _each_alone(batches, chosen)
        if not failed:
            return batches
        done = await self.chain.run(failed)
        for batch in done:
            for env in batch:
                env.error = env.trace = None
        return _merge(batches, chosen, {True: iter(done)})


class Switch(Step):
    """``switch``: each message goes through the processors of the first case whose
    ``check`` holds (a case without check always holds), each in a batch of its own;
    a message no case takes passes unchanged. A check that raises flags the message."""

    def __init__(self, cases: list[tuple[Script | None, Chain]], where: str):
        self.cases = cases
        self.chains = tuple(c for _, c in cases)
        self.errors = Errors(where)

    async def open(self) -> None:
        for _, chain in self.cases:
            await chain.open()

    async def close(self) -> None:
        for _, chain in self.cases:
            await chain.close()

    async def run(self, batches: Batches) -> Batches:
        chosen = []
        flagged = {}
        for b, batch in enumerate(batches):
            marks = []
            n = len(batch)
            for i, env in enumerate(batch):
                mark = None
                for c, (check, _) in enumerate(self.cases):
                    ok = True if check is None else check.check(env, i, n)
                    if isinstance(ok, Envelope):
                        self.errors.seen(ok)
                        flagged[(b, i)] = ok
                        break
                    if ok:
                        mark = c
                        break
                marks.append(mark)
            chosen.append(marks)
        if flagged:
            batches = [[flagged.get((b, i), env) for i, env in enumerate(batch)] for b, batch in enumerate(batches)]
        results = {}
        for c, (_, chain) in enumerate(self.cases):
            mine = _each_alone(batches, [[m == c for m in marks] for marks in chosen])
            if mine:
                results[c] = iter(await chain.run(mine))
        return _merge(batches, chosen, results)


class Log(Step):
    """``log``: logs a line per message at `level` — the value of the Python expression
    `message` (default: the content) — and passes the messages on unchanged."""

    def __init__(self, level: int, message: Script | None, where: str):
        self.level = level
        self.message = message
        self.errors = Errors(where, "nothing was logged for it")

    async def run(self, batches: Batches) -> Batches:
        if not log.isEnabledFor(self.level):
            return batches
        for batch in batches:
            n = len(batch)
            for i, env in enumerate(batch):
                if self.message is None:
                    log.log(self.level, "%s", env.content.decode(errors="replace"))
                    continue
                text, failed = self.message.evaluate(env, i, n)
                if failed is not None:
                    self.errors.seen(failed)
                else:
                    log.log(self.level, "%s", text)
        return batches


class Pipeline:
    """The target of the pipeline's transform node: the chain, with the transport its
    topics use. ``await pipeline(batch)`` runs one batch through it (``pipes test``)."""

    def __init__(self, chain: Chain, transport: Any, output_topic: str):
        self.chain = chain
        self.transport = transport
        self.output_topic = output_topic

    async def __call__(self, batch: list[Envelope]) -> list[Envelope]:
        return (await self.chain.run([batch]))[0]

    def pipes_processor(self, node: Any, graph: Any, table: Any) -> _Processor:
        return _Processor(self, node)


class _Processor:
    def __init__(self, pipeline: Pipeline, node: Any):
        self.node = node
        self.pipeline = pipeline
        self.failures = Failures(node)

    async def open(self) -> None:
        await self.pipeline.chain.open()

    async def close(self) -> None:
        await self.pipeline.chain.close()
        for line in self.pipeline.chain.summaries():
            log.warning("%s", line)

    async def process(self, topic: str, partition: int, records: list[tuple], ckpt: Any) -> None:
        loads, dumps = self.pipeline.transport.loads, self.pipeline.transport.dumps
        batches, kept = [], []
        for rec in records:
            try:
                batches.append(loads(rec[2]))
                kept.append(rec)
            except Exception as e:
                self.failures.handle(e, topic, partition, rec, ckpt)
        done = await self.pipeline.chain.run(batches)
        buf = ckpt.buffer(self.pipeline.output_topic)
        for batch, rec in zip(done, kept):
            if batch:
                buf.append((rec[1], dumps(batch), rec[3], rec[4]))
