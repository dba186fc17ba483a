"""Clickstream sessionization: page views grouped into per-user sessions, in event time.

    generated clicks -> "clicks" -> sessions (session window per user, 30 min gap)
                                      -> "sessions"  -> out/clickstream/sessions.jsonl
                                      -> "clicks.late" (clicks more than 5 min behind)
                     -> views_per_page (tumbling 10 min count per page, emitted as it changes)
                                      -> "page_views" (and its late clicks to "page_views.late")

Run it with ``pipes worker -A apps.clickstream --until-done``. The clicks carry their own
time (``ts``, ISO 8601), a day of browsing by 200 users, a few of them out of order and a
few far behind. A session is emitted once stream time is 30 min (the gap) + 5 min (grace)
past its last click, so the sessions still open when the input ends stay in state:
``pipes state -A apps.clickstream sessions u007`` shows one user's open session.
"""

import os
import random
from datetime import datetime, timedelta, timezone

import pipes
from pipes import windows as w

OUT = os.environ.get("PIPES_CLICKSTREAM_OUT", "out/clickstream")
CLICKS = int(os.environ.get("PIPES_CLICKSTREAM_CLICKS", "20000"))
PAGES = ["/", "/search", "/products/1", "/products/2", "/products/3", "/cart", "/checkout", "/help"]
START = datetime(2026, 11, 1, tzinfo=timezone.utc)

app = pipes.App("clickstream")


def click(i: int) -> dict:
    """The i-th click, the same on every run: users browse in bursts with long pauses."""
    rnd = random.Random(i)
    minute = i * 24 * 60 / CLICKS  # a day of clicks, in order
    jitter = -rnd.uniform(0, 4) if rnd.random() < 0.1 else 0  # out of order, within grace
    if rnd.random() < 0.005:
        jitter = -rnd.uniform(20, 60)  # far behind: late
    at = START + timedelta(minutes=minute + jitter)
    return {"user": f"u{rnd.randrange(200):03d}", "page": rnd.choice(PAGES), "ts": at.isoformat()}


@app.source(to="clicks")
def clicks(state):
    i = state.get("i", 0)
    if i == CLICKS:
        return None
    state["i"] = i + 1
    return click(i)


def _merge(a: dict, b: dict) -> dict:
    return {"clicks": a["clicks"] + b["clicks"], "pages": a["pages"] + b["pages"],
            "checkout": a["checkout"] or b["checkout"]}


@app.window("clicks", to="sessions", key="user", window=w.session(timedelta(minutes=30)), grace=300,
            timestamp="ts", late="clicks.late", initial={"clicks": 0, "pages": [], "checkout": False},
            merge=_merge)
def sessions(acc, c):
    """A user's session: clicks, pages in arrival order, whether it reached the checkout."""
    return {"clicks": acc["clicks"] + 1, "pages": acc["pages"] + [c["page"]],
            "checkout": acc["checkout"] or c["page"] == "/checkout"}


app.window("clicks", to="page_views", key="page", window=w.tumbling(timedelta(minutes=10)), agg=w.count(),
           emit="update", grace=300, timestamp="ts", late="page_views.late", name="views_per_page")


@app.transform("sessions", to="session_summaries")
def summarize(s):
    start = datetime.fromtimestamp(s["start"] / 1000, timezone.utc)
    minutes = (s["end"] - s["start"]) / 60_000
    return {"user": s["key"], "start": start.isoformat(), "minutes": round(minutes, 1),
            "clicks": s["value"]["clicks"], "checkout": s["value"]["checkout"]}


app.sink("session_summaries", pipes.io.JsonLines(f"{OUT}/sessions.jsonl"))
