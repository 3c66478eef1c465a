"""One checkout is one trace: platform call -> ledger -> catalog, eligibility -> NATS -> audit."""

from __future__ import annotations

import random

from opentelemetry.trace import SpanKind

from services.kernel.telemetry import tracer
from subsidy.v1 import ledger_pb2
from tests.e2e.conftest import Platform, eventually


async def test_checkout_is_one_trace_across_services_and_nats(
    platform: Platform, rng: random.Random
) -> None:
    p = platform
    _, consumer = await p.person(rng)
    sku = await p.product(rng, "tablet", 0, 400_000)
    pool = await p.pool(rng, 1_000_000)
    q_id = await p.claim(consumer, "tablet")
    order = f"trace-{rng.randrange(10**12)}"
    with tracer().start_as_current_span("platform checkout") as root:
        res = await p.ledger.ReserveSubsidy(
            ledger_pb2.ReserveSubsidyRequest(
                order_id=order,
                platform_id="jd",
                pool_id=pool,
                consumer_id=consumer,
                qualification_id=q_id,
                sku=sku,
                unit_price_fen=400_000,
            )
        )
        await p.ledger.CaptureSubsidy(ledger_pb2.CaptureSubsidyRequest(order_id=order))
    assert res.subsidy_fen == 50_000  # tablet at 4,000 yuan: 15% = 600 yuan, capped at 500
    trace_id = root.get_span_context().trace_id

    def names() -> list[str]:
        return [s.name for s in p.spans.get_finished_spans() if s.context.trace_id == trace_id]

    async def reached_audit() -> list[str]:
        got = names()
        assert "audit-log consume SubsidyCaptured" in got, got
        assert "eligibility-ledger consume SubsidyCaptured" in got, got
        # Eligibility's reaction (QualificationUsed) is published and consumed after that, by
        # the relay and the audit log on their own schedules: wait for it too.
        assert "audit-log consume QualificationUsed" in got, got
        return got

    got = await eventually(reached_audit)
    # The platform's call, the ledger's server span, its client calls into catalog and
    # eligibility and their server spans, the relay's publish, and the consumers downstream.
    for expected in (
        "/subsidy.v1.LedgerService/ReserveSubsidy",
        "/subsidy.v1.CatalogService/VerifyItem",
        "/subsidy.v1.EligibilityService/LockQualification",
        "publish SubsidyReserved",
        "audit-log consume SubsidyReserved",
        "publish SubsidyCaptured",
        "publish QualificationUsed",
        "audit-log consume QualificationUsed",
    ):
        assert expected in got, (expected, got)
    spans = [s for s in p.spans.get_finished_spans() if s.context.trace_id == trace_id]
    kinds = {s.kind for s in spans}
    assert {SpanKind.SERVER, SpanKind.CLIENT, SpanKind.PRODUCER, SpanKind.CONSUMER} <= kinds
    # Every span hangs off the platform's root: one connected tree, not several traces.
    ids = {s.context.span_id for s in spans}
    orphans = [s.name for s in spans if s.parent is not None and s.parent.span_id not in ids]
    assert orphans == []
