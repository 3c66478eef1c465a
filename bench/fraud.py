"""The post-hoc detectors on a generated campaign with planted fraud: what they find, and what
they raise in error.

    python -m bench.fraud [--orders 20000] [--seed 7]

A campaign is generated as the services' events (no stack is needed: the detectors read events
only, and what is measured is what they find): merchants with their products, orders over 30
days with the ordinary noise of a real campaign (prices that move a few per cent, refunds days
later, evidence within days, an occasional unit refunded and sold again), and planted among
them a known number of each fraud the detectors look for. A finding that names a planted
subject is a hit; any other finding is a false alarm.

Results go to bench/results/fraud.json; docs/benchmarks.md has the numbers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from services.audit.detectors import DetectorRules, detect
from services.kernel.events import Context, Envelope, new_envelope, service_actor
from subsidy.v1 import events_pb2 as ev

from .common import RESULTS

START = dt.datetime(2025, 6, 1, 2, 0, tzinfo=dt.UTC)
CATEGORIES = ("tv", "refrigerator", "phone", "computer")


class CraftedLog:
    """A log written as the services would: products in catalog's streams, each order's
    reservation, capture and refund in its pool's stream, its evidence in a stream of its own."""

    def __init__(self) -> None:
        self.envs: list[Envelope] = []
        self._versions: dict[tuple[str, str], int] = {}
        self._ids = itertools.count(1)

    def add(self, service: str, stream: str, event: Message, at: dt.datetime) -> None:
        key = (service, stream)
        self._versions[key] = version = self._versions.get(key, 0) + 1
        e = new_envelope(service, stream, event, Context(service_actor(service)), version=version)
        e.occurred_at.FromDatetime(at)
        self.envs.append(e)

    def product(
        self,
        sku: str,
        price: int,
        at: dt.datetime = START,
        *,
        model: str = "X1",
        merchant: str = "m1",
        category: str = "tv",
    ) -> None:
        event = ev.ProductRegistered(
            sku=sku, merchant_id=merchant, category=category, grade=1, brand="B", model=model,
            list_price_fen=price,
        )  # fmt: skip
        self.add("catalog", f"product/{sku}", event, at)

    def price(self, sku: str, old: int, new: int, at: dt.datetime) -> None:
        change = ev.ProductPriceChanged(sku=sku, old_price_fen=old, new_price_fen=new)
        self.add("catalog", f"product/{sku}", change, at)

    def order(
        self,
        at: dt.datetime,
        *,
        sku: str = "s1",
        price: int = 500_000,
        consumer: str = "",
        merchant: str = "m1",
        serial: str = "",
        platform: str = "jd",
        refund_after: dt.timedelta | None = None,
        evidence: bool = True,
        category: str = "tv",
        address: str = "",
    ) -> str:
        """An order reserved and captured at ``at`` (its evidence the same day unless
        ``evidence`` is False), refunded ``refund_after`` later if given, delivered to
        ``address`` (a blind index, as the ledger keeps it); its id."""
        order_id = f"o{next(self._ids)}"
        pool, subsidy = "budget-pool/p", price // 5
        reserved = ev.SubsidyReserved(
            order_id=order_id, pool_id="p", platform_id=platform,
            consumer_id=consumer or f"c-{order_id}", sku=sku, merchant_id=merchant,
            category=category, unit_price_fen=price, subsidy_fen=subsidy, serial=serial,
        )  # fmt: skip
        if address:
            reserved.circumstance_indexes["address"] = address
        self.add("ledger", pool, reserved, at)
        captured = ev.SubsidyCaptured(
            order_id=order_id, pool_id="p", subsidy_fen=subsidy, category=category
        )
        self.add("ledger", pool, captured, at)
        if evidence:
            proof = ev.EvidenceRecorded(
                order_id=order_id, merchant_id=merchant, kind="COURIER", reference=f"w-{order_id}"
            )
            self.add("ledger", f"evidence/{order_id}", proof, at + dt.timedelta(hours=30))
        if refund_after is not None:
            self.add("ledger", pool, ev.SubsidyReleased(
                order_id=order_id, pool_id="p", subsidy_fen=subsidy, reason="REFUNDED",
                was_captured=True, category=category,
            ), at + refund_after)  # fmt: skip
        return order_id


@dataclass
class Campaign:
    """A generated campaign: its log, and the subjects of the fraud planted in it."""

    log: CraftedLog = field(default_factory=CraftedLog)
    planted: dict[str, set[str]] = field(default_factory=dict)  # detector -> subjects
    honest_orders: int = 0

    def plant(self, detector: str, subject: str) -> None:
        self.planted.setdefault(detector, set()).add(subject)


def generate(orders: int, rng: random.Random, frauds_each: int = 10) -> Campaign:
    """``orders`` honest orders over 30 days at 40 merchants, and ``frauds_each`` of every kind."""
    c = Campaign()
    log = c.log
    merchants = [f"m{i}" for i in range(40)]
    catalogue: list[tuple[str, str, str, int]] = []  # sku, merchant, category, price
    for i, merchant in enumerate(merchants):
        for j in range(5):
            sku, category = f"sku-{i}-{j}", CATEGORIES[(i + j) % len(CATEGORIES)]
            price = rng.randrange(200_000, 900_000, 100)
            log.product(sku, price, START, model=f"M{i}-{j}", merchant=merchant, category=category)
            catalogue.append((sku, merchant, category, price))
    # Ordinary price moves: some products cheaper, a few dearer within the tolerance.
    for sku, _, _, price in rng.sample(catalogue, 30):
        moved = price * rng.randrange(94, 109) // 100
        log.price(sku, price, moved, START + dt.timedelta(days=rng.randrange(1, 20)))
    serials = itertools.count(1)
    # Households of one to three people, each with its own address (a blind index).
    people: list[tuple[str, str]] = []  # (consumer, address)
    for h in range(max(orders // 3, 1)):
        people += [(f"c-{h}-{i}", f"addr-{h}") for i in range(rng.randrange(1, 4))]
    for _ in range(orders):
        sku, merchant, category, price = rng.choice(catalogue)
        consumer, address = rng.choice(people)
        at = START + dt.timedelta(days=rng.randrange(0, 30), minutes=rng.randrange(0, 600))
        refund = dt.timedelta(days=rng.randrange(3, 15)) if rng.random() < 0.04 else None
        serial = f"IMEI-{next(serials)}" if category == "phone" else ""
        log.order(
            at, sku=sku, price=price, merchant=merchant, category=category,
            serial=serial, refund_after=refund, consumer=consumer, address=address,
        )  # fmt: skip
        if serial and refund is not None and rng.random() < 0.5:  # refunded, then sold again
            log.order(
                at + refund + dt.timedelta(days=1), sku=sku, price=price, merchant=merchant,
                category=category, serial=serial,
            )  # fmt: skip
    c.honest_orders = orders
    _plant(c, rng, frauds_each)
    return c


def _plant(c: Campaign, rng: random.Random, n: int) -> None:
    log = c.log
    for k in range(n):
        day = START + dt.timedelta(days=rng.randrange(5, 25))
        # A price raised by 25-60 % just before the subsidised sale.
        sku = f"raise-{k}"
        log.product(sku, 400_000, START, model=f"R{k}", merchant=f"mr{k}")
        raised = 400_000 * rng.randrange(125, 160) // 100
        log.price(sku, 400_000, raised, day - dt.timedelta(days=1))
        c.plant("price_raise", log.order(day, sku=sku, price=raised, merchant=f"mr{k}"))
        # The same model re-registered under a new SKU at a higher price.
        old, new = f"reset-{k}", f"reset-{k}-b"
        log.product(old, 300_000, START, model=f"S{k}", merchant=f"ms{k}")
        log.product(
            new, 300_000 * rng.randrange(130, 170) // 100, day, model=f"S{k}", merchant=f"ms{k}"
        )
        c.plant("price_raise", log.order(day, sku=new, price=300_000 * 3 // 2, merchant=f"ms{k}"))
        # One IMEI on two orders at once, or on two platforms.
        imei, phone = f"DUP-{k}", f"phone-{k}"
        log.product(phone, 300_000, START, model=f"P{k}", merchant=f"md{k}", category="phone")
        log.order(day, serial=imei, category="phone", sku=phone, price=300_000, merchant=f"md{k}")
        log.order(
            day + dt.timedelta(hours=rng.randrange(1, 48)), serial=imei, category="phone",
            sku=phone, price=300_000, platform="jd" if k % 2 else "tmall", merchant=f"md{k}",
        )  # fmt: skip
        c.plant("shared_serial", imei)
        # A consumer cashing the discount at a merchant in on it: three refunds within hours
        # of the capture each (the merchant, with every such consumer, is planted too).
        who = f"c-cash-{k}"
        log.product("cash-tv", 500_000, START, model="C1", merchant="m-cash")
        for i in range(3):
            log.order(
                day + dt.timedelta(days=i), consumer=who, sku="cash-tv", merchant="m-cash",
                price=500_000, refund_after=dt.timedelta(hours=rng.randrange(1, 20)),
            )  # fmt: skip
        c.plant("quick_refund", who)
        c.plant("quick_refund", "m-cash")
        # A merchant that never shows delivery.
        ghost = f"m-ghost-{k}"
        log.product(f"ghost-{k}", 500_000, START, model=f"G{k}", merchant=ghost)
        for _ in range(3):
            log.order(day - dt.timedelta(days=5), merchant=ghost, sku=f"ghost-{k}", evidence=False)
        c.plant("missing_evidence", ghost)
        # Six people's subsidies delivered to one address within a fortnight.
        drop = f"addr-drop-{k}"
        for i in range(6):
            log.order(
                day + dt.timedelta(days=2 * i), consumer=f"c-drop-{k}-{i}", address=drop,
                sku="cash-tv", merchant="m-cash", price=500_000,
            )  # fmt: skip
        c.plant("shared_address", drop)
        # A merchant whose average price quadruples on one day (about 1.8x its category's).
        jump, cheap, dear = f"m-jump-{k}", f"jump-{k}-a", f"jump-{k}-b"
        log.product(cheap, 300_000, START, model=f"J{k}a", merchant=jump)
        log.product(dear, 1_200_000, START, model=f"J{k}b", merchant=jump)
        for d in range(5):
            for _ in range(6):
                log.order(START + dt.timedelta(days=d), merchant=jump, sku=cheap, price=300_000)
        for _ in range(6):
            log.order(START + dt.timedelta(days=6), merchant=jump, sku=dear, price=1_200_000)
        c.plant("merchant_anomaly", jump)


def score(c: Campaign, rules: DetectorRules, now: dt.datetime) -> dict[str, Any]:
    """Hits and false alarms per detector."""
    t = time.perf_counter()
    findings = detect(c.log.envs, rules, now)
    elapsed = time.perf_counter() - t
    rows = []
    for detector in sorted({*c.planted, *(f.detector for f in findings)}):
        planted = c.planted.get(detector, set())
        subjects = {f.subject for f in findings if f.detector == detector}
        hits = planted & subjects
        alarms = subjects - planted
        rows.append(
            {
                "detector": detector,
                "planted": len(planted),
                "found": len(hits),
                "false_alarms": len(alarms),
                "recall": round(len(hits) / len(planted), 3) if planted else None,
                "precision": round(len(hits) / len(subjects), 3) if subjects else None,
                "false_alarm_subjects": sorted(alarms)[:10],
            }
        )
    return {"events": len(c.log.envs), "detect_s": round(elapsed, 2), "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m bench.fraud``: score every detector on a generated campaign; the result."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=20_000)
    parser.add_argument("--frauds", type=int, default=10, help="planted of each kind")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    campaign = generate(args.orders, rng, args.frauds)
    result = {
        "benchmark": "fraud",
        "honest_orders": campaign.honest_orders,
        "seed": args.seed,
        **score(campaign, DetectorRules(), START + dt.timedelta(days=60)),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fraud.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'detector':18} {'planted':>8} {'found':>6} {'false':>6} {'precision':>9}")
    for row in result["rows"]:
        print(
            f"{row['detector']:18} {row['planted']:>8} {row['found']:>6} {row['false_alarms']:>6}"
            f" {row['precision'] if row['precision'] is not None else '-':>9}"
        )
    print(f"{result['events']} events in {result['detect_s']} s")
    return result


if __name__ == "__main__":
    main()
