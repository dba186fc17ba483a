"""Value and key serializers: name -> (dumps, loads)."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any, Callable

import msgpack
import orjson

from ._json import dumps as json_dumps
from .errors import ConfigError


class SerializationError(ValueError):
    """A value could not be encoded or decoded."""


@dataclass(frozen=True, slots=True)
class Serializer:
    """A named pair of functions turning values into bytes and back."""

    name: str
    dumps: Callable[[Any], bytes]
    loads: Callable[[bytes], Any]


def _str_dumps(v: Any) -> bytes:
    if type(v) is str:
        return v.encode()
    if isinstance(v, bytes):
        return v
    return (v if isinstance(v, str) else str(v)).encode()


def _bytes_dumps(v: Any) -> bytes:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    if isinstance(v, str):
        return v.encode()
    raise SerializationError(f"the bytes serializer takes bytes or str, not {type(v).__name__}")


SERIALIZERS: dict[str, Serializer] = {
    "json": Serializer("json", json_dumps, orjson.loads),
    "str": Serializer("str", _str_dumps, lambda b: b.decode()),
    "bytes": Serializer("bytes", _bytes_dumps, bytes),
    "pickle": Serializer("pickle", lambda v: pickle.dumps(v, protocol=5), pickle.loads),
    "msgpack": Serializer("msgpack", lambda v: msgpack.packb(v, use_bin_type=True), lambda b: msgpack.unpackb(b, raw=False)),
}


def resolve(spec: str | Serializer, *, what: str = "serializer") -> Serializer:
    """Look a serializer up by name, or accept a Serializer as it is."""
    if isinstance(spec, Serializer):
        return spec
    try:
        return SERIALIZERS[spec]
    except (KeyError, TypeError):
        names = ", ".join(repr(n) for n in SERIALIZERS)
        raise ConfigError(f"unknown {what} {spec!r}: use one of {names} or a pipes.Serializer") from None
