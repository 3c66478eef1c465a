"""The demo campaign and a platform-like client: seed it, then run one checkout over gRPC.

The client calls the services exactly as a platform's checkout system would (register the
consumer, claim, reserve, capture). Demo consumers are generated at run time with valid ID-number
checksums; nothing personal is printed but masked forms.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import grpc
import yaml

from services.contract.personal_data import id_number_check_char
from services.kernel import rpc
from services.kernel.telemetry import tracer
from subsidy.v1 import (
    audit_pb2_grpc,
    catalog_pb2,
    catalog_pb2_grpc,
    eligibility_pb2,
    eligibility_pb2_grpc,
    identity_pb2,
    identity_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
)

DEMO = Path(__file__).with_name("demo.yaml")
SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗"
GIVEN = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华"


@dataclass(frozen=True)
class Person:
    name: str
    id_number: str
    phone: str


def generate_person(rng: random.Random, address: str = "440310") -> Person:
    """A made-up resident of the campaign area with a valid ID-number checksum."""
    birth = date(1950, 1, 1) + timedelta(days=rng.randrange(0, 365 * 55))
    first17 = f"{address}{birth:%Y%m%d}{rng.randrange(1, 1000):03d}"
    name = rng.choice(SURNAMES) + "".join(rng.choice(GIVEN) for _ in range(rng.choice((1, 2))))
    phone = f"1{rng.choice('3456789')}{rng.randrange(10**9):09d}"
    return Person(name, first17 + id_number_check_char(first17), phone)


class Client:
    """Stubs for every service, as a platform (and an operator) would hold them."""

    def __init__(self, endpoints: dict[str, str]) -> None:
        self._channels = {
            s: rpc.channel(endpoints[s], deadline_s=10)
            for s in ("catalog", "eligibility", "ledger", "audit", "identity_sim")
        }
        self.catalog = catalog_pb2_grpc.CatalogServiceStub(self._channels["catalog"])
        self.eligibility = eligibility_pb2_grpc.EligibilityServiceStub(
            self._channels["eligibility"]
        )
        self.ledger = ledger_pb2_grpc.LedgerServiceStub(self._channels["ledger"])
        self.audit = audit_pb2_grpc.AuditServiceStub(self._channels["audit"])
        self.authority = identity_pb2_grpc.IdentitySimulatorAdminStub(
            self._channels["identity_sim"]
        )

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()


def load_demo(path: Path = DEMO) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


async def seed(
    client: Client, rng: random.Random, demo: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Create the demo campaign; safe to run again (existing merchants and products are kept)."""
    demo = demo or load_demo()
    pool = demo["pool"]
    for f in pool["fundings"]:
        await client.ledger.FundBudget(
            ledger_pb2.FundBudgetRequest(
                pool_id=pool["pool_id"],
                amount_fen=f["amount_fen"],
                source=f["source"],
                idempotency_key=f["idempotency_key"],
            )
        )
    for m in demo["merchants"]:
        try:
            await client.catalog.ApplyMerchant(catalog_pb2.ApplyMerchantRequest(**m))
            await client.catalog.ReviewMerchant(
                catalog_pb2.ReviewMerchantRequest(
                    merchant_id=m["merchant_id"], approve=True, reason="demo merchant"
                )
            )
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
    for p in demo["products"]:
        try:
            await client.catalog.RegisterProduct(catalog_pb2.RegisterProductRequest(**p))
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
    consumers = []
    for _ in range(int(demo["consumers"])):
        c = await register(client, generate_person(rng))
        consumers.append(
            {"consumer_id": c.consumer_id, "id_number": c.id_number_masked, "phone": c.phone_masked}
        )
    budget = await client.ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=pool["pool_id"]))
    return {
        "pool_id": pool["pool_id"],
        "budget_available_fen": budget.available_fen,
        "products": [p["sku"] for p in demo["products"]],
        "consumers": consumers,
    }


async def register(client: Client, person: Person) -> eligibility_pb2.Consumer:
    # The simulated authority must know the person before the real-name check can match.
    await client.authority.Enroll(
        identity_pb2.EnrollRequest(name=person.name, id_number=person.id_number, phone=person.phone)
    )
    consumer: eligibility_pb2.Consumer = await client.eligibility.RegisterConsumer(
        eligibility_pb2.RegisterConsumerRequest(
            name=person.name,
            id_number=person.id_number,
            phone=person.phone,
            platform_id="demo-platform",
        )
    )
    return consumer


async def checkout(
    client: Client, rng: random.Random, *, pool_id: str, sku: str, price_fen: int
) -> dict[str, Any]:
    """One subsidised purchase, as a platform runs it; one trace from start to audit."""
    with tracer().start_as_current_span("platform checkout") as span:
        trace_id = format(span.get_span_context().trace_id, "032x")
        product = await client.catalog.GetProduct(catalog_pb2.GetProductRequest(sku=sku))
        consumer = await register(client, generate_person(rng))
        qual = await client.eligibility.ClaimQualification(
            eligibility_pb2.ClaimQualificationRequest(
                consumer_id=consumer.consumer_id, category=product.category, channel="demo-platform"
            )
        )
        order_id = f"demo-{rng.randrange(16**12):012x}"
        reservation = await client.ledger.ReserveSubsidy(
            ledger_pb2.ReserveSubsidyRequest(
                order_id=order_id,
                platform_id="demo-platform",
                pool_id=pool_id,
                consumer_id=consumer.consumer_id,
                qualification_id=qual.qualification_id,
                sku=sku,
                unit_price_fen=price_fen,
            )
        )
        captured = await client.ledger.CaptureSubsidy(
            ledger_pb2.CaptureSubsidyRequest(order_id=order_id, payment_ref=f"pay-{order_id}")
        )
        budget = await client.ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=pool_id))
    return {
        "order_id": order_id,
        "consumer_id": consumer.consumer_id,
        "id_number": consumer.id_number_masked,
        "category": product.category,
        "status": captured.status,
        "subsidy_fen": reservation.subsidy_fen,
        "policy_version": reservation.policy_version,
        "budget_available_fen": budget.available_fen,
        "trace_id": trace_id,
    }
