"""VerifyItem's cache and coalesced reads never answer from a stale product, merchant, price,
switch or policy: a change made through one catalog replica is seen by the very next VerifyItem
on another replica of the same database, one that runs no refresh loop (so nothing but the
call's own read can have told it), and concurrent calls sharing one statement each get their
own item's answer.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml
from sqlalchemy import delete, insert, text, update

from services.catalog.api import CatalogApi
from services.catalog.domain import ApprovePolicy, DraftPolicy, PauseCampaign, ResumeCampaign
from services.catalog.handlers import Catalog
from services.catalog.items import MIN_ROWS
from services.catalog.projections import (
    merchants,
    metadata,
    price_history,
    products,
    sales_orders,
)
from services.catalog.requests import ItemQuery
from services.kernel import rpc
from services.kernel.contract.policy import default_policy, policy_from_text, policy_to_dict
from services.kernel.events import Context
from services.kernel.eventstore import EventStore, make_engine
from services.kernel.identity import Caller, Role
from subsidy.v1 import catalog_pb2, catalog_pb2_grpc, common_pb2
from tests.conftest import Infra
from tests.e2e.conftest import Platform
from tests.e2e.test_catalog import OPERATOR, merchant, product
from tests.support.callers import CallerRouter

APPROVER = common_pb2.Actor(kind=common_pb2.Actor.KIND_APPROVER, id="ap-wang")


@pytest.fixture
async def quiet_replica(
    platform: Platform,
) -> AsyncIterator[tuple[Catalog, catalog_pb2_grpc.CatalogServiceAsyncStub]]:
    """A second catalog replica on the platform's database, serving gRPC, WITHOUT a refresh
    loop: whatever it knows of a change, its VerifyItem read told it."""
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
    channel = CallerRouter(f"127.0.0.1:{port}", identities)
    try:
        yield catalog, catalog_pb2_grpc.CatalogServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(grace=None)
        await store.engine.dispose()


async def test_the_next_verify_item_sees_every_product_and_merchant_change(
    platform: Platform,
    rng: random.Random,
    quiet_replica: tuple[Catalog, catalog_pb2_grpc.CatalogServiceAsyncStub],
) -> None:
    p = platform
    replica_catalog, replica = quiet_replica
    m = await merchant(p, rng)
    sku = await product(p, rng, m, "refrigerator", 1, 1_000_000)
    request = catalog_pb2.VerifyItemRequest(sku=sku, unit_price_fen=1_000_000)
    first = await replica.VerifyItem(request)
    assert (first.eligible, first.baseline_fen) == (True, 1_000_000)
    assert sku in replica_catalog.items.histories  # the history is cached from here on
    remembered = replica_catalog.items.from_memory
    again = await replica.VerifyItem(request)
    assert again == first
    # Nothing changed in between: answered from the rows kept, after reading only the clock.
    assert replica_catalog.items.from_memory == remembered + 1

    # A price change through the other replica: the cached history is the old version's, so
    # the very next call reads the new one. After a moment the new price is the baseline (it
    # has held for almost all of the window's time since the product's first price).
    await p.catalog.UpdatePrice(
        catalog_pb2.UpdatePriceRequest(
            sku=sku, list_price_fen=800_000, reason="降价", actor=OPERATOR
        )
    )
    await asyncio.sleep(0.3)
    repriced = await replica.VerifyItem(request)
    assert repriced.baseline_fen == 800_000, repriced
    assert list(repriced.reasons) == ["PRICE_ABOVE_BASELINE"]
    assert replica_catalog.items.histories[sku].version == 2

    # The merchant suspended, then the product delisted: each seen by the next call.
    await p.catalog.SuspendMerchant(
        catalog_pb2.MerchantActionRequest(merchant_id=m, reason="资质过期", actor=OPERATOR)
    )
    ok = catalog_pb2.VerifyItemRequest(sku=sku, unit_price_fen=800_000)
    suspended = await replica.VerifyItem(ok)
    assert list(suspended.reasons) == ["MERCHANT_SUSPENDED"]
    await p.catalog.ReinstateMerchant(
        catalog_pb2.MerchantActionRequest(merchant_id=m, reason="已更新", actor=OPERATOR)
    )
    assert (await replica.VerifyItem(ok)).eligible
    await p.catalog.DelistProduct(
        catalog_pb2.DelistProductRequest(sku=sku, reason="停产", actor=OPERATOR)
    )
    delisted = await replica.VerifyItem(ok)
    assert list(delisted.reasons) == ["PRODUCT_DELISTED"]

    # A SKU unknown a moment ago is known at the next call once registered.
    later = catalog_pb2.VerifyItemRequest(
        sku=f"sku-{rng.randrange(10**12)}", unit_price_fen=100_000
    )
    assert list((await replica.VerifyItem(later)).reasons) == ["UNKNOWN_SKU"]
    await p.catalog.RegisterProduct(
        catalog_pb2.RegisterProductRequest(
            sku=later.sku,
            merchant_id=m,
            category="microwave",
            grade=1,
            brand="美的",
            model="M1",
            list_price_fen=100_000,
        )
    )
    registered = await replica.VerifyItem(later)
    assert (registered.eligible, registered.baseline_fen) == (True, 100_000)


async def test_the_next_verify_item_sees_a_pause_made_elsewhere(
    platform: Platform,
    rng: random.Random,
    quiet_replica: tuple[Catalog, catalog_pb2_grpc.CatalogServiceAsyncStub],
) -> None:
    p = platform
    _, replica = quiet_replica
    m = await merchant(p, rng)
    sku = await product(p, rng, m, "microwave", 1, 100_000)
    request = catalog_pb2.VerifyItemRequest(sku=sku, unit_price_fen=100_000)
    assert (await replica.VerifyItem(request)).eligible
    await p.catalog.PauseCategory(
        catalog_pb2.CategorySwitchRequest(category="microwave", reason="质量事件", actor=OPERATOR)
    )
    try:
        paused = await replica.VerifyItem(request)  # at once: no loop runs on this replica
        assert list(paused.reasons) == ["CATEGORY_PAUSED"]
    finally:
        await p.catalog.ResumeCategory(
            catalog_pb2.CategorySwitchRequest(category="microwave", reason="已处置", actor=OPERATOR)
        )
    assert (await replica.VerifyItem(request)).eligible


async def test_concurrent_calls_share_statements_and_keep_their_own_answers(
    platform: Platform,
    rng: random.Random,
    quiet_replica: tuple[Catalog, catalog_pb2_grpc.CatalogServiceAsyncStub],
) -> None:
    p = platform
    replica_catalog, replica = quiet_replica
    m = await merchant(p, rng)
    prices = [100_000 + 1_000 * i for i in range(MIN_ROWS + 4)]
    skus = [await product(p, rng, m, "microwave", 1, fen) for fen in prices]
    requests = [
        catalog_pb2.VerifyItemRequest(sku=s, unit_price_fen=fen)
        for s, fen in zip(skus, prices, strict=True)
    ]
    requests.append(catalog_pb2.VerifyItemRequest(sku="sku-nobody", unit_price_fen=100_000))
    before = replica_catalog.items.statements
    remembered = replica_catalog.items.from_memory
    for _ in range(2):  # first read with the histories, then from the cache
        answers = await asyncio.gather(*(replica.VerifyItem(r) for r in requests))
        for r, v in zip(requests[:-1], answers, strict=False):
            assert (v.eligible, v.baseline_fen, v.merchant_id) == (True, r.unit_price_fen, m)
        assert list(answers[-1].reasons) == ["UNKNOWN_SKU"]
    # The second round's known products were answered from memory (the unknown SKU is read).
    assert replica_catalog.items.from_memory - remembered == len(skus)
    # Calls in flight together shared statements (how many depends on the timing).
    assert replica_catalog.items.statements - before < 2 * len(requests)


# --------------------------------------------------------------------------------------------
# Policies: two catalogs on a database of their own (a new version in force would reach the
# shared platform's other services through the catalog's events).


def _policy(version: str, effective_from: dt.datetime) -> Any:
    doc = policy_to_dict(default_policy())
    doc.update(version=version, effective_from=effective_from.isoformat())
    return policy_from_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False))


async def test_the_next_verify_item_sees_a_policy_or_pause_approved_on_another_replica(
    infra: Infra,
) -> None:
    url = infra.create_database("catalog_hot")
    stores = [EventStore(make_engine(url)) for _ in range(2)]
    try:
        await stores[0].create_tables(metadata)
        writer, reader = (Catalog(s) for s in stores)
        await writer.ensure_default_policy()
        await reader.refresh()  # no refresh loop runs on the reader
        query = ItemQuery(sku="sku-none", unit_price_fen=100_000, serial="", policy_version="")
        assert (await reader.verify_item(query)).policy_version == default_policy().version

        effective = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)
        policy = _policy("shenzhen-2031.7", effective)
        maker = Context(common_pb2.Actor(kind=OPERATOR.kind, id="op-li", reason="调整"))
        await writer.draft_policy(DraftPolicy(policy, "调整"), maker)
        checker = Context(common_pb2.Actor(kind=APPROVER.kind, id=APPROVER.id, reason="复核"))
        await writer.approve_policy(ApprovePolicy(policy.version, checker.actor, "复核"), checker)
        await asyncio.sleep(max(0.0, (effective - dt.datetime.now(dt.UTC)).total_seconds()))
        assert (await reader.verify_item(query)).policy_version == "shenzhen-2031.7"

        ctx = Context(common_pb2.Actor(kind=OPERATOR.kind, id="op-li", reason="演练"))
        await writer.pause_campaign(PauseCampaign("演练"), ctx)
        paused = await reader.verify_item(query)
        assert paused.reasons == ("UNKNOWN_SKU", "CAMPAIGN_PAUSED")
        await writer.resume_campaign(ResumeCampaign("结束"), ctx)
        assert (await reader.verify_item(query)).reasons == ("UNKNOWN_SKU",)
    finally:
        for store in stores:
            await store.engine.dispose()


async def test_the_catalog_clock_moves_once_per_committed_change_to_what_verify_item_reads(
    infra: Infra,
) -> None:
    url = infra.create_database("catalog_clock")
    store = EventStore(make_engine(url))
    clock = text("SELECT v FROM catalog_clock WHERE id = 1")
    mark = text("SELECT mark FROM catalog_clock WHERE id = 1")
    try:
        await store.create_tables(metadata)
        async with store.engine.connect() as conn:
            start = (await conn.execute(clock)).scalar_one()
        rows = [
            {
                "sku": f"c-{i}",
                "merchant_id": "m-1",
                "category": "microwave",
                "grade": 1,
                "brand": "b",
                "model": "m",
                "energy_label_code": "",
                "list_price_fen": 100_000,
                "status": "LISTED",
            }
            for i in range(3)
        ]
        async with store.engine.begin() as conn:  # three rows, two statements: one move
            await conn.execute(insert(products), rows[:2])
            await conn.execute(insert(products), rows[2:])
            # Not yet committed: another connection still reads the value before.
            async with store.engine.connect() as other:
                assert (await other.execute(clock)).scalar_one() == start
        async with store.engine.connect() as conn:
            assert (await conn.execute(clock)).scalar_one() == start + 1
        async with store.engine.connect() as conn:  # rolled back: no move
            async with conn.begin() as tx:
                await conn.execute(update(products).values(status="DELISTED"))
                await tx.rollback()
            assert (await conn.execute(clock)).scalar_one() == start + 1
        for change in (
            update(products).where(products.c.sku == "c-1").values(list_price_fen=90_000),
            insert(merchants).values(
                merchant_id="m-1",
                name="n",
                licence_number="l",
                contact_masked="c",
                status="ACTIVE",
            ),
            insert(price_history).values(
                sku="c-1", event_id="e-1", effective_at=dt.datetime.now(dt.UTC), price_fen=1
            ),
            delete(products).where(products.c.sku == "c-2"),
        ):
            async with store.engine.begin() as conn:
                before = (await conn.execute(clock)).scalar_one()
                marked = (await conn.execute(mark)).scalar_one()
                await conn.execute(change)
            async with store.engine.connect() as conn:
                assert (await conn.execute(clock)).scalar_one() == before + 1, change
                assert (await conn.execute(mark)).scalar_one() != marked, change
        # What every checkout writes (the orders holding serials) does not move it.
        async with store.engine.begin() as conn:
            await conn.execute(insert(sales_orders).values(order_id="o-1", status="RESERVED"))
        async with store.engine.connect() as conn:
            assert (await conn.execute(clock)).scalar_one() == start + 5
    finally:
        await store.engine.dispose()
