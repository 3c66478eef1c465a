"""Bad input gets a precise error and changes nothing: every RPC of ledger, eligibility, audit.

Each case breaks exactly one thing in an otherwise valid request and asserts the exact gRPC
status code (never INTERNAL or UNKNOWN), the machine-readable reason and the ``field`` of the
ErrorInfo, and that nothing changed anywhere: every service's event count, the ledger's and
eligibility's read models (budget figures, reservations, consumers, qualification status,
quotas, person keys) and the audit log's size and head are identical before and after.

ID numbers are generated at run time (tests/support/identities.py); none is written here.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from sqlalchemy import text

from services.audit import log as audit_log
from services.kernel.eventstore import EventStore
from services.kernel.rpc import error_info
from subsidy.v1 import audit_pb2, eligibility_pb2, identity_pb2, ledger_pb2
from subsidyctl.cli.reconcile import send_bill
from subsidyctl.demo import IN_REGION
from tests.e2e.conftest import Platform, eventually, status_of
from tests.support.identities import (
    Person,
    check_char,
    make_id_number,
    make_name,
    make_person,
    make_phone,
    with_check_char,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
EXISTS = grpc.StatusCode.ALREADY_EXISTS

FRIDGE_PRICE = 1_200_000  # grade 1 at 12,000 yuan: 2,000 yuan of subsidy
PHONE_PRICE = 300_000
INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1


# -- the world every case runs against ---------------------------------------------------------
@dataclass(frozen=True)
class World:
    """Pools, products, consumers and qualifications in every state a rejection needs."""

    pool: str  # well funded
    tiny_pool: str  # 10 yuan: no refrigerator fits
    funding_key: str  # used once, for `pool`
    fridge: str  # SKU: refrigerator, grade 1
    phone: str  # SKU: phone (price ceiling 6,000 yuan)
    a: str  # consumer A
    qa: str  # A's AVAILABLE refrigerator qualification
    b: str  # consumer B: three air-conditioner qualifications (the limit)
    qb: str  # B's AVAILABLE refrigerator qualification
    c: str
    qc: str  # LOCKED to order `pending`
    pending: str  # PENDING reservation
    d: str
    qd: str  # USED by order `captured`
    captured: str  # CAPTURED reservation
    e: str
    qe: str  # given back when `released` was cancelled
    released: str  # RELEASED (CANCELLED) reservation
    enrolled: Person  # known to the identity authority, never registered here


def _order(rng: random.Random) -> str:
    return f"o-{rng.randrange(10**12)}"


async def _claim(p: Platform, consumer: str, category: str) -> str:
    q = await p.eligibility.ClaimQualification(
        eligibility_pb2.ClaimQualificationRequest(
            circumstances=IN_REGION, consumer_id=consumer, category=category, channel="jd"
        )
    )
    return q.qualification_id


async def _reserve(
    p: Platform, rng: random.Random, pool: str, consumer: str, qid: str, sku: str
) -> str:
    order = _order(rng)
    await p.ledger.ReserveSubsidy(
        ledger_pb2.ReserveSubsidyRequest(
            order_id=order,
            platform_id="jd",
            pool_id=pool,
            consumer_id=consumer,
            qualification_id=qid,
            sku=sku,
            unit_price_fen=FRIDGE_PRICE,
        )
    )
    return order


async def build_world(p: Platform, rng: random.Random) -> World:
    pool = await p.pool(rng, 10_000_000)
    funding_key = f"fund-{rng.randrange(10**12)}"
    await p.fund(
        ledger_pb2.ProposeFundingRequest(
            pool_id=pool, amount_fen=1_000, source="district", idempotency_key=funding_key
        )
    )
    tiny_pool = await p.pool(rng, 1_000)
    fridge = await p.product(rng, "refrigerator", 1, FRIDGE_PRICE)
    phone = await p.product(rng, "phone", 0, PHONE_PRICE)
    consumers = [(await p.person(rng))[1] for _ in range(5)]
    a, b, c, d, e = consumers
    qa, qb, qc, qd, qe = [await _claim(p, x, "refrigerator") for x in consumers]
    for _ in range(3):
        await _claim(p, b, "air_conditioner")
    pending = await _reserve(p, rng, pool, c, qc, fridge)
    captured = await _reserve(p, rng, pool, d, qd, fridge)
    await p.ledger.CaptureSubsidy(
        ledger_pb2.CaptureSubsidyRequest(order_id=captured, payment_ref="pay-1")
    )
    released = await _reserve(p, rng, pool, e, qe, fridge)
    await p.ledger.ReleaseSubsidy(
        ledger_pb2.ReleaseSubsidyRequest(order_id=released, reason="CANCELLED")
    )
    enrolled = make_person(rng)
    await p.authority.Enroll(
        identity_pb2.EnrollRequest(
            name=enrolled.name, id_number=enrolled.id_number, phone=enrolled.phone
        )
    )
    world = World(
        pool,
        tiny_pool,
        funding_key,
        fridge,
        phone,
        a,
        qa,
        b,
        qb,
        c,
        qc,
        pending,
        d,
        qd,
        captured,
        e,
        qe,
        released,
        enrolled,
    )

    async def states_reached() -> None:
        for qid, status in ((qa, "AVAILABLE"), (qc, "LOCKED"), (qd, "USED"), (qe, "AVAILABLE")):
            got = await p.eligibility.GetQualification(
                eligibility_pb2.GetQualificationRequest(qualification_id=qid)
            )
            assert got.status == status, (qid, got.status, status)

    await eventually(states_reached)
    return world


_worlds: dict[str, World] = {}


@pytest.fixture
async def world(platform: Platform, rng: random.Random) -> World:
    """Built once, by the first case that needs it (rejections change nothing, so it lasts)."""
    if "world" not in _worlds:
        _worlds["world"] = await build_world(platform, rng)
    return _worlds["world"]


# -- "nothing changed" ---------------------------------------------------------------------------
LEDGER_TABLES = ("budget_pools", "reservations", "funding_keys")
ELIGIBILITY_TABLES = (
    "consumers",
    "person_keys",
    "qualifications",
    "quota_usage",
    "policies",
    "persons",
    "person_members",
    "consumer_erasures",
)


@dataclass(frozen=True)
class State:
    events: dict[str, int]
    ledger: dict[str, list[tuple[Any, ...]]]
    eligibility: dict[str, list[tuple[Any, ...]]]
    audit_size: int
    audit_head: bytes


async def _rows(store: EventStore, tables: tuple[str, ...]) -> dict[str, list[tuple[Any, ...]]]:
    async with store.engine.connect() as conn:
        return {
            t: [tuple(r) for r in await conn.execute(text(f"SELECT * FROM {t} ORDER BY 1, 2"))]
            for t in tables
        }


async def _scalar(store: EventStore, sql: str, **params: Any) -> int:
    async with store.engine.connect() as conn:
        return int(await conn.scalar(text(sql), params) or 0)


async def _read_state(p: Platform) -> State:
    await p.quiesce()
    events = {name: await r.runtime.store.count() for name, r in p.running.items()}
    size, head, _ = await audit_log.info(p.running["audit"].runtime.store)
    assert size == sum(events.values()), "the audit log is still catching up"
    return State(
        events,
        await _rows(p.running["ledger"].runtime.store, LEDGER_TABLES),
        await _rows(p.running["eligibility"].runtime.store, ELIGIBILITY_TABLES),
        size,
        head,
    )


async def settled_state(p: Platform) -> State:
    """The whole observable state, once every event has reached its consumers (two reads agree)."""

    async def read() -> State:
        first = await _read_state(p)
        assert await _read_state(p) == first, "still moving"
        return first

    return await eventually(read)


# -- the cases --------------------------------------------------------------------------------
Build = Callable[[World, random.Random], Message]


@dataclass(frozen=True)
class Case:
    id: str
    rpc: str  # "<platform stub attribute>.<method>"
    build: Build
    code: grpc.StatusCode
    reason: str
    field: str
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    # The one event a refusal records by design (a failed identity check, for operators and
    # the attempt limit); every other refusal records nothing.
    records: str = ""


CASES: list[Case] = []


def case(
    id: str,
    rpc: str,
    build: Build,
    code: grpc.StatusCode,
    reason: str,
    field: str,
    records: str = "",
    **metadata: str,
) -> None:
    CASES.append(Case(id, rpc, build, code, reason, field, metadata, records))


LONG = "a" * 65
BAD_IDENTIFIERS = {  # value -> what is wrong with it
    "space": "a b",
    "slash": "a/b",
    "leading-dash": "-ab",
    "non-ascii": "订单1",
    "trailing-newline": "ab\n",
    "nul": "a\x00b",
    "sql": "a';--",
}


Make = Callable[..., Message]  # (world, rng, **fields) -> request


def setting(make: Make, name: str) -> Callable[[World, random.Random, str], Message]:
    """Build with field ``name`` set to the value a case supplies."""
    return lambda w, rng, value: make(w, rng, **{name: value})


def fixed(make: Make, **fields: Any) -> Build:
    """Build with these field values."""
    return lambda w, rng: make(w, rng, **fields)


def generated(make: Make, name: str, gen: Callable[[random.Random], str]) -> Build:
    """Build with field ``name`` generated at run time (ID numbers, phones)."""
    return lambda w, rng: make(w, rng, **{name: gen(rng)})


def identifier_cases(
    rpc: str,
    name: str,
    build: Callable[[World, random.Random, str], Message],
    *,
    full: bool = False,
) -> None:
    """Missing, over-long and badly formed values of the identifier field ``name``."""

    def with_value(value: str) -> Build:
        return lambda w, rng: build(w, rng, value)

    case(f"{rpc}-{name}-missing", rpc, with_value(""), INVALID, "MISSING_FIELD", name)
    case(f"{rpc}-{name}-65-chars", rpc, with_value(LONG), INVALID, "FIELD_TOO_LONG", name)
    bad = (
        BAD_IDENTIFIERS if full else {k: BAD_IDENTIFIERS[k] for k in ("space", "trailing-newline")}
    )
    for what, value in bad.items():
        case(f"{rpc}-{name}-{what}", rpc, with_value(value), INVALID, "INVALID_IDENTIFIER", name)


# LedgerService.ProposeFunding ---------------------------------------------------------------
def fund(w: World, rng: random.Random, **kw: Any) -> ledger_pb2.ProposeFundingRequest:
    values: dict[str, Any] = {"pool_id": w.pool, "amount_fen": 1_000, "source": "district"}
    return ledger_pb2.ProposeFundingRequest(**(values | kw))


FUND = "ledger.ProposeFunding"
identifier_cases(FUND, "pool_id", lambda w, rng, v: fund(w, rng, pool_id=v), full=True)
for _amount in (0, -1, -(10**6), 10**14 + 1, INT64_MAX):
    case(
        f"{FUND}-amount-{_amount}",
        FUND,
        fixed(fund, amount_fen=_amount),
        INVALID,
        "INVALID_AMOUNT",
        "amount_fen",
    )
for _shards in (-1, 65, 2**31 - 1):  # 1..64 shards (0: the pool's count unchanged)
    case(
        f"{FUND}-shards-{_shards}",
        FUND,
        fixed(fund, shards=_shards),
        INVALID,
        "INVALID_SHARDS",
        "shards",
    )
case(
    f"{FUND}-source-blank",
    FUND,
    lambda w, rng: fund(w, rng, source="   "),
    INVALID,
    "MISSING_FIELD",
    "source",
)
case(
    f"{FUND}-source-65-chars",
    FUND,
    lambda w, rng: fund(w, rng, source="s" * 65),
    INVALID,
    "FIELD_TOO_LONG",
    "source",
)
case(
    f"{FUND}-source-control-char",
    FUND,
    lambda w, rng: fund(w, rng, source="dis\x1btrict"),
    INVALID,
    "INVALID_TEXT",
    "source",
)
case(
    f"{FUND}-key-129-chars",
    FUND,
    lambda w, rng: fund(w, rng, idempotency_key="k" * 129),
    INVALID,
    "FIELD_TOO_LONG",
    "idempotency_key",
)
case(
    f"{FUND}-key-space",
    FUND,
    lambda w, rng: fund(w, rng, idempotency_key="k 1"),
    INVALID,
    "INVALID_IDENTIFIER",
    "idempotency_key",
)
case(
    f"{FUND}-key-reused-other-amount",
    FUND,
    lambda w, rng: fund(w, rng, idempotency_key=w.funding_key, amount_fen=2_000),
    EXISTS,
    "IDEMPOTENCY_KEY_REUSED",
    "idempotency_key",
)
case(
    f"{FUND}-key-reused-other-pool",
    FUND,
    lambda w, rng: fund(w, rng, idempotency_key=w.funding_key, pool_id=w.tiny_pool),
    EXISTS,
    "IDEMPOTENCY_KEY_REUSED",
    "idempotency_key",
)

# LedgerService.GetBudget -------------------------------------------------------------------------
GET_BUDGET = "ledger.GetBudget"
identifier_cases(GET_BUDGET, "pool_id", lambda w, rng, v: ledger_pb2.GetBudgetRequest(pool_id=v))
case(
    f"{GET_BUDGET}-unknown",
    GET_BUDGET,
    lambda w, rng: ledger_pb2.GetBudgetRequest(pool_id=f"pool-none-{rng.randrange(10**9)}"),
    NOT_FOUND,
    "UNKNOWN_POOL",
    "pool_id",
)
case(
    f"{GET_BUDGET}-unknown-64-chars",
    GET_BUDGET,
    lambda w, rng: ledger_pb2.GetBudgetRequest(pool_id="p" * 64),
    NOT_FOUND,
    "UNKNOWN_POOL",
    "pool_id",
)


# LedgerService.ReserveSubsidy --------------------------------------------------------------------
def reserve(w: World, rng: random.Random, **kw: Any) -> ledger_pb2.ReserveSubsidyRequest:
    """A request that would succeed (A's refrigerator, a new order) but for ``kw``."""
    values: dict[str, Any] = {
        "order_id": _order(rng),
        "platform_id": "jd",
        "pool_id": w.pool,
        "consumer_id": w.a,
        "qualification_id": w.qa,
        "sku": w.fridge,
        "unit_price_fen": FRIDGE_PRICE,
    }
    return ledger_pb2.ReserveSubsidyRequest(**(values | kw))


RESERVE = "ledger.ReserveSubsidy"
for _name in ("order_id", "platform_id", "pool_id", "consumer_id", "qualification_id", "sku"):
    identifier_cases(RESERVE, _name, setting(reserve, _name))
for _price in (0, -1, -INT64_MAX, 10**10 + 1, INT64_MAX):
    case(
        f"{RESERVE}-price-{_price}",
        RESERVE,
        fixed(reserve, unit_price_fen=_price),
        INVALID,
        "INVALID_PRICE",
        "unit_price_fen",
    )
case(
    f"{RESERVE}-serial-65-chars",
    RESERVE,
    lambda w, rng: reserve(w, rng, serial=LONG),
    INVALID,
    "FIELD_TOO_LONG",
    "serial",
)
case(
    f"{RESERVE}-serial-slash",
    RESERVE,
    lambda w, rng: reserve(w, rng, serial="IMEI/1"),
    INVALID,
    "INVALID_IDENTIFIER",
    "serial",
)
case(
    f"{RESERVE}-unknown-pool",
    RESERVE,
    lambda w, rng: reserve(w, rng, pool_id=f"pool-none-{rng.randrange(10**9)}"),
    NOT_FOUND,
    "UNKNOWN_POOL",
    "pool_id",
)
case(
    f"{RESERVE}-budget-exhausted",
    RESERVE,
    lambda w, rng: reserve(w, rng, pool_id=w.tiny_pool),
    EXHAUSTED,
    "BUDGET_EXHAUSTED",
    "pool_id",
)
case(
    f"{RESERVE}-unknown-qualification",
    RESERVE,
    lambda w, rng: reserve(w, rng, qualification_id=f"q-none-{rng.randrange(10**9)}"),
    NOT_FOUND,
    "UNKNOWN_QUALIFICATION",
    "qualification_id",
)
case(
    f"{RESERVE}-unknown-consumer",
    RESERVE,
    lambda w, rng: reserve(w, rng, consumer_id=f"c-none-{rng.randrange(10**9)}"),
    PRECONDITION,
    "QUALIFICATION_NOT_OWNED",
    "qualification_id",
)
case(
    f"{RESERVE}-another-consumers-qualification",
    RESERVE,
    lambda w, rng: reserve(w, rng, qualification_id=w.qb),
    PRECONDITION,
    "QUALIFICATION_NOT_OWNED",
    "qualification_id",
)
case(
    f"{RESERVE}-unknown-sku",
    RESERVE,
    lambda w, rng: reserve(w, rng, sku=f"sku-none-{rng.randrange(10**9)}"),
    PRECONDITION,
    "ITEM_NOT_ELIGIBLE",
    "sku",
    reasons="UNKNOWN_SKU",
)
case(
    f"{RESERVE}-price-above-ceiling",
    RESERVE,
    lambda w, rng: reserve(w, rng, sku=w.phone, unit_price_fen=600_001),
    PRECONDITION,
    "ITEM_NOT_ELIGIBLE",
    "sku",
    reasons="PRICE_ABOVE_CEILING",
)
case(
    f"{RESERVE}-category-mismatch",
    RESERVE,
    lambda w, rng: reserve(w, rng, sku=w.phone, unit_price_fen=PHONE_PRICE),
    PRECONDITION,
    "CATEGORY_MISMATCH",
    "qualification_id",
)
case(
    f"{RESERVE}-qualification-locked-to-another-order",
    RESERVE,
    lambda w, rng: reserve(w, rng, consumer_id=w.c, qualification_id=w.qc),
    PRECONDITION,
    "QUALIFICATION_LOCKED",
    "qualification_id",
)
case(
    f"{RESERVE}-qualification-used",
    RESERVE,
    lambda w, rng: reserve(w, rng, consumer_id=w.d, qualification_id=w.qd),
    PRECONDITION,
    "QUALIFICATION_USED",
    "qualification_id",
)


def reuse_pending_order(change: Callable[[World], dict[str, Any]]) -> Build:
    """The pending order's id again, with something about the order changed."""

    def build(w: World, rng: random.Random) -> Message:
        same = {"order_id": w.pending, "consumer_id": w.c, "qualification_id": w.qc}
        return reserve(w, rng, **(same | change(w)))

    return build


REUSED_ORDER_CHANGES: dict[str, Callable[[World], dict[str, Any]]] = {
    "other-item": lambda w: {"sku": w.phone, "unit_price_fen": PHONE_PRICE},
    "other-price": lambda w: {"unit_price_fen": FRIDGE_PRICE - 1},
    "other-pool": lambda w: {"pool_id": w.tiny_pool},
    "other-qualification": lambda w: {"consumer_id": w.a, "qualification_id": w.qa},
}
for _what, _change in REUSED_ORDER_CHANGES.items():
    case(
        f"{RESERVE}-order-id-reused-{_what}",
        RESERVE,
        reuse_pending_order(_change),
        EXISTS,
        "ORDER_ID_REUSED",
        "order_id",
    )


# LedgerService.CaptureSubsidy --------------------------------------------------------------------
def capture(w: World, rng: random.Random, **kw: Any) -> ledger_pb2.CaptureSubsidyRequest:
    values: dict[str, Any] = {"order_id": w.pending, "payment_ref": "pay-2"}
    return ledger_pb2.CaptureSubsidyRequest(**(values | kw))


CAPTURE = "ledger.CaptureSubsidy"
identifier_cases(CAPTURE, "order_id", lambda w, rng, v: capture(w, rng, order_id=v))
case(
    f"{CAPTURE}-unknown-order",
    CAPTURE,
    lambda w, rng: capture(w, rng, order_id=_order(rng)),
    NOT_FOUND,
    "UNKNOWN_ORDER",
    "order_id",
)
case(
    f"{CAPTURE}-payment-ref-129-chars",
    CAPTURE,
    lambda w, rng: capture(w, rng, payment_ref="p" * 129),
    INVALID,
    "FIELD_TOO_LONG",
    "payment_ref",
)
case(
    f"{CAPTURE}-payment-ref-control-char",
    CAPTURE,
    lambda w, rng: capture(w, rng, payment_ref="pay\x00"),
    INVALID,
    "INVALID_TEXT",
    "payment_ref",
)
case(
    f"{CAPTURE}-paid-amount-negative",
    CAPTURE,
    lambda w, rng: capture(w, rng, paid_amount_fen=-1),
    INVALID,
    "INVALID_AMOUNT",
    "paid_amount_fen",
)
case(
    f"{CAPTURE}-paid-amount-above-any-price",
    CAPTURE,
    lambda w, rng: capture(w, rng, paid_amount_fen=10**12),
    INVALID,
    "INVALID_AMOUNT",
    "paid_amount_fen",
)
case(
    f"{CAPTURE}-after-release",
    CAPTURE,
    lambda w, rng: capture(w, rng, order_id=w.released),
    PRECONDITION,
    "RESERVATION_NOT_PENDING",
    "order_id",
)


# LedgerService.ReleaseSubsidy --------------------------------------------------------------------
def release(w: World, rng: random.Random, **kw: Any) -> ledger_pb2.ReleaseSubsidyRequest:
    values: dict[str, Any] = {"order_id": w.pending, "reason": "CANCELLED"}
    return ledger_pb2.ReleaseSubsidyRequest(**(values | kw))


RELEASE = "ledger.ReleaseSubsidy"
identifier_cases(RELEASE, "order_id", lambda w, rng, v: release(w, rng, order_id=v))
for _reason in ("", "EXPIRED", "cancelled", "REFUND", "CANCELLED\n", LONG):
    case(
        f"{RELEASE}-reason-{_reason[:12]!r}",
        RELEASE,
        fixed(release, reason=_reason),
        INVALID,
        "INVALID_CHOICE",
        "reason",
    )
case(
    f"{RELEASE}-unknown-order",
    RELEASE,
    lambda w, rng: release(w, rng, order_id=_order(rng)),
    NOT_FOUND,
    "UNKNOWN_ORDER",
    "order_id",
)
case(
    f"{RELEASE}-refund-before-capture",
    RELEASE,
    lambda w, rng: release(w, rng, reason="REFUNDED"),
    PRECONDITION,
    "NOT_CAPTURED",
    "reason",
)
case(
    f"{RELEASE}-cancel-after-capture",
    RELEASE,
    lambda w, rng: release(w, rng, order_id=w.captured, reason="CANCELLED"),
    PRECONDITION,
    "ALREADY_CAPTURED",
    "reason",
)

# LedgerService.GetReservation --------------------------------------------------------------------
GET_RES = "ledger.GetReservation"
identifier_cases(
    GET_RES, "order_id", lambda w, rng, v: ledger_pb2.GetReservationRequest(order_id=v), full=True
)
case(
    f"{GET_RES}-unknown",
    GET_RES,
    lambda w, rng: ledger_pb2.GetReservationRequest(order_id=_order(rng)),
    NOT_FOUND,
    "UNKNOWN_ORDER",
    "order_id",
)
case(
    f"{GET_RES}-unknown-64-chars",
    GET_RES,
    lambda w, rng: ledger_pb2.GetReservationRequest(order_id="o" * 64),
    NOT_FOUND,
    "UNKNOWN_ORDER",
    "order_id",
)


# LedgerService.ApproveFunding and GetFundingProposal ---------------------------------------------
def _approve(w: World, rng: random.Random, **kw: Any) -> ledger_pb2.ApproveFundingRequest:
    values: dict[str, Any] = {"proposal_id": f"fp-{rng.randrange(10**12)}", "reason": "ok"}
    return ledger_pb2.ApproveFundingRequest(**(values | kw))


APPROVE_FUNDING, GET_PROPOSAL = "ledger.ApproveFunding", "ledger.GetFundingProposal"
_FP_RPCS: list[tuple[str, Callable[[World, random.Random, str], Message]]] = [
    (APPROVE_FUNDING, lambda w, rng, v: _approve(w, rng, proposal_id=v)),
    (GET_PROPOSAL, lambda w, rng, v: ledger_pb2.GetFundingProposalRequest(proposal_id=v)),
]


def proposal_id_cases(rpc: str, make: Callable[[World, random.Random, str], Message]) -> None:
    """Missing, over-long, badly formed and unknown proposal ids (up to 200 characters: an
    id is ``fp-`` and the proposal's idempotency key)."""

    def with_value(value: Callable[[random.Random], str]) -> Build:
        return lambda w, rng: make(w, rng, value(rng))

    case(f"{rpc}-missing", rpc, with_value(lambda r: ""), INVALID, "MISSING_FIELD", "proposal_id")
    too_long = with_value(lambda r: "p" * 201)
    case(f"{rpc}-201-chars", rpc, too_long, INVALID, "FIELD_TOO_LONG", "proposal_id")
    for what, bad in BAD_IDENTIFIERS.items():
        case(
            f"{rpc}-{what}",
            rpc,
            with_value(lambda r, b=bad: b),  # type: ignore[misc]
            INVALID,
            "INVALID_IDENTIFIER",
            "proposal_id",
        )
    unknown = with_value(lambda r: f"fp-{r.randrange(10**12)}")
    case(f"{rpc}-unknown", rpc, unknown, NOT_FOUND, "UNKNOWN_PROPOSAL", "proposal_id")


for _fp_rpc, _fp_make in _FP_RPCS:
    proposal_id_cases(_fp_rpc, _fp_make)
case(
    f"{APPROVE_FUNDING}-reason-501-chars",
    APPROVE_FUNDING,
    lambda w, rng: _approve(w, rng, reason="r" * 501),
    INVALID,
    "FIELD_TOO_LONG",
    "reason",
)
case(
    f"{FUND}-reason-501-chars",
    FUND,
    lambda w, rng: fund(w, rng, reason="r" * 501),
    INVALID,
    "FIELD_TOO_LONG",
    "reason",
)
case(
    f"{FUND}-above-the-ceiling",
    FUND,
    lambda w, rng: fund(w, rng, amount_fen=10**12),
    PRECONDITION,
    "FUNDING_CEILING",
    "amount_fen",
)


# EligibilityService.RegisterConsumer -------------------------------------------------------------
def register(w: World, rng: random.Random, **kw: Any) -> eligibility_pb2.RegisterConsumerRequest:
    """The enrolled person's registration, which would succeed but for ``kw``."""
    p = w.enrolled
    values: dict[str, Any] = {
        "name": p.name,
        "id_number": p.id_number,
        "phone": p.phone,
        "platform_id": "jd",
    }
    return eligibility_pb2.RegisterConsumerRequest(**(values | kw))


def _id(rng: random.Random) -> str:
    return make_id_number(rng)


def bad_checksum(rng: random.Random) -> str:
    number = _id(rng)
    wrong = rng.choice([c for c in "10X98765432" if c != number[17]])
    return number[:17] + wrong


def with_birth(rng: random.Random, digits: str) -> str:
    """An ID number whose only fault is its 8 birth-date digits (the check char is right)."""
    return with_check_char(f"440310{digits}{rng.randrange(100, 1000)}")


BAD_ID_NUMBERS: dict[str, tuple[Callable[[random.Random], str], str]] = {
    "checksum": (bad_checksum, "ID_NUMBER_CHECKSUM"),
    "feb-30": (lambda rng: with_birth(rng, "19900230"), "ID_NUMBER_BIRTH_DATE"),
    "month-13": (lambda rng: with_birth(rng, "19901301"), "ID_NUMBER_BIRTH_DATE"),
    "day-00": (lambda rng: with_birth(rng, "19900100"), "ID_NUMBER_BIRTH_DATE"),
    "born-1799": (lambda rng: with_birth(rng, "17991231"), "ID_NUMBER_BIRTH_DATE"),
    "born-next-year": (
        lambda rng: with_birth(rng, f"{dt.date.today() + dt.timedelta(days=400):%Y%m%d}"),
        "ID_NUMBER_BIRTH_DATE",
    ),
    "17-chars": (lambda rng: _id(rng)[:17], "ID_NUMBER_LENGTH"),
    "19-chars": (lambda rng: _id(rng) + "0", "ID_NUMBER_LENGTH"),
    "15-digit-old-format": (lambda rng: _id(rng)[:15], "ID_NUMBER_LENGTH"),
    "empty": (lambda rng: "", "ID_NUMBER_LENGTH"),
    "inner-space": (lambda rng: (n := _id(rng))[:6] + " " + n[6:], "ID_NUMBER_LENGTH"),
    "letter-inside": (lambda rng: (n := _id(rng))[:10] + "A" + n[11:], "ID_NUMBER_FORMAT"),
    "x-inside": (lambda rng: (n := _id(rng))[:16] + "X" + n[17:], "ID_NUMBER_FORMAT"),
    "leading-zero": (
        lambda rng: "0" + (n := _id(rng))[1:17] + check_char("0" + n[1:17]),
        "ID_NUMBER_FORMAT",
    ),
    "full-width-digits": (
        lambda rng: (
            _id(rng)[:17].translate(str.maketrans("0123456789", "０１２３４５６７８９")) + "1"
        ),
        "ID_NUMBER_FORMAT",
    ),
}
BAD_PHONES: dict[str, tuple[Callable[[random.Random], str], str]] = {
    "10-digits": (lambda rng: make_phone(rng)[:10], "PHONE_LENGTH"),
    "12-digits": (lambda rng: make_phone(rng) + "1", "PHONE_LENGTH"),
    "empty": (lambda rng: "", "PHONE_LENGTH"),
    "second-digit-2": (lambda rng: "12" + make_phone(rng)[2:], "PHONE_FORMAT"),
    "starts-with-2": (lambda rng: "2" + make_phone(rng)[1:], "PHONE_FORMAT"),
    "letter": (lambda rng: make_phone(rng)[:10] + "a", "PHONE_FORMAT"),
    "country-code-85": (lambda rng: "+85" + make_phone(rng), "PHONE_FORMAT"),
}
BAD_NAMES: dict[str, tuple[str, str]] = {
    "empty": ("", "NAME_LENGTH"),
    "blank": ("   ", "NAME_LENGTH"),
    "65-chars": ("张" * 65, "NAME_LENGTH"),
    "nul": ("张\x00三", "NAME_FORMAT"),
    "newline": ("张\n三", "NAME_FORMAT"),
    "zero-width-space": ("张\u200b三", "NAME_FORMAT"),
    "bidi-override": ("张\u202e三", "NAME_FORMAT"),
}

REGISTER = "eligibility.RegisterConsumer"
for _what, (_make, _reason) in BAD_ID_NUMBERS.items():
    case(
        f"{REGISTER}-id-number-{_what}",
        REGISTER,
        generated(register, "id_number", _make),
        INVALID,
        _reason,
        "id_number",
    )
for _what, (_make, _reason) in BAD_PHONES.items():
    case(
        f"{REGISTER}-phone-{_what}",
        REGISTER,
        generated(register, "phone", _make),
        INVALID,
        _reason,
        "phone",
    )
for _what, (_value, _reason) in BAD_NAMES.items():
    case(
        f"{REGISTER}-name-{_what}",
        REGISTER,
        fixed(register, name=_value),
        INVALID,
        _reason,
        "name",
    )
identifier_cases(REGISTER, "platform_id", lambda w, rng, v: register(w, rng, platform_id=v))


def _other_name(rng: random.Random, name: str) -> str:
    while (other := make_name(rng)) == name:
        pass
    return other


def _other_phone(rng: random.Random, phone: str) -> str:
    while (other := make_phone(rng)) == phone:
        pass
    return other


case(
    f"{REGISTER}-authority-name-mismatch",
    REGISTER,
    lambda w, rng: register(w, rng, name=_other_name(rng, w.enrolled.name)),
    PRECONDITION,
    "IDENTITY_MISMATCH",
    "",
    records="subsidy.v1.IdentityCheckFailed",
)
case(
    f"{REGISTER}-authority-phone-mismatch",
    REGISTER,
    lambda w, rng: register(w, rng, phone=_other_phone(rng, w.enrolled.phone)),
    PRECONDITION,
    "IDENTITY_MISMATCH",
    "",
    records="subsidy.v1.IdentityCheckFailed",
)
case(
    f"{REGISTER}-authority-not-found",
    REGISTER,
    lambda w, rng: register(w, rng, id_number=_id(rng)),
    PRECONDITION,
    "IDENTITY_MISMATCH",
    "",
    records="subsidy.v1.IdentityCheckFailed",
)


# EligibilityService.ClaimQualification -----------------------------------------------------------
def claim(w: World, rng: random.Random, **kw: Any) -> eligibility_pb2.ClaimQualificationRequest:
    """A claim that would succeed (A's first phone) but for ``kw``."""
    values: dict[str, Any] = {
        "consumer_id": w.a,
        "category": "phone",
        "channel": "jd",
        "circumstances": IN_REGION,
    }
    return eligibility_pb2.ClaimQualificationRequest(**(values | kw))


CLAIM = "eligibility.ClaimQualification"
for _name in ("consumer_id", "category", "channel"):
    identifier_cases(CLAIM, _name, setting(claim, _name))
case(
    f"{CLAIM}-unknown-category",
    CLAIM,
    lambda w, rng: claim(w, rng, category="spaceship"),
    INVALID,
    "UNKNOWN_CATEGORY",
    "category",
)
case(
    f"{CLAIM}-category-wrong-case",
    CLAIM,
    lambda w, rng: claim(w, rng, category="Phone"),
    INVALID,
    "UNKNOWN_CATEGORY",
    "category",
)
case(
    f"{CLAIM}-unknown-consumer",
    CLAIM,
    lambda w, rng: claim(w, rng, consumer_id=f"c-none-{rng.randrange(10**9)}"),
    NOT_FOUND,
    "UNKNOWN_CONSUMER",
    "consumer_id",
)
case(
    f"{CLAIM}-beyond-limit-of-one",
    CLAIM,
    lambda w, rng: claim(w, rng, category="refrigerator"),
    EXHAUSTED,
    "PERSON_LIMIT_REACHED",
    "category",
)
case(
    f"{CLAIM}-beyond-limit-of-three",
    CLAIM,
    lambda w, rng: claim(w, rng, consumer_id=w.b, category="air_conditioner"),
    EXHAUSTED,
    "PERSON_LIMIT_REACHED",
    "category",
)
case(
    f"{CLAIM}-locked-counts-towards-limit",
    CLAIM,
    lambda w, rng: claim(w, rng, consumer_id=w.c, category="refrigerator"),
    EXHAUSTED,
    "PERSON_LIMIT_REACHED",
    "category",
)
case(
    f"{CLAIM}-used-counts-towards-limit",
    CLAIM,
    lambda w, rng: claim(w, rng, consumer_id=w.d, category="refrigerator"),
    EXHAUSTED,
    "PERSON_LIMIT_REACHED",
    "category",
)


# EligibilityService.GetQualification -------------------------------------------------------------
def qualification_id_cases(rpc: str, build: Callable[[World, random.Random, str], Message]) -> None:
    identifier_cases(rpc, "qualification_id", build)
    case(
        f"{rpc}-unknown-qualification",
        rpc,
        lambda w, rng: build(w, rng, f"q-none-{rng.randrange(10**9)}"),
        NOT_FOUND,
        "UNKNOWN_QUALIFICATION",
        "qualification_id",
    )


GET_Q = "eligibility.GetQualification"
qualification_id_cases(
    GET_Q, lambda w, rng, v: eligibility_pb2.GetQualificationRequest(qualification_id=v)
)


# EligibilityService.LockQualification ------------------------------------------------------------
def lock(w: World, rng: random.Random, **kw: Any) -> eligibility_pb2.LockQualificationRequest:
    """A lock that would succeed (A's refrigerator, a new order) but for ``kw``."""
    values: dict[str, Any] = {
        "qualification_id": w.qa,
        "order_id": _order(rng),
        "category": "refrigerator",
        "consumer_id": w.a,
        "platform_id": "jd",
    }
    return eligibility_pb2.LockQualificationRequest(**(values | kw))


LOCK = "eligibility.LockQualification"
qualification_id_cases(LOCK, lambda w, rng, v: lock(w, rng, qualification_id=v))
for _name in ("order_id", "consumer_id", "category", "platform_id"):
    identifier_cases(LOCK, _name, setting(lock, _name))
case(
    f"{LOCK}-another-channel",
    LOCK,
    fixed(lock, platform_id="tmall"),
    PRECONDITION,
    "CHANNEL_MISMATCH",
    "qualification_id",
)
case(
    f"{LOCK}-category-mismatch",
    LOCK,
    lambda w, rng: lock(w, rng, category="phone"),
    PRECONDITION,
    "CATEGORY_MISMATCH",
    "qualification_id",
)
case(
    f"{LOCK}-another-consumers-qualification",
    LOCK,
    lambda w, rng: lock(w, rng, qualification_id=w.qb),
    PRECONDITION,
    "QUALIFICATION_NOT_OWNED",
    "qualification_id",
)
case(
    f"{LOCK}-unknown-consumer",
    LOCK,
    lambda w, rng: lock(w, rng, consumer_id=f"c-none-{rng.randrange(10**9)}"),
    PRECONDITION,
    "QUALIFICATION_NOT_OWNED",
    "qualification_id",
)
case(
    f"{LOCK}-locked-to-another-order",
    LOCK,
    lambda w, rng: lock(w, rng, qualification_id=w.qc, consumer_id=w.c),
    PRECONDITION,
    "QUALIFICATION_LOCKED",
    "qualification_id",
)
case(
    f"{LOCK}-used",
    LOCK,
    lambda w, rng: lock(w, rng, qualification_id=w.qd, consumer_id=w.d),
    PRECONDITION,
    "QUALIFICATION_USED",
    "qualification_id",
)


# EligibilityService.ConsumeQualification ---------------------------------------------------------
def consume(w: World, rng: random.Random, **kw: Any) -> eligibility_pb2.ConsumeQualificationRequest:
    values: dict[str, Any] = {"qualification_id": w.qd, "order_id": w.captured}
    return eligibility_pb2.ConsumeQualificationRequest(**(values | kw))


CONSUME = "eligibility.ConsumeQualification"
qualification_id_cases(CONSUME, lambda w, rng, v: consume(w, rng, qualification_id=v))
identifier_cases(CONSUME, "order_id", lambda w, rng, v: consume(w, rng, order_id=v))
case(
    f"{CONSUME}-another-order",
    CONSUME,
    lambda w, rng: consume(w, rng, order_id=w.pending),
    PRECONDITION,
    "QUALIFICATION_NOT_LOCKED_TO_ORDER",
    "order_id",
)
case(
    f"{CONSUME}-never-locked",
    CONSUME,
    lambda w, rng: consume(w, rng, qualification_id=w.qa, order_id=_order(rng)),
    PRECONDITION,
    "QUALIFICATION_NOT_LOCKED_TO_ORDER",
    "order_id",
)
case(
    f"{CONSUME}-given-back-after-cancel",
    CONSUME,
    lambda w, rng: consume(w, rng, qualification_id=w.qe, order_id=w.released),
    PRECONDITION,
    "QUALIFICATION_NOT_LOCKED_TO_ORDER",
    "order_id",
)


# EligibilityService.AddIdentifiers, GetPerson, EraseConsumer (same user; test_same_user.py and
# test_erasure.py have the rest) ------------------------------------------------------------------
def identify(w: World, rng: random.Random, **kw: Any) -> eligibility_pb2.AddIdentifiersRequest:
    """Identifiers that would be added (a new device for A) but for ``kw``."""
    values: dict[str, Any] = {
        "consumer_id": w.a,
        "platform_id": "jd",
        "identifiers": eligibility_pb2.Identifiers(device_id=f"dev-{rng.randrange(10**12)}"),
    }
    return eligibility_pb2.AddIdentifiersRequest(**(values | kw))


ADD_IDS = "eligibility.AddIdentifiers"
for _name in ("consumer_id", "platform_id"):
    identifier_cases(ADD_IDS, _name, setting(identify, _name))
for _what, (_given, _reason, _field) in {
    "card-letters": ({"bank_card": "6222 0202 00AB 1234"}, "BANK_CARD_FORMAT", "bank_card"),
    "card-too-short": ({"bank_card": "62220202"}, "BANK_CARD_FORMAT", "bank_card"),
    "device-129-chars": ({"device_id": "d" * 129}, "DEVICE_ID_FORMAT", "device_id"),
    "device-space": ({"device_id": "dev 1234"}, "DEVICE_ID_FORMAT", "device_id"),
    "bank-phone": ({"bank_phone": "12345678901"}, "PHONE_FORMAT", "bank_phone"),
    "app-account-short": ({"app_account": "ab"}, "APP_ACCOUNT_FORMAT", "app_account"),
}.items():
    case(
        f"{ADD_IDS}-{_what}",
        ADD_IDS,
        fixed(identify, identifiers=eligibility_pb2.Identifiers(**_given)),
        INVALID,
        _reason,
        f"identifiers.{_field}",
    )
case(
    f"{ADD_IDS}-none",
    ADD_IDS,
    fixed(identify, identifiers=eligibility_pb2.Identifiers()),
    INVALID,
    "MISSING_FIELD",
    "identifiers",
)
case(
    f"{ADD_IDS}-unknown-consumer",
    ADD_IDS,
    lambda w, rng: identify(w, rng, consumer_id=f"c-none-{rng.randrange(10**9)}"),
    NOT_FOUND,
    "UNKNOWN_CONSUMER",
    "consumer_id",
)
case(  # A registered through jd: to taobao, A is as unknown as nobody
    f"{ADD_IDS}-another-platforms-consumer",
    ADD_IDS,
    fixed(identify, platform_id="taobao"),
    NOT_FOUND,
    "UNKNOWN_CONSUMER",
    "consumer_id",
)

GET_PERSON = "eligibility.GetPerson"
identifier_cases(
    GET_PERSON, "consumer_id", lambda w, rng, v: eligibility_pb2.GetPersonRequest(consumer_id=v)
)
case(
    f"{GET_PERSON}-unknown-consumer",
    GET_PERSON,
    lambda w, rng: eligibility_pb2.GetPersonRequest(consumer_id=f"c-none-{rng.randrange(10**9)}"),
    NOT_FOUND,
    "UNKNOWN_CONSUMER",
    "consumer_id",
)


def erasure(w: World, rng: random.Random, **kw: Any) -> eligibility_pb2.EraseConsumerRequest:
    """An erasure that would succeed (of E) but for ``kw``."""
    values: dict[str, Any] = {"consumer_id": w.e, "reason": "the purpose ended"}
    return eligibility_pb2.EraseConsumerRequest(**(values | kw))


ERASE = "eligibility.EraseConsumer"
identifier_cases(ERASE, "consumer_id", setting(erasure, "consumer_id"))
case(f"{ERASE}-no-reason", ERASE, fixed(erasure, reason=" "), INVALID, "MISSING_FIELD", "reason")
case(
    f"{ERASE}-reason-201-chars",
    ERASE,
    fixed(erasure, reason="r" * 201),
    INVALID,
    "FIELD_TOO_LONG",
    "reason",
)
case(
    f"{ERASE}-reason-control-character",
    ERASE,
    fixed(erasure, reason="because\x07"),
    INVALID,
    "INVALID_TEXT",
    "reason",
)
case(
    f"{ERASE}-unknown-consumer",
    ERASE,
    lambda w, rng: erasure(w, rng, consumer_id=f"c-none-{rng.randrange(10**9)}"),
    NOT_FOUND,
    "UNKNOWN_CONSUMER",
    "consumer_id",
)


# EligibilityService.RestoreQualification / ForfeitQualification (a case's outcome) -----------
def case_outcome(
    w: World, rng: random.Random, **kw: Any
) -> eligibility_pb2.CaseQualificationRequest:
    """A case outcome on A's available refrigerator qualification but for ``kw`` (restoring it
    is nothing to do, forfeiting it would succeed)."""
    values: dict[str, Any] = {"qualification_id": w.qa, "case_id": "case-x1", "reason": "case"}
    return eligibility_pb2.CaseQualificationRequest(**(values | kw))


for _rpc, _state in (
    ("eligibility.RestoreQualification", "RESTORABLE"),
    ("eligibility.ForfeitQualification", "FORFEITABLE"),
):
    qualification_id_cases(_rpc, setting(case_outcome, "qualification_id"))
    identifier_cases(_rpc, "case_id", setting(case_outcome, "case_id"))
    case(f"{_rpc}-no-reason", _rpc, fixed(case_outcome, reason=""), INVALID, "MISSING_FIELD",
         "reason")  # fmt: skip
    case(f"{_rpc}-reason-201-chars", _rpc, fixed(case_outcome, reason="r" * 201), INVALID,
         "FIELD_TOO_LONG", "reason")  # fmt: skip
    # A qualification locked to a pending order is neither restored nor forfeited by a case.
    case(
        f"{_rpc}-locked-qualification",
        _rpc,
        lambda w, rng: case_outcome(w, rng, qualification_id=w.qc),
        PRECONDITION,
        f"QUALIFICATION_NOT_{_state}",
        "qualification_id",
    )


# AuditService.GetEntries (GetLogInfo takes no input: see its own test below) --------------------
ENTRIES = "audit.GetEntries"


def entries(w: World, rng: random.Random, **kw: Any) -> audit_pb2.GetEntriesRequest:
    return audit_pb2.GetEntriesRequest(**kw)


for _start in (-1, -(2**63)):
    case(
        f"{ENTRIES}-start-{_start}",
        ENTRIES,
        fixed(entries, start=_start, limit=10),
        INVALID,
        "INVALID_START",
        "start",
    )
for _limit in (0, -1, 1001, INT32_MAX, -(2**31)):
    case(
        f"{ENTRIES}-limit-{_limit}",
        ENTRIES,
        fixed(entries, start=0, limit=_limit),
        INVALID,
        "INVALID_LIMIT",
        "limit",
    )


# GetEntries by range: a start before its end, at most 1000 at a time, within the log
RANGE_CASES: list[tuple[str, dict[str, int], str, str]] = [
    ("end-and-limit", {"start": 0, "end": 5, "limit": 5}, "END_OR_LIMIT", "limit"),
    ("end-at-start", {"start": 5, "end": 5}, "INVALID_END", "end"),
    ("end-before-start", {"start": 5, "end": 4}, "INVALID_END", "end"),
    ("more-than-1000", {"start": 0, "end": 1001}, "INVALID_END", "end"),
    ("beyond-the-log", {"start": INT64_MAX - 10, "end": INT64_MAX}, "BEYOND_LOG", "end"),
    ("packed-without-end", {"start": 0, "limit": 5, "packed": True}, "PACKED_NEEDS_END", "packed"),
]
for _rid, _range, _rreason, _rfield in RANGE_CASES:
    case(f"{ENTRIES}-{_rid}", ENTRIES, fixed(entries, **_range), INVALID, _rreason, _rfield)


# AuditService.GetCheckpoint / GetInclusionProof / GetConsistencyProof / ListOrderEntries --
CHECKPOINT = "audit.GetCheckpoint"
INCLUSION = "audit.GetInclusionProof"
CONSISTENCY = "audit.GetConsistencyProof"
ORDER_ENTRIES = "audit.ListOrderEntries"


def checkpoint(w: World, rng: random.Random, **kw: Any) -> audit_pb2.GetCheckpointRequest:
    return audit_pb2.GetCheckpointRequest(**kw)


def inclusion(w: World, rng: random.Random, **kw: Any) -> audit_pb2.GetInclusionProofRequest:
    return audit_pb2.GetInclusionProofRequest(**kw)


def consistency(w: World, rng: random.Random, **kw: Any) -> audit_pb2.GetConsistencyProofRequest:
    return audit_pb2.GetConsistencyProofRequest(**kw)


def order_entries(w: World, rng: random.Random, **kw: Any) -> audit_pb2.ListOrderEntriesRequest:
    return audit_pb2.ListOrderEntriesRequest(**kw)


TREE_CASES: list[tuple[str, Make, dict[str, Any], grpc.StatusCode, str, str]] = [
    (f"{CHECKPOINT}-negative-size", checkpoint, {"tree_size": -1}, INVALID,
     "INVALID_TREE_SIZE", "tree_size"),
    (f"{CHECKPOINT}-fresh-and-size", checkpoint, {"tree_size": 1, "fresh": True}, INVALID,
     "FRESH_OR_SIZE", "fresh"),
    (f"{CHECKPOINT}-never-published", checkpoint, {"tree_size": INT64_MAX}, NOT_FOUND,
     "CHECKPOINT_NOT_FOUND", "tree_size"),
    (f"{INCLUSION}-no-leaf", inclusion, {"tree_size": 1}, INVALID, "LEAF_REQUIRED", "index"),
    (f"{INCLUSION}-size-0", inclusion, {"index": 0, "tree_size": 0}, INVALID,
     "INVALID_TREE_SIZE", "tree_size"),
    (f"{INCLUSION}-size-negative", inclusion, {"index": 0, "tree_size": -5}, INVALID,
     "INVALID_TREE_SIZE", "tree_size"),
    (f"{INCLUSION}-beyond-the-tree", inclusion, {"index": 0, "tree_size": INT64_MAX}, INVALID,
     "BEYOND_TREE", "tree_size"),
    (f"{INCLUSION}-index-negative", inclusion, {"index": -1, "tree_size": 1}, INVALID,
     "INVALID_INDEX", "index"),
    (f"{INCLUSION}-index-at-size", inclusion, {"index": 1, "tree_size": 1}, INVALID,
     "INVALID_INDEX", "index"),
    (f"{INCLUSION}-short-hash", inclusion, {"leaf_hash": b"x" * 31, "tree_size": 1}, INVALID,
     "INVALID_LEAF_HASH", "leaf_hash"),
    (f"{INCLUSION}-long-hash", inclusion, {"leaf_hash": b"x" * 33, "tree_size": 1}, INVALID,
     "INVALID_LEAF_HASH", "leaf_hash"),
    (f"{INCLUSION}-unknown-hash", inclusion, {"leaf_hash": bytes(32), "tree_size": 1},
     NOT_FOUND, "LEAF_NOT_FOUND", "leaf_hash"),
    (f"{CONSISTENCY}-new-0", consistency, {"old_size": 1, "new_size": 0}, INVALID,
     "INVALID_TREE_SIZE", "new_size"),
    (f"{CONSISTENCY}-beyond-the-tree", consistency, {"old_size": 1, "new_size": INT64_MAX},
     INVALID, "BEYOND_TREE", "new_size"),
    (f"{CONSISTENCY}-old-0", consistency, {"old_size": 0, "new_size": 1}, INVALID,
     "INVALID_OLD_SIZE", "old_size"),
    (f"{CONSISTENCY}-old-after-new", consistency, {"old_size": 2, "new_size": 1}, INVALID,
     "INVALID_OLD_SIZE", "old_size"),
    (f"{CONSISTENCY}-old-negative", consistency, {"old_size": -1, "new_size": 1}, INVALID,
     "INVALID_OLD_SIZE", "old_size"),
    (f"{ORDER_ENTRIES}-no-order", order_entries, {}, INVALID, "MISSING_FIELD", "order_id"),
    (f"{ORDER_ENTRIES}-long-order", order_entries, {"order_id": LONG}, INVALID,
     "FIELD_TOO_LONG", "order_id"),
    (f"{ORDER_ENTRIES}-bad-order", order_entries, {"order_id": "a b"}, INVALID,
     "INVALID_IDENTIFIER", "order_id"),
    (f"{ORDER_ENTRIES}-limit-1001", order_entries, {"order_id": "o-1", "limit": 1001}, INVALID,
     "INVALID_LIMIT", "limit"),
    (f"{ORDER_ENTRIES}-limit-negative", order_entries, {"order_id": "o-1", "limit": -1},
     INVALID, "INVALID_LIMIT", "limit"),
]  # fmt: skip
for _tid, _tmake, _tfields, _tcode, _treason, _tfield in TREE_CASES:
    case(_tid, _tid.split("-")[0], fixed(_tmake, **_tfields), _tcode, _treason, _tfield)

# LedgerService: discount-bill reconciliation (streaming; see call) -------------------------------
RECONCILE = "ledger.ReconcileDiscountBill"
GET_RECON, LIST_RECON = "ledger.GetReconciliation", "ledger.ListReconciliations"
BILL_HEADER = b"order_id,payment_ref,discount_fen,paid_at\n"
AT = dt.datetime(2025, 6, 1, 2, tzinfo=dt.UTC)


def bill(w: World, rng: random.Random, data: bytes | None = None, **header: Any) -> Message:
    """A bill as one message (``data`` the file, default one good row; the rest its header):
    :func:`call` sends it as ReconcileDiscountBill takes it."""
    if data is None:
        data = BILL_HEADER + f"o-{rng.randrange(10**12)},pay-1,100,{AT.isoformat()}\n".encode()
    chunk = ledger_pb2.DiscountBillChunk(data=data, **header)
    for name in ("period_from", "period_to"):
        if isinstance(header.get(name), dt.datetime):
            getattr(chunk, name).FromDatetime(header[name])
    return chunk


def get_reconciliation(w: World, rng: random.Random, **kw: Any) -> Message:
    return ledger_pb2.GetReconciliationRequest(**kw)


def list_reconciliations(w: World, rng: random.Random, **kw: Any) -> Message:
    return ledger_pb2.ListReconciliationsRequest(**kw)


def bill_cases(name: str, data: bytes, reason: str, **metadata: str) -> None:
    case(
        f"{RECONCILE}-{name}", RECONCILE, fixed(bill, data=data), INVALID, reason, "csv", **metadata
    )


bill_cases("empty", b"", "EMPTY_BILL")
bill_cases("header-only", BILL_HEADER, "EMPTY_BILL")
bill_cases(
    "wrong-header", b"order_id,payment_ref,discount_fen\no-1,p,1\n", "WRONG_HEADER", line="1"
)
bill_cases(
    "not-utf8", BILL_HEADER + b"o-1,p\xff,1,2025-06-01T10:00Z\n", "INVALID_ENCODING", line="2"
)
bill_cases("nul", BILL_HEADER + b"o-1,p\x00,1,2025-06-01T10:00Z\n", "MALFORMED_CSV", line="2")
bill_cases("open-quote", BILL_HEADER + b'o-1,"p,1,2025-06-01T10:00Z\n', "MALFORMED_CSV", line="2")
bill_cases("too-large", b"x" * (32 * 1024 * 1024 + 1), "BILL_TOO_LARGE")
for _what, _period, _field in (
    ("from-only", {"period_from": AT}, "period_from"),
    ("to-only", {"period_to": AT}, "period_from"),
    ("empty", {"period_from": AT, "period_to": AT}, "period_to"),
    ("reversed", {"period_from": AT, "period_to": AT - dt.timedelta(hours=1)}, "period_to"),
):
    case(
        f"{RECONCILE}-period-{_what}",
        RECONCILE,
        fixed(bill, **_period),
        INVALID,
        "INVALID_PERIOD",
        _field,
    )
# platform_id is optional (a bill of every platform); given, it is an identifier.
case(
    f"{RECONCILE}-platform_id-65-chars",
    RECONCILE,
    fixed(bill, platform_id=LONG),
    INVALID,
    "FIELD_TOO_LONG",
    "platform_id",
)
for _what, _value in BAD_IDENTIFIERS.items():
    case(
        f"{RECONCILE}-platform_id-{_what}",
        RECONCILE,
        fixed(bill, platform_id=_value),
        INVALID,
        "INVALID_IDENTIFIER",
        "platform_id",
    )
case(
    f"{RECONCILE}-reason-control-character",
    RECONCILE,
    fixed(bill, reason="because\x07"),
    INVALID,
    "INVALID_TEXT",
    "reason",
)
case(
    f"{RECONCILE}-reason-501-chars",
    RECONCILE,
    fixed(bill, reason="a" * 501),
    INVALID,
    "FIELD_TOO_LONG",
    "reason",
)
for _sha, _why in (("", "missing"), ("g" * 64, "not-hex"), ("a" * 63, "short"), ("a" * 65, "long")):
    case(
        f"{GET_RECON}-sha256-{_why}",
        GET_RECON,
        fixed(get_reconciliation, file_sha256=_sha),
        INVALID,
        "INVALID_SHA256",
        "file_sha256",
    )
case(
    f"{GET_RECON}-unknown",
    GET_RECON,
    lambda w, rng: ledger_pb2.GetReconciliationRequest(file_sha256=f"{rng.randrange(16**64):064x}"),
    NOT_FOUND,
    "UNKNOWN_RECONCILIATION",
    "file_sha256",
)
for _limit in (-1, 501, INT32_MAX, -(2**31)):
    case(
        f"{LIST_RECON}-limit-{_limit}",
        LIST_RECON,
        fixed(list_reconciliations, limit=_limit),
        INVALID,
        "INVALID_LIMIT",
        "limit",
    )
for _token in ("x", "-1", "1" * 10, "１"):
    case(
        f"{LIST_RECON}-page-token-{_token.encode().hex()}",
        LIST_RECON,
        fixed(list_reconciliations, page_token=_token),
        INVALID,
        "INVALID_PAGE_TOKEN",
        "page_token",
    )


# LedgerService.RecordEvidence -------------------------------------------------------------------
def evidence(w: World, rng: random.Random, **kw: Any) -> ledger_pb2.RecordEvidenceRequest:
    values: dict[str, Any] = {"order_id": w.captured, "kind": "COURIER", "reference": "SF1"}
    return ledger_pb2.RecordEvidenceRequest(**(values | kw))


EVIDENCE = "ledger.RecordEvidence"
identifier_cases(EVIDENCE, "order_id", setting(evidence, "order_id"))
for _sb_id, _sb_build, _sb_code, _sb_reason, _sb_field in (
    (
        "unknown-order",
        generated(evidence, "order_id", _order),
        NOT_FOUND,
        "UNKNOWN_ORDER",
        "order_id",
    ),
    (
        "not-captured",
        lambda w, rng: evidence(w, rng, order_id=w.pending),
        NOT_FOUND,
        "UNKNOWN_ORDER",
        "order_id",
    ),
    ("kind-missing", fixed(evidence, kind=""), INVALID, "INVALID_CHOICE", "kind"),
    ("kind-unknown", fixed(evidence, kind="PHOTO"), INVALID, "INVALID_CHOICE", "kind"),
    ("reference-missing", fixed(evidence, reference=" "), INVALID, "MISSING_FIELD", "reference"),
    (
        "reference-129-chars",
        fixed(evidence, reference="r" * 129),
        INVALID,
        "FIELD_TOO_LONG",
        "reference",
    ),
    ("serial-of-no-serial", fixed(evidence, serial="SN1"), INVALID, "UNEXPECTED_SERIAL", "serial"),
    ("serial-non-ascii", fixed(evidence, serial="序列1"), INVALID, "INVALID_IDENTIFIER", "serial"),
):
    case(f"{EVIDENCE}-{_sb_id}", EVIDENCE, _sb_build, _sb_code, _sb_reason, _sb_field)


# LedgerService settlement batches ---------------------------------------------------------------
def _sb_period(
    request: ledger_pb2.CreateSettlementBatchRequest,
    start: dt.datetime | None,
    end: dt.datetime | None,
) -> ledger_pb2.CreateSettlementBatchRequest:
    if start is not None:
        request.period_from.FromDatetime(start)
    if end is not None:
        request.period_to.FromDatetime(end)
    return request


_NOW = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)


def create_batch(
    w: World, rng: random.Random, **kw: Any
) -> ledger_pb2.CreateSettlementBatchRequest:
    start = kw.pop("start", _NOW)
    end = kw.pop("end", _NOW + dt.timedelta(days=30))
    values: dict[str, Any] = {"batch_id": f"sb-{rng.randrange(10**12)}", "merchant_id": "m-none"}
    return _sb_period(ledger_pb2.CreateSettlementBatchRequest(**(values | kw)), start, end)


CREATE_BATCH = "ledger.CreateSettlementBatch"
identifier_cases(CREATE_BATCH, "batch_id", setting(create_batch, "batch_id"))
identifier_cases(CREATE_BATCH, "merchant_id", setting(create_batch, "merchant_id"))
for _sb_id, _sb_build, _sb_code, _sb_reason, _sb_field in (
    (
        "period-from-missing",
        fixed(create_batch, start=None),
        INVALID,
        "MISSING_FIELD",
        "period_from",
    ),
    ("period-to-missing", fixed(create_batch, end=None), INVALID, "MISSING_FIELD", "period_to"),
    ("period-empty", fixed(create_batch, end=_NOW), INVALID, "INVALID_PERIOD", "period_to"),
    (
        "period-backwards",
        fixed(create_batch, end=_NOW - dt.timedelta(days=1)),
        INVALID,
        "INVALID_PERIOD",
        "period_to",
    ),
    ("nothing-to-settle", fixed(create_batch), PRECONDITION, "NOTHING_TO_SETTLE", "merchant_id"),
    (
        "reason-501-chars",
        fixed(create_batch, reason="r" * 501),
        INVALID,
        "FIELD_TOO_LONG",
        "reason",
    ),
):
    case(f"{CREATE_BATCH}-{_sb_id}", CREATE_BATCH, _sb_build, _sb_code, _sb_reason, _sb_field)

APPROVE_BATCH, PAY_BATCH, GET_BATCH = (
    "ledger.ApproveSettlementBatch",
    "ledger.MarkSettlementBatchPaid",
    "ledger.GetSettlementBatch",
)
_BATCH_RPCS: list[tuple[str, Callable[[World, random.Random, str], Message]]] = [
    (APPROVE_BATCH, lambda w, rng, v: ledger_pb2.ApproveSettlementBatchRequest(batch_id=v)),
    (
        PAY_BATCH,
        lambda w, rng, v: ledger_pb2.MarkSettlementBatchPaidRequest(batch_id=v, payment_ref="x1"),
    ),
    (GET_BATCH, lambda w, rng, v: ledger_pb2.GetSettlementBatchRequest(batch_id=v)),
]
for _sb_rpc, _sb_make in _BATCH_RPCS:
    identifier_cases(_sb_rpc, "batch_id", _sb_make)
    case(
        f"{_sb_rpc}-unknown",
        _sb_rpc,
        lambda w, rng, m=_sb_make: m(w, rng, f"sb-{rng.randrange(10**12)}"),  # type: ignore[misc]
        NOT_FOUND,
        "UNKNOWN_BATCH",
        "batch_id",
    )
case(
    f"{APPROVE_BATCH}-reason-501-chars",
    APPROVE_BATCH,
    lambda w, rng: ledger_pb2.ApproveSettlementBatchRequest(batch_id="sb-1", reason="r" * 501),
    INVALID,
    "FIELD_TOO_LONG",
    "reason",
)
for _sb_ref, _sb_reason in (("", "MISSING_FIELD"), ("p" * 129, "FIELD_TOO_LONG")):
    case(
        f"{PAY_BATCH}-payment-ref-{_sb_reason.lower()}",
        PAY_BATCH,
        lambda w, rng, r=_sb_ref: ledger_pb2.MarkSettlementBatchPaidRequest(  # type: ignore[misc]
            batch_id="sb-1", payment_ref=r
        ),
        INVALID,
        _sb_reason,
        "payment_ref",
    )


# LedgerService.ListOverdueEvidence and ListReturns ------------------------------------------------
OVERDUE, RETURNS = "ledger.ListOverdueEvidence", "ledger.ListReturns"
BATCHES = "ledger.ListSettlementBatches"
_SB_LISTS: list[tuple[str, Callable[..., Message]]] = [
    (OVERDUE, ledger_pb2.ListOverdueEvidenceRequest),
    (RETURNS, ledger_pb2.ListReturnsRequest),
    (BATCHES, ledger_pb2.ListSettlementBatchesRequest),
]
# Their cursors: a batch id (ListSettlementBatches), a refund's time and order (ListReturns).
for _sb_id, _sb_rpc, _sb_cursor, _sb_reason in [
    ("bad-cursor", BATCHES, "a b", "INVALID_IDENTIFIER"),
    ("long-cursor", BATCHES, LONG, "FIELD_TOO_LONG"),
    ("cursor-no-time", RETURNS, "o-1", "INVALID_CURSOR"),
    ("cursor-naive-time", RETURNS, "2026-12-01T10:00:00|o-1", "INVALID_CURSOR"),
    ("cursor-no-order", RETURNS, "2026-12-01T10:00:00+00:00|", "INVALID_CURSOR"),
    ("cursor-bad-order", RETURNS, "2026-12-01T10:00:00+00:00|a b", "INVALID_IDENTIFIER"),
    ("cursor-129-chars", RETURNS, "2026-12-01T10:00:00+00:00|" + "o" * 103, "INVALID_CURSOR"),
]:
    case(
        f"{_sb_rpc}-{_sb_id}",
        _sb_rpc,
        lambda w, rng, r=_sb_rpc, c=_sb_cursor: (  # type: ignore[misc]
            ledger_pb2.ListReturnsRequest(cursor=c)
            if r == RETURNS
            else ledger_pb2.ListSettlementBatchesRequest(cursor=c)
        ),
        INVALID,
        _sb_reason,
        "cursor",
    )
for _sb_rpc, _sb_make in _SB_LISTS:
    for _sb_limit in (-1, 1001):
        case(
            f"{_sb_rpc}-limit-{_sb_limit}",
            _sb_rpc,
            lambda w, rng, m=_sb_make, n=_sb_limit: m(limit=n),  # type: ignore[misc]
            INVALID,
            "INVALID_LIMIT",
            "limit",
        )
    case(
        f"{_sb_rpc}-merchant-id-65-chars",
        _sb_rpc,
        lambda w, rng, m=_sb_make: m(merchant_id=LONG),  # type: ignore[misc]
        INVALID,
        "FIELD_TOO_LONG",
        "merchant_id",
    )
    for _sb_what, _sb_bad in BAD_IDENTIFIERS.items():
        case(
            f"{_sb_rpc}-merchant-id-{_sb_what}",
            _sb_rpc,
            lambda w, rng, m=_sb_make, b=_sb_bad: m(merchant_id=b),  # type: ignore[misc]
            INVALID,
            "INVALID_IDENTIFIER",
            "merchant_id",
        )


# LedgerService.GetFundLedger and GetDailyReport ----------------------------------------------
FUND_LEDGER, DAILY_REPORT = "ledger.GetFundLedger", "ledger.GetDailyReport"
for _fl_limit in (-1, 10_001):
    case(
        f"{FUND_LEDGER}-limit-{_fl_limit}",
        FUND_LEDGER,
        lambda w, rng, n=_fl_limit: ledger_pb2.GetFundLedgerRequest(limit=n),  # type: ignore[misc]
        INVALID,
        "INVALID_LIMIT",
        "limit",
    )
case(
    f"{FUND_LEDGER}-start-negative",
    FUND_LEDGER,
    lambda w, rng: ledger_pb2.GetFundLedgerRequest(start=-1),
    INVALID,
    "INVALID_START",
    "start",
)
case(
    f"{FUND_LEDGER}-pool-id-slash",
    FUND_LEDGER,
    lambda w, rng: ledger_pb2.GetFundLedgerRequest(pool_id="a/b"),
    INVALID,
    "INVALID_IDENTIFIER",
    "pool_id",
)
for _dr_date in ("", "2025-6-1", "2025-02-30", "20250601", "2025-06-01T00:00"):
    case(
        f"{DAILY_REPORT}-date-{_dr_date or 'missing'}",
        DAILY_REPORT,
        lambda w, rng, d=_dr_date: ledger_pb2.GetDailyReportRequest(date=d),  # type: ignore[misc]
        INVALID,
        "INVALID_DATE",
        "date",
    )
for _dr_zone in ("Mars/Olympus", "../etc/passwd", "x" * 65):
    case(
        f"{DAILY_REPORT}-timezone-{_dr_zone[:12]}",
        DAILY_REPORT,
        lambda w, rng, z=_dr_zone: ledger_pb2.GetDailyReportRequest(  # type: ignore[misc]
            date="2025-06-01", timezone=z
        ),
        INVALID,
        "INVALID_TIMEZONE",
        "timezone",
    )


# -- the tests ----------------------------------------------------------------------------------
async def call(p: Platform, rpc: str, request: Message) -> Message:
    stub_name, method = rpc.split(".")
    if rpc == RECONCILE:  # the bill goes as the RPC takes it: header, then the bytes
        assert isinstance(request, ledger_pb2.DiscountBillChunk)
        header = ledger_pb2.DiscountBillChunk()
        header.CopyFrom(request)
        header.ClearField("data")
        return [r async for r in send_bill(p.ledger, request.data, header)][-1]
    if rpc == GET_RECON:  # a stream of the reconciliation's parts
        assert isinstance(request, ledger_pb2.GetReconciliationRequest)
        return [r async for r in p.ledger.GetReconciliation(request)][-1]
    result: Message = await getattr(getattr(p, stub_name), method)(request)
    return result


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
async def test_rejected_precisely_and_nothing_changed(
    platform: Platform, world: World, rng: random.Random, case: Case
) -> None:
    request = case.build(world, rng)
    before = await settled_state(platform)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(platform, case.rpc, request)
    err = caught.value
    assert err.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), err.details()
    assert status_of(err) == (case.code, case.reason, case.field), err.details()
    info = error_info(err)
    assert info is not None
    for key, value in case.metadata.items():  # one of a comma-separated list (e.g. reasons)
        assert value in info.metadata.get(key, "").split(","), (key, dict(info.metadata))
    after = await settled_state(platform)
    if case.records:
        store = platform.running["eligibility"].runtime.store
        assert after.events == {**before.events, "eligibility": before.events["eligibility"] + 1}
        [last] = (await store.read_all(limit=10**6))[-1:]
        assert last.envelope.event_type == case.records
        before = dataclasses.replace(  # the recorded event reached the audit log, and only it
            before,
            events=after.events,
            audit_size=before.audit_size + 1,
            audit_head=after.audit_head,
        )
    assert not {k for k in info.metadata if k != "field"} - case.metadata.keys(), (
        "the refusal says more than it should",
        dict(info.metadata),
    )
    assert after.events == before.events
    assert after.ledger == before.ledger
    assert after.eligibility == before.eligibility
    assert (after.audit_size, after.audit_head) == (before.audit_size, before.audit_head)


def test_every_rpc_of_ledger_eligibility_and_audit_has_rejection_cases() -> None:
    from subsidy.v1 import audit_pb2 as a
    from subsidy.v1 import eligibility_pb2 as e
    from subsidy.v1 import ledger_pb2 as led

    rpcs = {
        f"{stub}.{method.name}"
        for stub, module, service in (
            ("ledger", led, "LedgerService"),
            ("eligibility", e, "EligibilityService"),
            ("audit", a, "AuditService"),
        )
        for method in module.DESCRIPTOR.services_by_name[service].methods
    }
    no_input = {"audit.GetLogInfo"}  # an empty request: nothing to get wrong
    assert {c.rpc for c in CASES} == rpcs - no_input
    assert len({c.id for c in CASES}) == len(CASES)


async def test_get_log_info_takes_no_input_and_changes_nothing(
    platform: Platform, world: World
) -> None:
    before = await settled_state(platform)
    # Unknown fields (a newer client) are ignored, as proto3 requires.
    raw = audit_pb2.GetEntriesRequest(start=5, limit=7).SerializeToString()
    info = await platform.audit.GetLogInfo(audit_pb2.GetLogInfoRequest.FromString(raw))
    assert (info.size, bytes.fromhex(info.head_hash_hex)) == (before.audit_size, before.audit_head)
    after = await settled_state(platform)
    assert after == before


async def test_padded_text_is_stored_trimmed_not_an_internal_error(
    platform: Platform, rng: random.Random
) -> None:
    """Surrounding blanks are not part of a value: trimmed, never stored, never INTERNAL."""
    p = platform
    pool = await p.pool(rng, 1_000_000)
    funded = await p.fund(
        ledger_pb2.ProposeFundingRequest(pool_id=pool, amount_fen=500, source=" " * 70 + "district")
    )
    assert funded.funded_fen == 1_000_500
    _, consumer = await p.person(rng)
    sku = await p.product(rng, "refrigerator", 1, FRIDGE_PRICE)
    order = await _reserve(p, rng, pool, consumer, await _claim(p, consumer, "refrigerator"), sku)
    captured = await p.ledger.CaptureSubsidy(
        ledger_pb2.CaptureSubsidyRequest(order_id=order, payment_ref=" " * 200 + "pay-9")
    )
    assert captured.status == "CAPTURED"
    async with p.running["ledger"].runtime.store.engine.connect() as conn:
        stored = await conn.scalar(
            text("SELECT payment_ref FROM reservations WHERE order_id = :o"), {"o": order}
        )
    assert stored == "pay-9"
