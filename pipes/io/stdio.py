"""Standard output sink."""

from __future__ import annotations

import sys
from typing import Any

import orjson


class Stdout:
    """Prints each value on one line: str as it is, bytes decoded, anything else as JSON."""

    def write(self, batch: list[Any]) -> None:
        out = []
        for v in batch:
            if isinstance(v, bytes):
                v = v.decode(errors="replace")
            out.append(v if isinstance(v, str) else orjson.dumps(v).decode())
        sys.stdout.write("\n".join(out) + "\n")

    def flush(self) -> None:
        sys.stdout.flush()
