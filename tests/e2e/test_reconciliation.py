"""Discount-bill reconciliation (立减账单核对) on the real stack: captures made through the real
checkout, crafted bills with every kind of discrepancy, a duplicate, a re-import, a malformed
row, a bill of 100,000 rows, and callers who may not reconcile."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from sqlalchemy import text

from services.kernel import rpc
from services.kernel.identity import Caller, Role
from services.ledger import projections as ledger_projections
from services.ledger import reconcile
from subsidy.v1 import (
    common_pb2,
    eligibility_pb2,
    events_pb2,
    identity_pb2,
    ledger_pb2,
    ledger_pb2_grpc,
)
from subsidyctl.cli.reconcile import bill_header, send_bill
from tests.e2e.conftest import Platform, status_of
from tests.support.callers import CallerRouter
from tests.support.identities import make_person

HEADER = "order_id,payment_ref,discount_fen,paid_at\n"
PHONE_PRICE, PHONE_SUBSIDY = 300_000, 45_000  # 15% of 3,000 yuan
CHUNK = 1024 * 1024


@dataclass
class Answer:
    replies: list[ledger_pb2.ReconcileProgress]

    @property
    def done(self) -> ledger_pb2.ReconcileProgress:
        assert self.replies and self.replies[-1].phase == "DONE"
        return self.replies[-1]

    @property
    def recorded(self) -> events_pb2.DiscountBillReconciled:
        return self.done.reconciliation.recorded

    @property
    def lines(self) -> list[ledger_pb2.BillDiscrepancy]:
        return [d for r in self.replies for d in r.discrepancies]

    def kinds(self) -> list[tuple[str, str]]:
        return [(d.kind, d.order_id) for d in self.lines]


async def reconcile_bill(
    stub: ledger_pb2_grpc.LedgerServiceAsyncStub,
    data: bytes,
    period: tuple[datetime, datetime] | None = None,
    *,
    chunk: int = CHUNK,
    platform_id: str = "",
) -> Answer:
    start, end = period if period is not None else (None, None)
    header = bill_header(start, end, "bill of the day", platform_id)
    replies = send_bill(stub, data, header, chunk=chunk, deadline_s=120)
    return Answer([r async for r in replies])


async def get(stub: ledger_pb2_grpc.LedgerServiceAsyncStub, sha: str) -> Answer:
    request = ledger_pb2.GetReconciliationRequest(file_sha256=sha)
    return Answer([r async for r in stub.GetReconciliation(request, timeout=60)])


@pytest.fixture
async def as_role(
    platform: Platform,
) -> AsyncIterator[dict[Role, ledger_pb2_grpc.LedgerServiceAsyncStub]]:
    """The ledger as one caller of each role."""
    router = CallerRouter(
        f"127.0.0.1:{platform.running['ledger'].port}", platform.infra.identities, deadline_s=120
    )
    who = {
        Role.OPERATOR: Caller(Role.OPERATOR, "recon-op"),
        Role.AUDITOR: Caller(Role.AUDITOR, "recon-auditor"),
        Role.APPROVER: Caller(Role.APPROVER, "recon-checker"),
        Role.PLATFORM: Caller(Role.PLATFORM, "jd"),
        Role.SERVICE: Caller(Role.SERVICE, "audit"),
    }
    routers = {role: router.as_caller(c) for role, c in who.items()}
    yield {role: ledger_pb2_grpc.LedgerServiceStub(r) for role, r in routers.items()}
    for r in routers.values():
        await r.close()


async def checkout(
    p: Platform,
    rng: random.Random,
    pool: str,
    sku: str,
    payment_ref: str,
    *,
    pay: bool = True,
    platform_id: str = "jd",
) -> str:
    """One phone bought through the real checkout of ``platform_id`` (reserve, then capture
    unless ``pay`` is False); returns the order id."""
    person = make_person(rng)
    await p.authority.Enroll(
        identity_pb2.EnrollRequest(name=person.name, id_number=person.id_number, phone=person.phone)
    )
    consumer = await p.eligibility.RegisterConsumer(
        eligibility_pb2.RegisterConsumerRequest(
            name=person.name,
            id_number=person.id_number,
            phone=person.phone,
            platform_id=platform_id,
        )
    )
    q_id = await p.claim(consumer.consumer_id, "phone", channel=platform_id)
    order = f"rc-{rng.randrange(10**12)}"
    await p.ledger.ReserveSubsidy(
        ledger_pb2.ReserveSubsidyRequest(
            order_id=order,
            platform_id=platform_id,
            pool_id=pool,
            consumer_id=consumer.consumer_id,
            qualification_id=q_id,
            sku=sku,
            unit_price_fen=PHONE_PRICE,
        )
    )
    if pay:
        await p.ledger.CaptureSubsidy(
            ledger_pb2.CaptureSubsidyRequest(
                order_id=order, payment_ref=payment_ref, actor=platform_actor(platform_id)
            )
        )
    return order


def platform_actor(platform_id: str) -> common_pb2.Actor:
    # The test channel presents the certificate of the platform a request names.
    return common_pb2.Actor(kind=common_pb2.Actor.KIND_PLATFORM, id=platform_id)


async def stream_events(p: Platform, sha: str) -> list[events_pb2.EventEnvelope]:
    return await p.running["ledger"].runtime.store.read_stream(f"discount-bill/{sha}")


def csv_of(*rows: tuple[str, str, int | str, datetime | str]) -> bytes:
    def cell(v: object) -> str:
        return v.isoformat() if isinstance(v, datetime) else str(v)

    return (HEADER + "".join(",".join(cell(c) for c in r) + "\n" for r in rows)).encode()


@dataclass
class Day:
    """Captures of every kind made in one window, and a bill of them."""

    orders: dict[str, str]
    period: tuple[datetime, datetime]
    data: bytes


@pytest.fixture
async def day(platform: Platform, rng: random.Random) -> Day:
    p = platform
    pool = await p.pool(rng, 10_000_000)
    sku = await p.product(rng, "phone", 0, PHONE_PRICE)
    # Earlier tests captured before this instant, so the period holds this test's captures.
    start = datetime.now(UTC)
    orders: dict[str, str] = {}
    refs: dict[str, str] = {}
    for name in ("matched", "amount", "ref", "missing_in_bill", "refunded", "refunded_unlisted"):
        refs[name] = f"pay-{name}-{rng.randrange(10**6)}"
        orders[name] = await checkout(p, rng, pool, sku, refs[name])
    orders["pending"] = await checkout(p, rng, pool, sku, "", pay=False)
    for name in ("refunded", "refunded_unlisted"):
        await p.ledger.ReleaseSubsidy(
            ledger_pb2.ReleaseSubsidyRequest(order_id=orders[name], reason="REFUNDED")
        )
    orders["unknown"] = f"rc-never-{rng.randrange(10**12)}"
    end = datetime.now(UTC)
    paid = start + timedelta(milliseconds=500)
    data = csv_of(
        (orders["matched"], refs["matched"], PHONE_SUBSIDY, paid),
        (orders["amount"], refs["amount"], PHONE_SUBSIDY + 1, paid),
        (orders["ref"], "pay-not-the-ledgers", PHONE_SUBSIDY, paid),
        (orders["refunded"], refs["refunded"], PHONE_SUBSIDY, paid),
        (orders["pending"], "pay-pending", PHONE_SUBSIDY, paid),
        (orders["unknown"], "pay-unknown", 12_345, paid),
        (orders["matched"], refs["matched"], PHONE_SUBSIDY, paid),  # listed twice
    )
    return Day(orders, (start, end), data)


async def test_each_kind_of_discrepancy_is_found_and_recorded_once(
    platform: Platform, day: Day, as_role: dict[Role, ledger_pb2_grpc.LedgerServiceAsyncStub]
) -> None:
    p, o = platform, day.orders
    operator = as_role[Role.OPERATOR]
    answer = await reconcile_bill(operator, day.data, day.period)
    sha = hashlib.sha256(day.data).hexdigest()
    done = answer.done
    assert (done.file_sha256, done.already_reconciled, list(done.rejected)) == (sha, False, [])
    assert [r.phase for r in answer.replies][:3] == ["READY", "RECEIVE", "VALIDATE"]
    assert {"VALIDATE", "MATCH", "RECORD", "REPORT", "DONE"} <= {r.phase for r in answer.replies}
    assert answer.kinds() == [
        ("AMOUNT_MISMATCH", o["amount"]),
        ("MISSING_IN_LEDGER", o["pending"]),
        ("MISSING_IN_LEDGER", o["unknown"]),
        ("MISSING_IN_BILL", o["missing_in_bill"]),
        ("PAYMENT_REF_MISMATCH", o["ref"]),
        ("REFUNDED_IN_BILL", o["refunded"]),
        ("DUPLICATE", o["matched"]),
    ]
    by_kind = {d.kind: d for d in answer.lines}
    amount = by_kind["AMOUNT_MISMATCH"]
    assert (amount.line, amount.bill_fen, amount.ledger_fen, amount.ledger_status) == (
        3,
        PHONE_SUBSIDY + 1,
        PHONE_SUBSIDY,
        "CAPTURED",
    )
    pending, unknown = (d for d in answer.lines if d.kind == "MISSING_IN_LEDGER")
    assert (pending.ledger_status, unknown.ledger_status) == ("PENDING", "")
    assert (pending.ledger_fen, unknown.bill_fen) == (0, 12_345)
    missing = by_kind["MISSING_IN_BILL"]
    assert (missing.line, missing.bill_fen, missing.ledger_fen) == (0, 0, PHONE_SUBSIDY)
    assert day.period[0] <= missing.captured_at.ToDatetime(tzinfo=UTC) < day.period[1]
    ref = by_kind["PAYMENT_REF_MISMATCH"]
    assert ref.bill_payment_ref == "pay-not-the-ledgers" and ref.ledger_payment_ref.startswith(
        "pay-ref-"
    )
    assert (by_kind["REFUNDED_IN_BILL"].ledger_fen, by_kind["REFUNDED_IN_BILL"].ledger_status) == (
        0,
        "REFUNDED",
    )
    assert (by_kind["DUPLICATE"].line, by_kind["DUPLICATE"].first_line) == (8, 2)

    e = answer.recorded
    assert (e.file_sha256, e.file_bytes, e.rows, e.period_given, e.discrepancies) == (
        sha,
        len(day.data),
        7,
        True,
        7,
    )
    counts = {
        name: (getattr(e, name).count, getattr(e, name).bill_fen, getattr(e, name).ledger_fen)
        for name in (
            "matched",
            "amount_mismatch",
            "payment_ref_mismatch",
            "missing_in_bill",
            "missing_in_ledger",
            "refunded_in_bill",
            "duplicate",
        )
    }
    s = PHONE_SUBSIDY
    assert counts == {
        "matched": (1, s, s),
        "amount_mismatch": (1, s + 1, s),
        "payment_ref_mismatch": (1, s, s),
        "missing_in_bill": (1, 0, s),  # refunded_unlisted is owed nothing: not missing
        "missing_in_ledger": (2, s + 12_345, 0),
        "refunded_in_bill": (1, s, 0),
        "duplicate": (1, s, 0),
    }
    assert (e.bill_total_fen, e.ledger_total_fen) == (6 * s + 1 + 12_345, 4 * s)
    assert e.lines_sha256 == reconcile.lines_sha256(
        reconcile.Discrepancy(
            d.kind,
            d.line,
            d.order_id,
            d.bill_payment_ref,
            d.ledger_payment_ref,
            d.bill_fen,
            d.ledger_fen,
            d.paid_at.ToDatetime(tzinfo=UTC) if d.HasField("paid_at") else None,
            d.captured_at.ToDatetime(tzinfo=UTC) if d.HasField("captured_at") else None,
            d.ledger_status,
            d.first_line,
        )
        for d in answer.lines
    )
    assert done.reconciliation.reconciled_by == "recon-op"
    assert done.reconciliation.reason == "bill of the day"

    # Recorded once, as an event of counts and totals: no order id or payment reference.
    [env] = await stream_events(p, sha)
    assert env.event_type == "subsidy.v1.DiscountBillReconciled"
    assert env.actor.id == "recon-op"
    for order in o.values():
        assert order.encode() not in env.SerializeToString()
    assert events_pb2.DiscountBillReconciled.FromString(env.payload) == e

    # Re-importing the same file changes nothing: no second event, the same answer, even
    # after the ledger moved on (a refund of the matched order).
    await p.ledger.ReleaseSubsidy(
        ledger_pb2.ReleaseSubsidyRequest(order_id=o["matched"], reason="REFUNDED")
    )
    for period in (day.period, None):
        again = await reconcile_bill(operator, day.data, period)
        assert again.done.already_reconciled
        assert again.done.reconciliation == done.reconciliation
        assert again.lines == answer.lines
        assert {r.phase for r in again.replies} == {"READY", "RECEIVE", "REPORT", "DONE"}
    assert len(await stream_events(p, sha)) == 1
    # ... in chunks of any size (the same bytes are the same file).
    small = await reconcile_bill(operator, day.data, day.period, chunk=97)
    assert small.done.already_reconciled and small.done.reconciliation == done.reconciliation

    # The same file for another period is refused: its answer on record is for its period.
    other = (day.period[0], day.period[1] + timedelta(hours=1))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await reconcile_bill(operator, day.data, other)
    assert status_of(err.value) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "BILL_ALREADY_RECONCILED",
        "period_from",
    )
    assert len(await stream_events(p, sha)) == 1

    # Auditors read it back, exactly as it was answered.
    auditor = as_role[Role.AUDITOR]
    read = await get(auditor, sha)
    assert read.done.reconciliation == done.reconciliation and read.lines == answer.lines
    listed = await auditor.ListReconciliations(ledger_pb2.ListReconciliationsRequest(limit=500))
    assert [r for r in listed.reconciliations if r.recorded.file_sha256 == sha] == [
        done.reconciliation
    ]


async def test_a_bill_with_a_malformed_row_records_nothing(
    platform: Platform, day: Day, as_role: dict[Role, ledger_pb2_grpc.LedgerServiceAsyncStub]
) -> None:
    o = day.orders
    data = (
        HEADER
        + f"{o['matched']},pay-1,45000,2025-06-01T10:00:00+08:00\n"
        + f"{o['amount']},pay-2,450.00,2025-06-01T10:00:00+08:00\n"
        + f"{o['ref']},pay-3,45000,2025-06-01T10:00:00+08:00\n"
        + f"{o['refunded']},pay-4,45000,2025-06-01 10:00\n"
    ).encode()
    sha = hashlib.sha256(data).hexdigest()
    operator = as_role[Role.OPERATOR]
    answer = await reconcile_bill(operator, data)
    done = answer.done
    assert not done.HasField("reconciliation")
    assert [(r.line, r.column, r.reason) for r in done.rejected] == [
        (3, "discount_fen", "INVALID_AMOUNT"),
        (5, "paid_at", "INVALID_TIME"),
    ]
    assert (done.rejected_rows, done.total, done.file_sha256) == (2, 4, sha)
    assert answer.lines == []
    assert await stream_events(platform, sha) == []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await get(operator, sha)
    assert status_of(err.value)[:2] == (grpc.StatusCode.NOT_FOUND, "UNKNOWN_RECONCILIATION")
    # The corrected bill is a new file, and is reconciled.
    fixed = data.replace(b",450.00,", b",45000,").replace(
        b"2025-06-01 10:00\n", b"2025-06-01T10:00+08:00\n"
    )
    again = await reconcile_bill(operator, fixed)
    assert not again.done.already_reconciled and again.recorded.rows == 4
    assert again.recorded.period_given is False
    assert again.recorded.period_from.ToDatetime(tzinfo=UTC) == datetime(2025, 6, 1, 2, tzinfo=UTC)


@pytest.mark.parametrize(
    ("data", "reason", "field"),
    [
        (b"", "EMPTY_BILL", "csv"),
        (b"order_id,payment_ref,discount_fen\no-1,p,1\n", "WRONG_HEADER", "csv"),
        (HEADER.encode() + b"o-1,\xff,1,2025-06-01T10:00Z\n", "INVALID_ENCODING", "csv"),
        (HEADER.encode(), "EMPTY_BILL", "csv"),
    ],
)
async def test_a_bill_that_is_not_a_bill_is_refused_and_records_nothing(
    platform: Platform,
    as_role: dict[Role, ledger_pb2_grpc.LedgerServiceAsyncStub],
    data: bytes,
    reason: str,
    field: str,
) -> None:
    store = platform.running["ledger"].runtime.store
    before = await store.count()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await reconcile_bill(as_role[Role.OPERATOR], data)
    assert status_of(err.value) == (grpc.StatusCode.INVALID_ARGUMENT, reason, field)
    assert await stream_events(platform, hashlib.sha256(data).hexdigest()) == []
    assert await store.count() == before


async def test_bounds_on_chunks_bills_and_periods_are_enforced_before_any_work(
    as_role: dict[Role, ledger_pb2_grpc.LedgerServiceAsyncStub],
) -> None:
    operator = as_role[Role.OPERATOR]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await reconcile_bill(operator, b"x" * (CHUNK + 1), chunk=CHUNK + 1)
    assert status_of(err.value) == (grpc.StatusCode.INVALID_ARGUMENT, "CHUNK_TOO_LARGE", "data")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await reconcile_bill(operator, b"x" * (reconcile.MAX_BILL_BYTES + 1))
    assert status_of(err.value) == (grpc.StatusCode.INVALID_ARGUMENT, "BILL_TOO_LARGE", "csv")
    now = datetime.now(UTC)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await reconcile_bill(operator, csv_of(("o-1", "p", 1, now)), (now, now))
    assert status_of(err.value) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PERIOD", "period_to")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await get(operator, "not-a-hash")
    assert status_of(err.value) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_SHA256",
        "file_sha256",
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await operator.ListReconciliations(ledger_pb2.ListReconciliationsRequest(limit=501))
    assert status_of(err.value) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_LIMIT", "limit")


@pytest.mark.parametrize("role", [Role.PLATFORM, Role.APPROVER, Role.AUDITOR, Role.SERVICE])
async def test_only_an_operator_may_reconcile(
    platform: Platform,
    as_role: dict[Role, ledger_pb2_grpc.LedgerServiceAsyncStub],
    role: Role,
) -> None:
    data = csv_of((f"o-denied-{role}", "p", 1, datetime.now(UTC)))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await reconcile_bill(as_role[role], data)
    assert status_of(err.value)[:2] == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
    assert await stream_events(platform, hashlib.sha256(data).hexdigest()) == []


@pytest.mark.parametrize("role", [Role.PLATFORM, Role.APPROVER])
async def test_only_operators_and_auditors_read_reconciliations(
    as_role: dict[Role, ledger_pb2_grpc.LedgerServiceAsyncStub], role: Role
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await as_role[role].ListReconciliations(ledger_pb2.ListReconciliationsRequest())
    assert status_of(err.value)[:2] == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await get(as_role[role], "0" * 64)
    assert status_of(err.value)[:2] == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")


async def test_a_bill_of_a_hundred_thousand_rows_streams_within_the_message_limit(
    platform: Platform, as_role: dict[Role, ledger_pb2_grpc.LedgerServiceAsyncStub]
) -> None:
    rows = 100_000
    tag = f"{random.randrange(10**9)}"
    paid = datetime(2020, 1, 1, tzinfo=UTC)  # a period with no captures
    data = csv_of(
        *((f"big-{tag}-{i}", f"pay-{tag}-{i}", 1 + i % 50_000, paid) for i in range(rows))
    )
    assert len(data) > rpc.MAX_REQUEST_BYTES  # more than one gRPC message could carry
    started = time.perf_counter()
    answer = await reconcile_bill(as_role[Role.OPERATOR], data)
    took = time.perf_counter() - started
    e = answer.recorded
    assert (e.rows, e.missing_in_ledger.count, e.discrepancies, e.matched.count) == (
        rows,
        rows,
        rows,
        0,
    )
    assert (
        e.bill_total_fen == sum(1 + i % 50_000 for i in range(rows)) == e.missing_in_ledger.bill_fen
    )
    assert len(answer.lines) == rows
    assert [d.line for d in answer.lines] == list(range(2, rows + 2))
    assert max(r.ByteSize() for r in answer.replies) < rpc.MAX_REQUEST_BYTES
    print(f"100,000-row bill: {len(data)} bytes reconciled in {took:.1f} s")
    again = await get(as_role[Role.AUDITOR], e.file_sha256)
    assert len(again.lines) == rows and again.lines[-1] == answer.lines[-1]


async def test_the_reconciliation_read_models_rebuild_from_events_alone(
    platform: Platform, day: Day, as_role: dict[Role, ledger_pb2_grpc.LedgerServiceAsyncStub]
) -> None:
    p = platform
    await reconcile_bill(as_role[Role.OPERATOR], day.data, day.period)
    await p.quiesce()
    store = p.running["ledger"].runtime.store
    tables = ("bill_captures", "reconciliations", "reconciliation_lines")

    async def rows() -> dict[str, list[tuple[object, ...]]]:
        async with store.engine.connect() as conn:
            return {
                t: [tuple(r) for r in await conn.execute(text(f"SELECT * FROM {t} ORDER BY 1, 2"))]
                for t in tables
            }

    before = await rows()
    assert all(before.values())
    async with store.transaction() as tx:  # damage them: the replay must not need them
        await tx.conn.execute(text("DELETE FROM bill_captures"))
        await tx.conn.execute(text("UPDATE reconciliations SET reason = 'tampered'"))
    await ledger_projections.rebuild(store)
    assert await rows() == before
    # The kept lines are the runtime role's to add, never to change.
    with pytest.raises(Exception, match="permission denied"):
        async with store.transaction() as tx:
            await tx.conn.execute(text("DELETE FROM reconciliation_lines"))


async def test_the_same_bill_imported_twice_at_once_is_recorded_once(
    platform: Platform, day: Day, as_role: dict[Role, ledger_pb2_grpc.LedgerServiceAsyncStub]
) -> None:
    operator = as_role[Role.OPERATOR]
    one, other = await asyncio.gather(
        reconcile_bill(operator, day.data, day.period),
        reconcile_bill(operator, day.data, day.period),
    )
    assert sorted([one.done.already_reconciled, other.done.already_reconciled]) == [False, True]
    assert one.done.reconciliation == other.done.reconciliation and one.lines == other.lines
    assert len(await stream_events(platform, hashlib.sha256(day.data).hexdigest())) == 1
    async with platform.running["ledger"].runtime.store.engine.connect() as conn:
        kept = await conn.scalar(
            text("SELECT count(*) FROM reconciliation_lines WHERE file_sha256 = :s"),
            {"s": one.done.file_sha256},
        )
    assert kept == len(one.lines) == 7


async def test_a_platforms_bill_misses_only_that_platforms_captures(
    platform: Platform,
    rng: random.Random,
    as_role: dict[Role, ledger_pb2_grpc.LedgerServiceAsyncStub],
) -> None:
    p = platform
    operator = as_role[Role.OPERATOR]
    pool = await p.pool(rng, 1_000_000)
    sku = await p.product(rng, "phone", 0, PHONE_PRICE)
    start = datetime.now(UTC)
    jd = [await checkout(p, rng, pool, sku, f"pay-jd-{i}") for i in range(2)]
    taobao = await checkout(p, rng, pool, sku, "pay-tb", platform_id="taobao")
    period = (start, datetime.now(UTC))
    data = csv_of((jd[0], "pay-jd-0", PHONE_SUBSIDY, start))  # jd's bill, one order short
    answer = await reconcile_bill(operator, data, period, platform_id="jd")
    assert answer.kinds() == [("MISSING_IN_BILL", jd[1])]  # not taobao's capture
    assert (answer.recorded.platform_id, answer.recorded.ledger_total_fen) == (
        "jd",
        2 * PHONE_SUBSIDY,
    )
    again = await reconcile_bill(operator, data, period)  # the recorded answer
    assert again.done.already_reconciled and again.done.reconciliation == answer.done.reconciliation
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await reconcile_bill(operator, data, period, platform_id="taobao")
    assert status_of(err.value)[:2] == (grpc.StatusCode.ALREADY_EXISTS, "BILL_ALREADY_RECONCILED")
    # The same rows as a bill of every platform (another file): taobao's capture is missing too.
    every = data + b"\n"
    everyone = await reconcile_bill(operator, every, period)
    assert sorted(everyone.kinds()) == sorted(
        [("MISSING_IN_BILL", jd[1]), ("MISSING_IN_BILL", taobao)]
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await reconcile_bill(operator, data + b"\n\n", period, platform_id="jd 1")
    assert status_of(err.value) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_IDENTIFIER",
        "platform_id",
    )
