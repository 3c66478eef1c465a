"""The admission bound is in front of every service on the real stack: a checkout's calls, the
platform's and the ones the ledger makes of catalog and eligibility, are each counted as
admitted by the process that served them (services/kernel/admission.py)."""

from __future__ import annotations

import json
import random

from prometheus_client import REGISTRY

from services.kernel import rpc
from subsidy.v1 import ledger_pb2
from tests.e2e.conftest import Platform

RESERVE = "/subsidy.v1.LedgerService/ReserveSubsidy"
VERIFY = "/subsidy.v1.CatalogService/VerifyItem"
LOCK = "/subsidy.v1.EligibilityService/LockQualification"


def admitted(method: str) -> float:
    value = REGISTRY.get_sample_value(
        "subsidy_rpc_admissions_total", {"method": method, "outcome": "admitted"}
    )
    return value or 0.0


async def test_a_checkout_passes_the_admission_bound_of_every_service_it_touches(
    platform: Platform, rng: random.Random
) -> None:
    p = platform
    _, consumer = await p.person(rng)
    sku = await p.product(rng, "refrigerator", 1, 1_200_000)
    pool = await p.pool(rng, 10_000_000)
    q_id = await p.claim(consumer, "refrigerator")
    before = {m: admitted(m) for m in (RESERVE, VERIFY, LOCK)}
    await p.ledger.ReserveSubsidy(
        ledger_pb2.ReserveSubsidyRequest(
            order_id=f"o-{rng.randrange(10**12)}",
            platform_id="jd",
            pool_id=pool,
            consumer_id=consumer,
            qualification_id=q_id,
            sku=sku,
            unit_price_fen=1_200_000,
        )
    )
    after = {m: admitted(m) for m in (RESERVE, VERIFY, LOCK)}
    assert {m: after[m] - before[m] for m in after} == {RESERVE: 1, VERIFY: 1, LOCK: 1}


async def test_the_services_channels_to_their_peers_carry_the_retry_policy(
    platform: Platform,
) -> None:
    for service, peer, call in (
        ("ledger", "catalog", ("subsidy.v1.CatalogService", "VerifyItem")),
        ("ledger", "eligibility", ("subsidy.v1.EligibilityService", "LockQualification")),
        (
            "eligibility",
            "identity_authority",
            ("subsidy.v1.IdentityAuthority", "VerifyThreeFactors"),
        ),
    ):
        ch = platform.running[service].runtime.channel(peer)
        try:
            options = dict(ch._options)
            assert options["grpc.enable_retries"] == 1
            (config,) = json.loads(options["grpc.service_config"])["methodConfig"]
            names = {(n["service"], n["method"]) for n in config["name"]}
            assert call in names, (service, peer)
            assert config["retryPolicy"] == rpc.RETRY_POLICY
        finally:
            await ch.close()
