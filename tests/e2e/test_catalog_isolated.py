"""A catalog of its own, on the session's PostgreSQL and OpenBao but its own NATS server.

Policy activation changes the policy in force, and a 10,000-row import appends 10,000 events:
both would leak into the shared platform (its eligibility learns policies from catalog events,
its audit log takes every event), so they run against a separate, real catalog service.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from services.catalog.service import SPEC as CATALOG
from services.kernel import natsauth
from services.kernel.app import Running, migrate_schema, start
from services.kernel.contract.policy import default_policy, policy_to_dict
from services.kernel.identity import Caller, Role
from services.kernel.settings import Settings
from subsidy.v1 import catalog_pb2, catalog_pb2_grpc, common_pb2
from subsidyctl.stack import Nats, free_port
from tests.conftest import Infra
from tests.e2e.cli import identity_dir, subsidyctl
from tests.e2e.conftest import status_of
from tests.support.callers import CallerRouter

OPERATOR = common_pb2.Actor(kind=common_pb2.Actor.KIND_OPERATOR, id="op-li")
APPROVER = common_pb2.Actor(kind=common_pb2.Actor.KIND_APPROVER, id="ap-wang")
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@dataclass
class OwnCatalog:
    running: Running
    stub: catalog_pb2_grpc.CatalogServiceAsyncStub

    async def events(self) -> int:
        return await self.running.runtime.store.count()

    async def refused(
        self, call: Awaitable[Any], code: grpc.StatusCode, reason: str, field: str
    ) -> grpc.aio.AioRpcError:
        before = await self.events()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert status_of(err.value) == (code, reason, field), err.value.details()
        assert await self.events() == before
        return err.value


@pytest.fixture(scope="module")
async def own(infra: Infra) -> AsyncIterator[OwnCatalog]:
    root = infra.root / f"own-catalog-{free_port()}"
    root.mkdir()
    nats = Nats(
        store_dir=root / "nats",
        port=free_port(),
        monitor_port=free_port(),
        log_dir=root,
        accounts=natsauth.provision(infra.bao.client()),
    )
    nats.start()
    settings = Settings(
        service="catalog",
        grpc_listen="127.0.0.1:0",
        database_url=infra.create_database("catalog_own"),
        nats_url=nats.url,
        vault_addr=infra.bao.addr,
        vault_token=infra.bao.token,
        vault_k8s_role=None,
        tls_source="vault",
    )
    identities = infra.identities
    await migrate_schema(CATALOG, settings)  # what the chart's migration Job runs first
    running = await start(CATALOG, settings)
    channel = CallerRouter(f"127.0.0.1:{running.port}", identities, deadline_s=60)
    try:
        yield OwnCatalog(running, catalog_pb2_grpc.CatalogServiceStub(channel))
    finally:
        await channel.close()
        await running.stop()
        nats.stop()


def document(version: str, effective_from: dt.datetime, **changes: Any) -> str:
    """The default policy as YAML, under a new version, with top-level ``changes``."""
    doc = policy_to_dict(default_policy())
    doc.update(version=version, effective_from=effective_from.isoformat(), **changes)
    return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)


def soon(seconds: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)


async def product(own: OwnCatalog, rng: random.Random, category: str, grade: int, fen: int) -> str:
    m = f"m-{rng.randrange(10**12)}"
    await own.stub.ApplyMerchant(
        catalog_pb2.ApplyMerchantRequest(
            merchant_id=m,
            name="商行",
            licence_number="91440300MA5DC6QX4Y",
            contact_phone="13800000000",
        )
    )
    await own.stub.ReviewMerchant(catalog_pb2.ReviewMerchantRequest(merchant_id=m, approve=True))
    sku = f"sku-{rng.randrange(10**12)}"
    await own.stub.RegisterProduct(
        catalog_pb2.RegisterProductRequest(
            sku=sku,
            merchant_id=m,
            category=category,
            grade=grade,
            brand="海尔",
            model="BCD",
            list_price_fen=fen,
        )
    )
    return sku


async def test_maker_checker_then_in_force_from_effective_from(
    own: OwnCatalog, rng: random.Random
) -> None:
    sku = await product(own, rng, "refrigerator", 1, 1_200_000)
    version = f"shenzhen-2026.{rng.randrange(10**6)}"
    # The 2026 rules: appliances at 15% whatever the grade, capped at 1,500 yuan.
    doc = policy_to_dict(default_policy())
    for rule in doc["categories"]:
        if rule["group"] == "national_appliance":
            rule["grades"] = {"1": 1500}
            rule["cap_fen"] = 150_000
    effective = soon(3.0)
    doc.update(version=version, effective_from=effective.isoformat())
    drafted = await own.stub.DraftPolicy(
        catalog_pb2.DraftPolicyRequest(
            document=json.dumps(doc, ensure_ascii=False), actor=OPERATOR, reason="2026年新规"
        )
    )
    assert (drafted.version, drafted.status, drafted.drafted_by, drafted.in_force) == (
        version,
        "DRAFT",
        "op-li",
        False,
    )
    # A draft changes nothing: quotes and verification stay on the version in force.
    await own.refused(
        own.stub.Quote(
            catalog_pb2.QuoteRequest(category="tv", grade=1, price_fen=100, policy_version=version)
        ),
        grpc.StatusCode.NOT_FOUND,
        "UNKNOWN_POLICY_VERSION",
        "policy_version",
    )

    def approve(actor: common_pb2.Actor, reason: str = "复核通过", v: str = version) -> Any:
        return own.stub.ApprovePolicy(
            catalog_pb2.ApprovePolicyRequest(version=v, actor=actor, reason=reason)
        )

    same_person = common_pb2.Actor(kind=common_pb2.Actor.KIND_APPROVER, id="op-li")
    await own.refused(
        approve(same_person), grpc.StatusCode.PERMISSION_DENIED, "MAKER_CHECKER", "actor.id"
    )
    await own.refused(
        approve(common_pb2.Actor(kind=common_pb2.Actor.KIND_OPERATOR, id="op-zhao")),
        grpc.StatusCode.PERMISSION_DENIED,
        "ROLE_NOT_ALLOWED",
        "",
    )
    await own.refused(approve(APPROVER, reason=""), INVALID, "MISSING_FIELD", "reason")
    await own.refused(
        approve(APPROVER, v="shenzhen-1999.1"),
        grpc.StatusCode.NOT_FOUND,
        "UNKNOWN_POLICY_VERSION",
        "version",
    )

    approved = await approve(APPROVER)
    assert (approved.status, approved.approved_by, approved.approve_reason) == (
        "APPROVED",
        "ap-wang",
        "复核通过",
    )
    await own.refused(
        approve(common_pb2.Actor(kind=common_pb2.Actor.KIND_APPROVER, id="ap-zhou")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "POLICY_ALREADY_APPROVED",
        "version",
    )

    request = catalog_pb2.VerifyItemRequest(sku=sku, unit_price_fen=1_200_000)
    before = await own.stub.VerifyItem(request)
    # Approval needs a second's lead, so this is before effective_from: not yet in force.
    assert (before.policy_version, before.subsidy_fen) == ("shenzhen-2025.1", 200_000)
    await asyncio.sleep(max(0.0, (effective - dt.datetime.now(dt.UTC)).total_seconds()) + 0.05)
    after = await own.stub.VerifyItem(request)
    assert (after.policy_version, after.subsidy_fen, after.rate_bp, after.cap_fen) == (
        version,
        150_000,
        1500,
        150_000,
    )

    # Old versions stay readable, and quotable, forever.
    old = await own.stub.GetPolicy(catalog_pb2.GetPolicyRequest(version="shenzhen-2025.1"))
    assert (old.status, json.loads(old.policy_json)["categories"][0]["cap_fen"]) == (
        "APPROVED",
        200_000,
    )
    current = await own.stub.GetPolicy(catalog_pb2.GetPolicyRequest())
    assert (current.version, current.drafted_by, current.approved_by) == (
        version,
        "op-li",
        "ap-wang",
    )
    pinned = await own.stub.Quote(
        catalog_pb2.QuoteRequest(
            category="refrigerator", grade=1, price_fen=1_200_000, policy_version="shenzhen-2025.1"
        )
    )
    assert (pinned.subsidy_fen, pinned.policy_version) == (200_000, "shenzhen-2025.1")
    listed = await own.stub.ListPolicies(catalog_pb2.ListPoliciesRequest())
    in_force = [(v.version, v.in_force) for v in listed.versions]
    assert ("shenzhen-2025.1", False) in in_force and (version, True) in in_force

    envs = await own.running.runtime.store.read_stream(f"policy/{version}")
    assert [(e.event_type.rsplit(".", 1)[-1], e.actor.id, e.actor.reason) for e in envs] == [
        ("PolicyDrafted", "op-li", "2026年新规"),
        ("PolicyApproved", "ap-wang", "复核通过"),
        ("PolicyPublished", "ap-wang", "复核通过"),
    ]


async def test_approval_after_effective_from_is_refused(
    own: OwnCatalog, rng: random.Random
) -> None:
    version = f"late-{rng.randrange(10**6)}"
    effective = soon(1.0)
    await own.stub.DraftPolicy(
        catalog_pb2.DraftPolicyRequest(
            document=document(version, effective), actor=OPERATOR, reason="r"
        )
    )
    await asyncio.sleep(max(0.0, (effective - dt.datetime.now(dt.UTC)).total_seconds()) + 0.05)
    await own.refused(
        own.stub.ApprovePolicy(
            catalog_pb2.ApprovePolicyRequest(version=version, actor=APPROVER, reason="r")
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "EFFECTIVE_FROM_PASSED",
        "version",
    )


async def test_draft_refusals_name_the_field(own: OwnCatalog, rng: random.Random) -> None:
    def draft(doc: str, actor: common_pb2.Actor = OPERATOR, reason: str = "r") -> Any:
        return own.stub.DraftPolicy(
            catalog_pb2.DraftPolicyRequest(document=doc, actor=actor, reason=reason)
        )

    later = soon(3600)
    version = f"v-{rng.randrange(10**6)}"
    base = policy_to_dict(default_policy())
    base.update(version=version, effective_from=later.isoformat())

    def changed(path: list[Any], value: Any = None, *, remove: bool = False) -> str:
        doc = json.loads(json.dumps(base))
        node = doc
        for key in path[:-1]:
            node = node[key]
        if remove:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return json.dumps(doc, ensure_ascii=False)

    cases = [
        (changed(["categories", 3, "cap_fen"], -1), "document.categories[3].cap_fen"),
        (changed(["categories", 0, "grades", "1"], 10_001), "document.categories[0].grades[1]"),
        (changed(["refund_rule"], remove=True), "document.refund_rule"),
        (changed(["bonus"], 1), "document.bonus"),
        (changed(["claim_window", "closes"], "09:00"), "document.claim_window.closes"),
        (changed(["categories", 1, "code"], "refrigerator"), "document.categories[1].code"),
        (changed(["price_tolerance_bp"], 1.5), "document.price_tolerance_bp"),
        ("version: [unclosed", "document"),
        ("/etc/passwd.yaml", "document"),  # never read as a path on the server
    ]
    for doc, field in cases:
        await own.refused(draft(doc), INVALID, "INVALID_POLICY", field)

    await own.refused(
        draft(document(version, soon(-60))),
        INVALID,
        "EFFECTIVE_FROM_PASSED",
        "document.effective_from",
    )
    await own.refused(
        draft(document("shenzhen-2025.1", later)),
        grpc.StatusCode.ALREADY_EXISTS,
        "POLICY_VERSION_EXISTS",
        "document.version",
    )
    await own.refused(draft(""), INVALID, "MISSING_FIELD", "document")
    await own.refused(draft("#" * (256 * 1024 + 1)), INVALID, "FIELD_TOO_LONG", "document")
    await own.refused(
        draft(document(version, later), reason=""), INVALID, "MISSING_FIELD", "reason"
    )
    await own.refused(
        draft(
            document(version, later),
            actor=common_pb2.Actor(kind=common_pb2.Actor.KIND_PLATFORM, id="jd"),
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "ROLE_NOT_ALLOWED",
        "",
    )
    # The same version drafted twice: the second is refused and changes nothing.
    await draft(document(version, later))
    await own.refused(
        draft(document(version, later)),
        grpc.StatusCode.ALREADY_EXISTS,
        "POLICY_VERSION_EXISTS",
        "document.version",
    )


CHINESE_HEADER = "商品编码,商户编号,品类,能效等级,品牌,型号,能效标识编码,价格(元)\n"


async def test_ten_thousand_rows_import_in_one_go(own: OwnCatalog, rng: random.Random) -> None:
    m = f"m-{rng.randrange(10**12)}"
    await own.stub.ApplyMerchant(
        catalog_pb2.ApplyMerchantRequest(
            merchant_id=m,
            name="批量商户",
            licence_number="91440300MA5DC6QX4Y",
            contact_phone="13800000000",
        )
    )
    prefix = f"bulk{rng.randrange(10**6)}"
    rows = [
        f"{prefix}-{i},{m},{'电冰箱' if i % 2 else 'phone'},{'1级' if i % 2 else ''},"
        f"品牌{i % 7},型号-{i},CEL{i:08d},{1000 + i % 5000}.{i % 100:02d}\n"
        for i in range(10_000)
    ]
    data = (CHINESE_HEADER + "".join(rows)).encode()
    before = await own.events()
    loop = asyncio.get_running_loop()
    started = loop.time()
    progress = [
        p
        async for p in own.stub.ImportProducts(
            catalog_pb2.ImportProductsRequest(csv=data, actor=OPERATOR, reason="年度目录")
        )
    ]
    elapsed = loop.time() - started
    print(f"10,000-row import took {elapsed:.2f} s")  # measured in bench/, never asserted
    result = progress[-1].result
    assert (result.outcome, result.total_rows, result.applied, list(result.rejected)) == (
        "APPLIED_ALL",
        10_000,
        10_000,
        [],
    )
    applied = [p.done for p in progress if p.phase == "APPLY"]
    assert applied == sorted(applied) and applied[-1] == 10_000
    assert await own.events() == before + 10_001  # one per product, and the closing event
    odd = await own.stub.GetProduct(catalog_pb2.GetProductRequest(sku=f"{prefix}-9999"))
    assert (odd.category, odd.grade, odd.list_price_fen, odd.energy_label_code) == (
        "refrigerator",
        1,
        (1000 + 9999 % 5000) * 100 + 99,
        "CEL00009999",
    )
    even = await own.stub.GetProduct(catalog_pb2.GetProductRequest(sku=f"{prefix}-42"))
    assert (even.category, even.grade, even.list_price_fen) == ("phone", 0, 104_242)


# --------------------------------------------------------------------------------------------
# The operator's command line for switches, policies and the sales ledger (last: the policy it
# approves stays approved in this catalog)


async def test_cli_switches_policy_and_sales_ledger(
    own: OwnCatalog, infra: Infra, rng: random.Random, tmp_path: Path
) -> None:
    address = ("--catalog", f"127.0.0.1:{own.running.port}")
    op_li, ap_li, ap_wang = (
        identity_dir(infra.identities(who), tmp_path / who.principal)
        for who in (
            Caller(Role.OPERATOR, "op-li"),
            Caller(Role.APPROVER, "op-li"),  # the same person as the operator op-li
            Caller(Role.APPROVER, "ap-wang"),
        )
    )

    async def run(*args: str, identity: Path = op_li) -> tuple[int, dict[str, Any], str]:
        return await subsidyctl(*args, identity=identity)

    before = await own.events()
    code, answer, _ = await run(
        "pause", "--category", "microwave", "--reason", "质量事件", *address, identity=op_li
    )
    assert (code, answer) == (0, {"campaign_paused": False, "paused_categories": ["microwave"]})
    code, answer, _ = await run("pause", "--campaign", "--reason", "预案", *address)
    assert (code, answer) == (0, {"campaign_paused": True, "paused_categories": ["microwave"]})
    code, answer, _ = await run("resume", "--campaign", "--reason", "解除", *address)
    assert (code, answer["campaign_paused"]) == (0, False)
    code, answer, _ = await run("resume", "--category", "microwave", "--reason", "解除", *address)
    assert (code, answer) == (0, {"campaign_paused": False, "paused_categories": []})
    assert await own.events() == before + 4
    for wrong in (("--reason", "r"), ("--category", "tv", "--campaign", "--reason", "r")):
        code, answer, err = await run("pause", *wrong, *address)
        assert (code, answer) == (2, {})
        assert (
            err.strip()
            == "subsidyctl pause: error: give exactly one of --category CODE or --campaign"
        )
    code, answer, err = await run("pause", "--category", "nonsense", "--reason", "r", *address)
    assert code == 2 and len(err.splitlines()) == 1 and '"field": "category"' in err

    version = f"cli-{rng.randrange(10**6)}"
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(document(version, soon(3600)), encoding="utf-8")
    code, drafted, _ = await run(
        "policy", "draft", str(policy_file), "--reason", "新规", *address, identity=op_li
    )
    assert code == 0
    assert (drafted["version"], drafted["status"], drafted["drafted_by"]) == (
        version,
        "DRAFT",
        "op-li",
    )
    code, answer, err = await run(
        "policy", "approve", version, "--reason", "复核", *address, identity=ap_li
    )
    assert (code, answer) == (2, {}) and '"reason": "MAKER_CHECKER"' in err
    code, approved, _ = await run(
        "policy", "approve", version, "--reason", "复核", *address, identity=ap_wang
    )
    assert code == 0
    assert (approved["status"], approved["approved_by"], approved["in_force"]) == (
        "APPROVED",
        "ap-wang",
        False,
    )
    assert approved["effective_from"] == drafted["effective_from"]

    out = tmp_path / "台账.csv"
    code, answer, _ = await run("sales-ledger", "--out", str(out), *address)
    assert code == 0
    assert answer == {
        "file": str(out),
        "bytes": out.stat().st_size,
        "content_type": answer["content_type"],
    }
    assert answer["content_type"].startswith("text/csv") and out.read_bytes().startswith(
        b"\xef\xbb\xbf"
    )

    # --json: nothing but the answer, no progress or notes on stderr.
    bad = tmp_path / "bad.csv"
    bad.write_text(CHINESE_HEADER + "x-1,no-such-merchant,电冰箱,1级,品牌,型号,,100\n")
    code, answer, err = await run("import", str(bad), "--json", *address)
    assert (code, answer["outcome"], err) == (1, "APPLIED_NOTHING", "")
