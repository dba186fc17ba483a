"""All settings in one frozen dataclass; each has a PIPES_* environment variable."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True, slots=True)
class Settings:
    broker: str = "local://"  # local://[DIR], memory://, kafka://host:port,...
    data_dir: str | None = None  # default ./.pipes/<app name>
    commit_interval: float = 1.0  # seconds between checkpoints at most
    commit_every: int = 50_000  # messages between checkpoints at most
    partitions: int = 1  # default partition count of topics the app creates
    on_error: str = "dlq"  # dlq | stop | skip, for nodes that do not set their own
    retention_ms: int | None = None  # default topic log retention on local:// (None: keep all)
    poll_records: int = 5_000  # records fetched per poll
    replication: int = 1  # replication factor of topics pipes creates on Kafka
    guarantee: str = "at_least_once"  # or "exactly_once" (Kafka transactions)
    log_level: str = "INFO"
    log_format: str = "text"  # text | json (one JSON object per log line)
    web: str | None = None  # HOST:PORT (or PORT, on 127.0.0.1) of the worker's web server; None: off
    shutdown_timeout: float = 30.0  # seconds SIGTERM/SIGINT may take to drain and checkpoint
    restart_attempts: int = 5  # restarts of a failing topology in a row before the worker gives up
    restart_backoff: float = 0.5  # seconds before the first restart, doubled for each one after
    restart_backoff_max: float = 30.0  # at most this; a topology up this long counts as recovered

    def with_env(self, environ: dict[str, str] | None = None) -> Settings:
        """Settings overridden by PIPES_<NAME> environment variables."""
        env = os.environ if environ is None else environ
        changes: dict[str, Any] = {}
        for f in fields(self):
            raw = env.get(f"PIPES_{f.name.upper()}")
            if raw is not None:
                changes[f.name] = _parse(f.type, raw, f.name)
        return replace(self, **changes)

    def check(self) -> Settings:
        """Raise ConfigError for a value no setting accepts."""
        from .errors import ConfigError

        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r}: use one of {', '.join(allowed)}")
        for name in ("commit_every", "partitions", "poll_records", "replication"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be a positive integer")
        for name in ("commit_interval", "shutdown_timeout", "restart_backoff", "restart_backoff_max"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be a positive number of seconds")
        if not isinstance(self.restart_attempts, int) or self.restart_attempts < 0:
            raise ConfigError(f"restart_attempts={self.restart_attempts!r}: must be an integer >= 0")
        if self.web is not None:
            from .web import parse_address

            parse_address(self.web)
        return self

    def override(self, **changes: Any) -> Settings:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


_CHOICES = {"on_error": ("dlq", "stop", "skip"), "guarantee": ("at_least_once", "exactly_once"),
            "log_format": ("text", "json")}


def _parse(kind: Any, raw: str, name: str) -> Any:
    from .errors import ConfigError

    kind = str(kind)
    if raw == "" and "None" in kind:
        return None
    try:
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError:
        raise ConfigError(f"PIPES_{name.upper()}={raw!r} is not a valid {kind.split(' ')[0]}") from None
    return raw
