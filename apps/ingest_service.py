"""Ingest service: an HTTP endpoint for page-view events, validated and written to a dataset.

    POST /events (HTTPIngest) -> "raw_events" -> validate (bad events -> "raw_events.dlq")
      -> "page_views" -> Parquet dataset in PIPES_INGEST_OUT (default out/ingest_service/page_views)

Run it, then POST events (a JSON object, a JSON array, or one JSON object per line):

    .venv/bin/pipes worker -A apps.ingest_service
    curl -s -H 'Content-Type: application/json' localhost:8080/events \\
         -d '[{"user": "u1", "page": "/products/42", "ts": "2026-11-01T10:00:00Z", "ms": 1200}]'

A request is answered {"accepted": n} once its events are durably in "raw_events".
"""

import datetime
import os

import pipes

# Read once, at import (`pipes worker` imports this module, then runs `app`).
HOST = os.environ.get("PIPES_INGEST_HOST", "127.0.0.1")  # 0.0.0.0 to accept other machines
PORT = int(os.environ.get("PIPES_INGEST_PORT", "8080"))
OUT = os.environ.get("PIPES_INGEST_OUT", "out/ingest_service/page_views")

app = pipes.App("ingest_service")

# The endpoint runs while the worker does. Its values go to "raw_events" in the order the
# requests arrived; a client that gets no 200 (a 503 while stopping, say) sends again.
app.source(pipes.io.HTTPIngest(host=HOST, port=PORT, path="/events"), to="raw_events", name="ingest")


@app.transform("raw_events", to="page_views")
def validate(event):
    """Checks one event and returns the row to store. Raising is how an event is refused:
    the default on_error sends the original event to the dead-letter topic "raw_events.dlq",
    with the error in its headers, and the worker goes on with the next one."""
    if not isinstance(event, dict):
        raise ValueError(f"an event is a JSON object, not {type(event).__name__}")
    user, page, ms = event.get("user"), event.get("page"), event.get("ms", 0)
    if not isinstance(user, str) or not user.strip():
        raise ValueError("user: a non-empty string is required")
    if not isinstance(page, str) or not page.startswith("/"):
        raise ValueError("page: a path starting with / is required")
    if type(ms) is not int or not 0 <= ms <= 3_600_000:
        raise ValueError("ms: a whole number of milliseconds up to an hour")
    ts = datetime.datetime.fromisoformat(str(event.get("ts")))  # raises ValueError if it is not a time
    if ts.tzinfo is None:
        raise ValueError("ts: give a time zone (Z or +hh:mm)")
    ts = ts.astimezone(datetime.timezone.utc)
    # Enrichment: normalized fields, and some derived ones for the readers of the dataset.
    return {
        "user": user.strip().lower(),
        "page": page,
        "section": page.split("/")[1] or "home",   # "/products/42" -> "products", "/" -> "home"
        "ts": ts.isoformat().replace("+00:00", "Z"),
        "day": ts.date().isoformat(),
        "ms": ms,
    }


# The dataset commits its rows together with the offsets they came from at each pipes
# checkpoint, so readers see whole checkpoints and every event is in it exactly once.
app.sink("page_views", pipes.io.Dataset(OUT, "parquet"), name="dataset")
