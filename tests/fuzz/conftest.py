"""The fuzzer's own platform: the four services on fresh databases and their own NATS.

Not the e2e session's platform: a fuzzed operator call that succeeds (pausing the campaign, a
funding proposal, a policy draft) must not change what the other tests see. A small campaign
is seeded so that some requests name real ids and reach the rules behind "not found".
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from services.audit import tree
from services.kernel import natsauth
from subsidy.v1 import catalog_pb2
from subsidyctl.demo import DEMO_REGION, load_demo
from subsidyctl.stack import Nats, free_port
from tests.conftest import Infra
from tests.e2e.conftest import DEMO_POLICY_VERSION, Platform, platform_on


@dataclass
class Seeded:
    platform: Platform
    known: tuple[str, ...]  # real ids and names the generated strings draw from

    async def settle(self) -> None:
        """Every consumer has handled every event, and the audit tree holds the whole log
        (the audit service integrates it each second; integrating is idempotent and takes the
        tree's lock, so doing it here only saves the wait)."""
        await self.platform.quiesce()
        store = self.platform.running["audit"].runtime.store
        while await tree.integrate(store):
            pass


@pytest.fixture(scope="module")
async def fuzz_platform(infra: Infra) -> AsyncIterator[Seeded]:
    nats = Nats(
        store_dir=infra.root / "nats-fuzz",
        port=free_port(),
        monitor_port=free_port(),
        log_dir=infra.root / "logs",
        accounts=natsauth.provision(infra.bao.client()),
    )
    nats.start()
    try:
        async with platform_on(infra, nats.url, nats.operator) as p:
            rng = random.Random(15)
            demo = load_demo()
            categories = sorted({product["category"] for product in demo["products"]})
            sku = await p.product(rng, "refrigerator", 1, 300_000)
            merchant = (
                await p.catalog.GetProduct(catalog_pb2.GetProductRequest(sku=sku))
            ).merchant_id
            _, consumer = await p.person(rng)
            qualification = await p.claim(consumer, "refrigerator")
            pool = await p.pool(rng, 10_000_000)
            await p.quiesce()
            known = (
                sku,
                merchant,
                consumer,
                qualification,
                pool,
                DEMO_POLICY_VERSION,
                DEMO_REGION,
                "jd",
                "taobao",
                "district",
                *categories,
            )
            yield Seeded(p, known)
    finally:
        nats.stop()
