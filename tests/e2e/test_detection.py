"""The fraud detectors over the real audit log: a consumer who takes two subsidies and refunds
each within minutes of its capture becomes a supervision case, with its evidence, once."""

from __future__ import annotations

import random

from sqlalchemy import text

from services.audit.cases import Cases
from services.audit.cases_domain import DETECTION, finding_case_id
from services.audit.detection import Detection
from services.audit.detectors import DetectorRules
from subsidy.v1 import common_pb2, ledger_pb2
from subsidy.v1 import events_pb2 as ev
from tests.e2e.conftest import Platform
from tests.e2e.test_funding_sources import pool_events

PHONE, TABLET = 300_000, 400_000


async def audit_events(p: Platform) -> int:
    return await p.running["audit"].runtime.store.count()


async def test_quick_refunds_of_one_consumer_open_one_case_with_the_evidence(
    platform: Platform, rng: random.Random
) -> None:
    p = platform
    pool = await p.pool(rng, 5_000_000)
    phone = await p.product(rng, "phone", 0, PHONE)
    tablet = await p.product(rng, "tablet", 0, TABLET)
    _, consumer = await p.person(rng)
    orders = []
    for sku, category, price in ((phone, "phone", PHONE), (tablet, "tablet", TABLET)):
        qualification = await p.claim(consumer, category)
        order = f"o-{rng.randrange(10**12)}"
        reserved = await p.ledger.ReserveSubsidy(
            ledger_pb2.ReserveSubsidyRequest(
                order_id=order, platform_id="jd", pool_id=pool, consumer_id=consumer,
                qualification_id=qualification, sku=sku, unit_price_fen=price,
            )
        )  # fmt: skip
        await p.ledger.CaptureSubsidy(
            ledger_pb2.CaptureSubsidyRequest(
                order_id=order,
                payment_ref=f"pay-{order}",
                paid_amount_fen=price - reserved.subsidy_fen,
            )
        )
        await p.ledger.ReleaseSubsidy(
            ledger_pb2.ReleaseSubsidyRequest(order_id=order, reason="REFUNDED")
        )
        orders.append(order)
    await p.quiesce()

    cases: Cases = p.running["audit"].wiring.registrations[1][1].cases
    store = p.running["audit"].runtime.store
    detection = Detection(store, cases, DetectorRules())
    found = {f.key: f for f in await detection.step()}
    key = f"quick_refund/consumer/{consumer}/QUICK_REFUNDS"
    assert key in found, sorted(found)
    assert dict(found[key].evidence)["orders"] == ",".join(orders)  # in the order they were made
    case = (await cases.get(finding_case_id(key), None)).case
    assert (case.kind, case.subject) == (DETECTION, f"consumer:{consumer}")

    # Found again, by this round or by a fresh process reading the whole log: no second case.
    before = await audit_events(p)
    assert key not in {f.key for f in await detection.step()}
    await Detection(store, cases, DetectorRules()).step()
    assert await audit_events(p) == before
    async with store.engine.connect() as conn:
        opened = await conn.scalar(
            text("SELECT count(*) FROM events WHERE stream_id = :s"),
            {"s": f"case/{finding_case_id(key)}"},
        )
    assert opened == 1


async def test_a_reservation_keeps_its_delivery_address_as_a_blind_index_only(
    platform: Platform, rng: random.Random
) -> None:
    p = platform
    pool = await p.pool(rng, 1_000_000)
    phone = await p.product(rng, "phone", 0, PHONE)
    street = f"坪山区坪山大道{rng.randrange(10**6)}号"
    addresses = {"a": street, "same": f"  {street} ", "other": street + "B座"}
    orders = {}
    for name, address in addresses.items():
        _, consumer = await p.person(rng)
        qualification = await p.claim(consumer, "phone")
        orders[name] = f"o-{rng.randrange(10**12)}"
        await p.ledger.ReserveSubsidy(
            ledger_pb2.ReserveSubsidyRequest(
                order_id=orders[name], platform_id="jd", pool_id=pool, consumer_id=consumer,
                qualification_id=qualification, sku=phone, unit_price_fen=PHONE,
                circumstances=common_pb2.Circumstances(delivery_address=address),
            )
        )  # fmt: skip
    held = {
        e.order_id: dict(e.circumstance_indexes)
        for e in await pool_events(p, pool)
        if isinstance(e, ev.SubsidyReserved)
    }
    index = {name: held[order]["address"] for name, order in orders.items()}
    assert index["a"] == index["same"] != index["other"]  # normalised, then keyed
    assert all(street not in i and len(i) >= 32 for i in index.values())
    assert set(held[orders["a"]]) == {"address"}  # only what the platform gave
