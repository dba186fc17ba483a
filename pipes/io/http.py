"""HTTP connectors: a server-sent events source (resuming with ``Last-Event-ID``), an
ingest endpoint that answers a POST once what it carried is durable, and a sink that
POSTs each batch, retrying with backoff.

All three use aiohttp (``pip install aiohttp``), imported when they open.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from typing import Any

import orjson

from ..errors import ConfigError
from ..message import Message

log = logging.getLogger("pipes")


def _aiohttp() -> Any:
    try:
        import aiohttp
        import aiohttp.web  # noqa: F401
    except ImportError:
        raise ConfigError("the HTTP connectors need aiohttp: pip install aiohttp") from None
    return aiohttp


def _backoff(name: str, what: str, value: Any) -> tuple[float, float]:
    try:
        lo, hi = value
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {what}= takes (min, max) seconds, not {value!r}") from None
    if not 0 < lo <= hi:
        raise ConfigError(f"{name}: {what}= needs 0 < min <= max, not {value!r}")
    return lo, hi


def _delay(attempt: int, lo: float, hi: float) -> float:
    """Exponential backoff: lo, 2*lo, 4*lo, … capped at hi, with up to 10 % jitter."""
    d = min(hi, lo * (2 ** min(attempt, 30)))
    return d * (0.9 + 0.1 * random.random())


def _json_or_text(data: str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return data


# -- server-sent events -----------------------------------------------------------------------
class SSE:
    """The events of an HTTP server-sent events stream at `url`, in order. Each is a
    :class:`pipes.Message` whose value is the event's data (decoded as JSON when it is
    JSON, the text otherwise) and whose headers are ``event`` (the event type,
    ``"message"`` by default) and ``id`` (the event's id, when the stream gives one).

    The checkpoint is the id of the last event given out. After a dropped connection, and
    after a restart from a checkpoint, the request carries ``Last-Event-ID`` so a server
    that honours it resumes after that event. Dropped connections, network errors and
    5xx/408/429 answers are retried forever with exponential backoff between
    ``reconnect=(min, max)`` seconds (a ``retry:`` field from the server sets the first
    delay); each outage is logged once when it starts and once when it ends. A 204 answer
    ends the source (the SSE way for a server to say "do not reconnect"); any other 4xx
    answer, or a content type that is not ``text/event-stream``, fails it.

    `event` keeps only events of that type (a string, or a collection of them); the others
    still advance the checkpoint. `headers` are sent with every request. `read_timeout`,
    if set, treats a connection silent for that many seconds as dropped (servers usually
    send comment lines as keep-alives).
    """

    def __init__(self, url: str, *, headers: dict[str, str] | None = None,
                 reconnect: tuple[float, float] = (0.5, 30.0), event: str | Any = None,
                 read_timeout: float | None = None, connect_timeout: float = 10.0):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"SSE: url must be an http:// or https:// URL, not {url!r}")
        self.url = url
        self.headers = dict(headers or {})
        self.reconnect = _backoff("SSE", "reconnect", reconnect)
        self.events = None if event is None else frozenset([event] if isinstance(event, str) else event)
        if read_timeout is not None and read_timeout <= 0:
            raise ConfigError(f"SSE: read_timeout= must be a positive number of seconds, not {read_timeout!r}")
        self.read_timeout = read_timeout
        self.connect_timeout = connect_timeout
        self._last_id: str | None = None  # the id of the last event given out (or skipped)
        self._pending_id: str | None = None  # the stream's last-event-id buffer (spec), for the event being read
        self._session: Any = None
        self._resp: Any = None
        self._retry: float | None = None  # from the server's retry: field
        self._buf = b""
        self._ended = False
        self.connects = 0  # connections made (for tests and monitoring)

    # -- checkpoint --------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        return {"last_id": self._last_id}

    def restore(self, state: dict) -> None:
        self._last_id = state.get("last_id")

    # -- reading -----------------------------------------------------------------------------
    async def open(self) -> None:
        aiohttp = _aiohttp()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout, sock_read=self.read_timeout)
        self._session = aiohttp.ClientSession(timeout=timeout)

    async def close(self) -> None:
        await self._drop()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _drop(self) -> None:
        resp, self._resp = self._resp, None
        if resp is not None:
            resp.release()
            resp.close()

    async def _connect(self, lost: float | None = None) -> bool:
        """Connected (True), or the server said not to reconnect (False). Retries with backoff.
        `lost`: when the connection was lost (already logged), if it was."""
        aiohttp = _aiohttp()
        attempt, down_since, reason = 0, lost, ""
        lo, hi = self.reconnect
        while True:
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache", **self.headers}
            if self._last_id is not None:
                headers["Last-Event-ID"] = self._last_id
            try:
                resp = await self._session.get(self.url, headers=headers)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                reason = f"{type(e).__name__}: {e}"
            else:
                if resp.status == 204:
                    resp.release()
                    log.info("SSE %s: the server answered 204 No Content: the stream is over", self.url)
                    return False
                if resp.status == 200:
                    ctype = resp.headers.get("Content-Type", "")
                    if not ctype.startswith("text/event-stream"):
                        resp.release()
                        raise ConnectionError(f"SSE {self.url}: the answer's content type is {ctype!r}, "
                                              f"not text/event-stream")
                    self._resp = resp
                    self.connects += 1
                    if down_since is not None:
                        log.log(logging.INFO if attempt == 0 else logging.WARNING,
                                "SSE %s: reconnected after %.1f s and %d failed attempt(s)%s", self.url,
                                time.monotonic() - down_since, attempt,
                                f", resuming after event {self._last_id!r}" if self._last_id else "")
                    return True
                body = (await resp.text(errors="replace"))[:200]
                resp.release()
                if 400 <= resp.status < 500 and resp.status not in (408, 429):
                    raise ConnectionError(f"SSE {self.url}: HTTP {resp.status} {resp.reason}: {body}")
                reason = f"HTTP {resp.status} {resp.reason}"
            if down_since is None:
                down_since = time.monotonic()
                log.warning("SSE %s: cannot connect (%s); retrying with backoff up to %g s", self.url, reason, hi)
            delay = self._retry if attempt == 0 and self._retry is not None else _delay(attempt, lo, hi)
            attempt += 1
            await asyncio.sleep(min(delay, hi))

    async def read(self) -> Message | None:
        """The next event, reconnecting as needed; None once the server answers 204."""
        aiohttp = _aiohttp()
        lost = None
        while not self._ended:
            if self._resp is None:
                if not await self._connect(lost):
                    self._ended = True
                    return None
                self._pending_id, self._buf, lost = self._last_id, b"", None
            try:
                event = await self._next_event()
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                event, why = None, f"{type(e).__name__}: {e}"
            else:
                why = "the server closed the stream"
            if event is None:
                await self._drop()
                log.warning("SSE %s: connection lost (%s) after event %r; reconnecting", self.url, why,
                            self._last_id)
                lost = time.monotonic()
                await asyncio.sleep(min(self._retry if self._retry is not None else self.reconnect[0],
                                        self.reconnect[1]))
                continue
            etype, eid, data = event
            self._last_id = eid
            if self.events is not None and etype not in self.events:
                continue
            headers = {"event": etype}
            if eid is not None:
                headers["id"] = eid
            return Message(_json_or_text(data), headers=headers)
        return None

    async def _line(self) -> bytes | None:
        """The next line of the stream, without its end of line; None at EOF."""
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line, self._buf = self._buf[:i], self._buf[i + 1:]
                return line[:-1] if line.endswith(b"\r") else line
            chunk = await self._resp.content.readany()
            if not chunk:
                return None  # an unterminated last line is dropped, as is its event (spec)
            self._buf += chunk

    async def _next_event(self) -> tuple[str, str | None, str] | None:
        """Parse the stream (per the WHATWG spec) up to the next dispatched event; None at EOF."""
        data: list[str] = []
        etype = ""
        while True:
            raw = await self._line()
            if raw is None:
                return None
            line = raw.decode("utf-8", errors="replace")
            if not line:
                if not data:
                    etype = ""
                    continue
                return etype or "message", self._pending_id, "\n".join(data)
            if line.startswith(":"):
                continue
            field, sep, value = line.partition(":")
            if sep and value.startswith(" "):
                value = value[1:]
            if field == "data":
                data.append(value)
            elif field == "event":
                etype = value
            elif field == "id":
                if "\0" not in value:
                    self._pending_id = value or None
            elif field == "retry":
                if value.isdigit():
                    self._retry = int(value) / 1000

    def __repr__(self) -> str:
        return f"SSE({self.url!r})"


# -- the ingest endpoint ----------------------------------------------------------------------
_JSON_TYPES = ("application/json",)
_NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines",
                 "application/jsonlines")


class _Request:
    __slots__ = ("n", "given", "last", "future")

    def __init__(self, n: int, future: asyncio.Future):
        self.n = n  # its values
        self.given = 0  # how many of them were given out
        self.last = 0  # the sequence number of its last value, once given out
        self.future = future


class HTTPIngest:
    """An HTTP endpoint on `host`:`port` that takes POSTs to `path` and gives out the JSON
    values they carry, in order: a JSON body (``application/json``) of one value, or of an
    array whose elements are the values, or an NDJSON body (``application/x-ndjson``,
    ``application/ndjson`` or ``application/jsonl``) of one value per line.

    A request is answered ``200 {"accepted": n}`` only once the checkpoint covering all of
    its values is durable. A body that is not valid JSON gets ``400``, another content type
    ``415``, a body larger than `max_body` bytes ``413``, each with the reason as JSON
    ``{"error": ...}``. Once the worker is stopping, requests are answered ``503`` with
    ``Retry-After``, and so are requests whose values were not all covered by the last
    checkpoint: the client should send them again (at-least-once: values of such a
    request that the checkpoint did cover are then produced twice).

    `port=0` picks a free port; the one bound is ``.port`` after the source opened. The
    checkpoint is the number of values given out so far (the endpoint has no position to
    resume: what is not answered 200 is the client's to send again).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 8080, path: str = "/ingest", *,
                 max_body: int = 16 * 1024 * 1024):
        if not isinstance(port, int) or not 0 <= port < 65536:
            raise ConfigError(f"HTTPIngest: port= must be a TCP port number, not {port!r}")
        if not isinstance(path, str) or not path.startswith("/"):
            raise ConfigError(f"HTTPIngest: path= must start with '/', not {path!r}")
        self.host = host
        self.port = port
        self.path = path
        self.max_body = max_body
        self._seq = 0  # values given out, ever (restored from the checkpoint)
        self._queue: deque = deque()  # (value, request) not given out yet
        self._waiting: deque[_Request] = deque()  # requests given out (partly or fully), not answered
        self._wake: asyncio.Event | None = None
        self._runner: Any = None
        self._stopping = False

    # -- checkpoint --------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        return {"seq": self._seq}

    def restore(self, state: dict) -> None:
        self._seq = state.get("seq", 0)

    def committed(self, state: dict) -> None:
        """The checkpoint holding `state` is durable: answer the requests it fully covers."""
        upto = state.get("seq", 0)
        waiting = self._waiting
        while waiting and waiting[0].last and waiting[0].last <= upto:
            req = waiting.popleft()
            if not req.future.done():
                req.future.set_result(True)

    # -- serving -----------------------------------------------------------------------------
    async def open(self) -> None:
        web = _aiohttp().web
        self._wake = asyncio.Event()
        self._stopping = False
        app = web.Application(client_max_size=self.max_body)
        app.router.add_post(self.path, self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise ConfigError(f"HTTPIngest: cannot listen on {self.host}:{self.port}: {e}") from e
        self.port = site._server.sockets[0].getsockname()[1]
        self._runner = runner
        log.info("HTTPIngest listening on http://%s:%d%s", self.host, self.port, self.path)

    async def _handle(self, request: Any) -> Any:
        web = _aiohttp().web
        if self._stopping:
            return self._unavailable("the worker is stopping")
        ctype = request.content_type
        if ctype not in _JSON_TYPES and ctype not in _NDJSON_TYPES:
            return _error(415, f"unsupported content type {ctype!r}: send application/json or "
                               f"application/x-ndjson")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"the body is larger than {self.max_body} bytes")
        try:
            values = _parse_body(body, ctype in _NDJSON_TYPES)
        except ValueError as e:
            return _error(400, str(e))
        if self._stopping:
            return self._unavailable("the worker is stopping")
        if not values:
            return web.json_response({"accepted": 0})
        req = _Request(len(values), asyncio.get_running_loop().create_future())
        self._queue.extend((v, req) for v in values)
        self._wake.set()
        try:
            ok = await req.future
        except asyncio.CancelledError:  # the client went away, or the server is shutting down
            raise
        if not ok:
            return self._unavailable("the worker stopped before these values were durable; send them again")
        return web.json_response({"accepted": len(values)})

    def _unavailable(self, reason: str) -> Any:
        resp = _error(503, reason)
        resp.headers["Retry-After"] = "1"
        return resp

    async def read(self) -> Any:
        queue = self._queue
        try:
            while not queue:
                self._wake.clear()
                await self._wake.wait()
        except asyncio.CancelledError:
            self._stopping = True  # the runner stops the source: refuse new requests
            raise
        value, req = queue.popleft()
        self._seq += 1
        req.given += 1
        if req.given == 1:
            self._waiting.append(req)  # answered by committed(), or with a 503 by close()
        if req.given == req.n:
            req.last = self._seq
        return value

    async def close(self) -> None:
        self._stopping = True
        for req in list(self._waiting) + [r for _, r in self._queue]:
            if not req.future.done():
                req.future.set_result(False)
        self._waiting.clear()
        self._queue.clear()
        runner, self._runner = self._runner, None
        if runner is not None:
            await asyncio.sleep(0)  # let the handlers write their 503s
            await runner.cleanup()

    def __repr__(self) -> str:
        return f"HTTPIngest(http://{self.host}:{self.port}{self.path})"


def _error(status: int, reason: str) -> Any:
    return _aiohttp().web.json_response({"error": reason}, status=status)


def _parse_body(body: bytes, ndjson: bool) -> list:
    if not ndjson:
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise ValueError(f"invalid JSON: {e}") from None
        return value if isinstance(value, list) else [value]
    values = []
    for n, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        try:
            values.append(orjson.loads(line))
        except orjson.JSONDecodeError as e:
            raise ValueError(f"invalid JSON on line {n}: {e}") from None
    return values


# -- the sink ---------------------------------------------------------------------------------
class HTTP:
    """POSTs (or PUTs, …: `method`) every batch the sink receives to `url`, as one request:
    a JSON array (``batch_format="json"``, ``application/json``) or one JSON value per line
    (``"ndjson"``, ``application/x-ndjson``). Values that are not JSON-serializable are
    written as their ``str()``.

    A 2xx answer is success. Network errors, timeouts and 5xx, 408 and 429 answers are
    retried up to `retries` times with exponential backoff between ``backoff=(min, max)``
    seconds (a ``Retry-After`` of whole seconds is honoured, capped at max); another
    answer, or the last failed retry, fails the batch, whose messages then get the sink's
    ``on_error`` policy (the dead-letter topic by default).

    At-least-once: each batch is sent as it is written, before the checkpoint that covers
    it, so after a crash the batches since the last checkpoint are sent again, and a
    request that timed out may have been received. `headers` are sent with every request;
    `timeout` is each attempt's limit in seconds.
    """

    def __init__(self, url: str, *, method: str = "POST", batch_format: str = "json", retries: int = 5,
                 backoff: tuple[float, float] = (0.1, 10.0), headers: dict[str, str] | None = None,
                 timeout: float = 30.0):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"HTTP: url must be an http:// or https:// URL, not {url!r}")
        if batch_format not in ("json", "ndjson"):
            raise ConfigError(f"HTTP: batch_format= takes 'json' or 'ndjson', not {batch_format!r}")
        if not isinstance(retries, int) or retries < 0:
            raise ConfigError(f"HTTP: retries= must be a non-negative integer, not {retries!r}")
        self.url = url
        self.method = method.upper()
        self.batch_format = batch_format
        self.retries = retries
        self.backoff = _backoff("HTTP", "backoff", backoff)
        self.headers = dict(headers or {})
        self.timeout = timeout
        self._session: Any = None
        self.sent = 0  # values delivered (2xx)
        self.requests = 0  # attempts made

    async def open(self) -> None:
        aiohttp = _aiohttp()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _body(self, batch: list) -> tuple[bytes, str]:
        if self.batch_format == "json":
            return orjson.dumps(batch, default=str), "application/json"
        return b"".join(orjson.dumps(v, default=str) + b"\n" for v in batch), "application/x-ndjson"

    async def write(self, batch: list) -> None:
        if not batch:
            return
        aiohttp = _aiohttp()
        if self._session is None:
            await self.open()
        body, ctype = self._body(batch)
        headers = {"Content-Type": ctype, **self.headers}
        lo, hi = self.backoff
        attempt = 0
        while True:
            retry_after = None
            self.requests += 1
            try:
                async with self._session.request(self.method, self.url, data=body, headers=headers) as resp:
                    if 200 <= resp.status < 300:
                        await resp.read()
                        self.sent += len(batch)
                        if attempt:
                            log.info("HTTP sink %s: delivered after %d retries", self.url, attempt)
                        return
                    text = (await resp.text(errors="replace"))[:200]
                    error = f"HTTP {resp.status} {resp.reason}: {text}"
                    if resp.status < 500 and resp.status not in (408, 429):
                        raise RuntimeError(f"HTTP sink {self.method} {self.url}: {error}")
                    ra = resp.headers.get("Retry-After", "")
                    retry_after = float(ra) if ra.isdigit() else None
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                error = f"{type(e).__name__}: {e}"
            if attempt >= self.retries:
                raise ConnectionError(f"HTTP sink {self.method} {self.url}: failed after {attempt + 1} attempts; "
                                      f"last: {error}")
            if attempt == 0:
                log.warning("HTTP sink %s: %s; retrying up to %d times", self.url, error, self.retries)
            delay = min(hi, retry_after) if retry_after is not None else _delay(attempt, lo, hi)
            attempt += 1
            await asyncio.sleep(delay)

    def __repr__(self) -> str:
        return f"HTTP({self.method} {self.url!r})"
