"""The demo campaign and a platform-like client: seed it, then run one checkout over gRPC.

The client calls the services exactly as a platform's checkout system would (register the
consumer, claim, reserve, capture), with mutual TLS: each call presents the certificate of the
demo identity whose role the authorisation table (services/kernel/authz.py) allows it, preferring
the platform (so a checkout is the demo platform's, funding the demo operator's, a merchant's
approval the demo approver's, the audit log's pages the demo auditor's). Demo consumers are
generated at run time with valid ID-number checksums; nothing personal is printed but masked
forms.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any, cast

import grpc
import yaml

from services.kernel import authz, rpc, tls
from services.kernel.contract.personal_data import id_number_check_char
from services.kernel.contract.policy import default_policy, policy_from_dict, policy_to_dict
from services.kernel.identity import Caller, Role
from services.kernel.telemetry import tracer
from subsidy.v1 import (
    audit_pb2_grpc,
    cases_pb2_grpc,
    catalog_pb2,
    catalog_pb2_grpc,
    common_pb2,
    eligibility_pb2,
    eligibility_pb2_grpc,
    eventlog_pb2_grpc,
    identity_pb2,
    identity_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
)

DEMO = Path(__file__).with_name("demo.yaml")
# Where the demo consumers claim from: the campaign's area, where generate_person's residents
# live (the policy's campaign regions must contain it).
DEMO_REGION = "440310"
IN_REGION = common_pb2.Circumstances(region_code=DEMO_REGION)
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


# Which demo identity makes a call: the first of these roles the table allows for the method.
PREFERENCE = (Role.PLATFORM, Role.OPERATOR, Role.APPROVER, Role.AUDITOR)


def role_for(method: str) -> Role:
    """The role the demo calls ``method`` as (a method the table does not name: the platform,
    and the server refuses it)."""
    allowed = authz.RULES.get(method, frozenset())
    return next((r for r in PREFERENCE if r.value in allowed), Role.PLATFORM)


@dataclass(frozen=True)
class Identities:
    """One certificate per role the demo acts in."""

    by_role: Mapping[Role, tls.CertificateSource]

    @classmethod
    def demo(cls, certs: Path) -> Identities:
        """The demo identities the local stack issues into ``certs`` (run/certs)."""
        from .stack.certs import (
            APPROVER_DEMO,
            AUDITOR_DEMO,
            OPERATOR_DEMO,
            PLATFORM_DEMO,
            identity_dir,
        )

        return cls(
            {
                who.role: tls.FileCertificates(identity_dir(certs, who))
                for who in (PLATFORM_DEMO, OPERATOR_DEMO, APPROVER_DEMO, AUDITOR_DEMO)
            }
        )

    def caller(self, role: Role) -> Caller:
        return Caller.parse(self.by_role[role].current().spiffe_id())


class RoutingChannel(rpc.RoutedChannel[Role]):
    """A channel to one server that opens one mutual-TLS channel per role and sends each call
    over the one whose certificate fits the method (:func:`role_for`)."""

    def __init__(
        self,
        target: str,
        identities: Identities,
        *,
        deadline_s: float,
        choose: Callable[[str], Role] = role_for,
    ) -> None:
        super().__init__(
            target,
            lambda role: identities.by_role[role],
            lambda method, _request: choose(method),
            Role.PLATFORM,
            deadline_s=deadline_s,
        )


class Client:
    """Stubs for every service, as a platform (and the people who run the campaign) hold them.

    ``identities`` defaults to the demo identities of the local stack whose ``endpoints`` these
    are (``LocalStack.endpoints()`` names its ``certs`` folder)."""

    def __init__(
        self,
        endpoints: Mapping[str, str],
        identities: Identities | None = None,
        *,
        deadline_s: float = 10,
    ) -> None:
        if identities is None:
            identities = Identities.demo(Path(endpoints["certs"]))
        self.identities = identities
        self.platform_id = identities.caller(Role.PLATFORM).name
        self._routers = {
            s: RoutingChannel(endpoints[s], identities, deadline_s=deadline_s)
            for s in ("catalog", "eligibility", "ledger", "audit", "identity_sim")
        }
        # the stubs call only the four factories, which a RoutingChannel has
        self._channels = {s: cast(grpc.aio.Channel, r) for s, r in self._routers.items()}
        self.catalog = catalog_pb2_grpc.CatalogServiceStub(self._channels["catalog"])
        self.eligibility = eligibility_pb2_grpc.EligibilityServiceStub(
            self._channels["eligibility"]
        )
        self.ledger = ledger_pb2_grpc.LedgerServiceStub(self._channels["ledger"])
        self.audit = audit_pb2_grpc.AuditServiceStub(self._channels["audit"])
        self.cases = cases_pb2_grpc.CaseServiceStub(self._channels["audit"])  # audit serves it
        self.authority = identity_pb2_grpc.IdentitySimulatorAdminStub(
            self._channels["identity_sim"]
        )
        # Each service's own store, listed (what subsidyctl audit verify compares the log with).
        self.event_logs = {
            s: eventlog_pb2_grpc.EventLogServiceStub(self._channels[s])
            for s in ("catalog", "eligibility", "ledger", "audit")
        }

    async def close(self) -> None:
        for router in self._routers.values():
            await router.close()


def load_demo(path: Path = DEMO) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def write_demo_policy(directory: Path, demo: Mapping[str, Any] | None = None) -> Path:
    """The demo campaign's policy document (the bundled rules with the parts demo.yaml
    replaces), written into ``directory``; point SUBSIDY_INITIAL_POLICY at it."""
    document = policy_to_dict(default_policy())
    document.update((demo or load_demo())["policy"])
    policy_from_dict(document)  # a broken demo file fails here, not in the catalog
    path = directory / "demo-policy.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True, sort_keys=False))
    return path


async def seed(
    client: Client, rng: random.Random, demo: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Create the demo campaign; safe to run again (existing merchants and products are kept)."""
    demo = demo or load_demo()
    pool = demo["pool"]
    for f in pool["fundings"]:  # maker-checker: the demo operator proposes, the approver approves
        proposal = await client.ledger.ProposeFunding(
            ledger_pb2.ProposeFundingRequest(
                pool_id=pool["pool_id"],
                amount_fen=f["amount_fen"],
                source=f["source"],
                idempotency_key=f["idempotency_key"],
                reason="demo campaign budget",
                platform_ids=pool.get("platform_ids", []),
            )
        )
        await client.ledger.ApproveFunding(
            ledger_pb2.ApproveFundingRequest(proposal_id=proposal.proposal_id, reason="demo")
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


async def register(
    client: Client, person: Person, identifiers: eligibility_pb2.Identifiers | None = None
) -> eligibility_pb2.Consumer:
    """Register a generated person (``identifiers``: what else the platform knows of them)."""
    # The simulated authority must know the person before the real-name check can match.
    await client.authority.Enroll(
        identity_pb2.EnrollRequest(name=person.name, id_number=person.id_number, phone=person.phone)
    )
    consumer: eligibility_pb2.Consumer = await client.eligibility.RegisterConsumer(
        eligibility_pb2.RegisterConsumerRequest(
            name=person.name,
            id_number=person.id_number,
            phone=person.phone,
            platform_id=client.platform_id,  # must be the certificate's own platform
            identifiers=identifiers,
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
                circumstances=IN_REGION,
                consumer_id=consumer.consumer_id,
                category=product.category,
                channel=client.platform_id,
            )
        )
        order_id = f"demo-{rng.randrange(16**12):012x}"
        reservation = await client.ledger.ReserveSubsidy(
            ledger_pb2.ReserveSubsidyRequest(
                order_id=order_id,
                platform_id=client.platform_id,
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
