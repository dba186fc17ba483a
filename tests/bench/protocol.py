"""How the suite talks to a measured child process: a JSON spec in argv[1], one
``RESULT {json}`` line on stdout. Only the standard library: peers import it from
``.venv-peers``.

A child reports its own peak resident set (VmHWM of /proc/self/status: unlike ru_maxrss,
which a child inherits from the process that forked it, it starts afresh at exec), so each
runner's memory is its own, not the suite's.
"""

from __future__ import annotations

import json
import sys

PREFIX = "RESULT "


def spec() -> dict:
    return json.loads(sys.argv[1])


def report(result: dict) -> None:
    """Print the child's result with its peak RSS (MB) so far."""
    result = {**result, "rss_mb": peak_rss_mb()}
    sys.stdout.write("\n" + PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def parse(stdout: str) -> dict | None:
    for line in stdout.splitlines():  # a line may start with a peer's terminal escapes
        at = line.find(PREFIX)
        if at >= 0:
            return json.loads(line[at + len(PREFIX):])
    return None
