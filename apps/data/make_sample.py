"""Write apps/data/orders.jsonl: deterministic sample e-commerce order events.

    python apps/data/make_sample.py [N]      # default 18,000 orders (under 3 MB)

Stdlib only and seeded, so every run writes the same file byte for byte.
One JSON object per line:

    {"order_id": "o000123", "ts": "2026-11-01T09:00:03Z", "customer": "c042", "country": "DE",
     "items": [{"sku": "sku-17", "qty": 2, "price": 12.5}], "status": "paid"}
"""

import json
import random
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

OUT = Path(__file__).with_name("orders.jsonl")
SEED = 20261101
START = datetime(2026, 11, 1, tzinfo=timezone.utc)

COUNTRIES = {"DE": 30, "FR": 18, "GB": 16, "NL": 8, "ES": 8, "IT": 8, "PL": 5, "SE": 4, "US": 3}
STATUSES = {"paid": 88, "cancelled": 8, "refunded": 4}


def main(n: int = 18_000) -> None:
    rnd = random.Random(SEED)
    # A catalogue of 40 SKUs with fixed prices; a few best sellers dominate (Zipf-like).
    catalogue = [(f"sku-{i:02d}", round(rnd.choice([4.99, 7.5, 9.99, 12.5, 19.9, 24.0, 39.95, 59.0, 89.99])
                                        * rnd.choice([1, 1, 1, 2]), 2)) for i in range(1, 41)]
    sku_weights = [1 / rank for rank in range(1, len(catalogue) + 1)]
    customers = [f"c{i:03d}" for i in range(500)]
    home = {c: rnd.choices(list(COUNTRIES), weights=list(COUNTRIES.values()))[0] for c in customers}
    cust_weights = [1 / (rank ** 0.7) for rank in range(1, len(customers) + 1)]

    ts = START
    with OUT.open("w", encoding="utf-8", newline="\n") as f:
        for i in range(n):
            ts += timedelta(seconds=rnd.randint(1, 8))
            customer = rnd.choices(customers, weights=cust_weights)[0]
            n_items = rnd.choices([1, 2, 3, 4], weights=[74, 19, 5, 2])[0]
            # Distinct SKUs per order (a repeated pick just merges into the first).
            picked = dict.fromkeys(rnd.choices(range(len(catalogue)), weights=sku_weights, k=n_items))
            items = [{"sku": catalogue[j][0], "qty": rnd.choices([1, 2, 3, 5], weights=[70, 20, 7, 3])[0],
                      "price": catalogue[j][1]} for j in picked]
            order = {"order_id": f"o{i:06d}", "ts": ts.strftime("%Y-%m-%dT%H:%M:%SZ"), "customer": customer,
                     "country": home[customer], "items": items,
                     "status": rnd.choices(list(STATUSES), weights=list(STATUSES.values()))[0]}
            f.write(json.dumps(order, separators=(",", ":")) + "\n")
    print(f"wrote {n} orders to {OUT} ({OUT.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 18_000)
