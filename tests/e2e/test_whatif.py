"""``subsidyctl policy whatif`` on the real stack: the history of a pool's orders, read from the
audit log, replayed under the policy in force (nothing differs) and under a draft with a lower
cap (the saving, to the fen); it reads events only and changes nothing."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from services.kernel.identity import Caller, Role
from subsidy.v1 import audit_pb2, catalog_pb2, ledger_pb2
from tests.e2e.cli import identity_dir, subsidyctl
from tests.e2e.conftest import DEMO_POLICY_VERSION, Platform
from tests.e2e.test_funding_sources import PHONE_PRICE, checkout

SUBSIDY = 45_000  # 15 % of PHONE_PRICE under the session's policy
LOWER_CAP = 30_000


async def draft_lower_phone_cap(p: Platform, rng: random.Random) -> str:
    """A draft (never approved) of the session's policy with the phone's cap lowered."""
    current = await p.catalog.GetPolicy(catalog_pb2.GetPolicyRequest(version=DEMO_POLICY_VERSION))
    document = json.loads(current.policy_json)
    document["version"] = f"whatif-{rng.randrange(10**9)}"
    document["effective_from"] = "2095-01-01T00:00:00+08:00"
    for category in document["categories"]:
        if category["code"] == "phone":
            category["cap_fen"] = LOWER_CAP
    drafted = await p.catalog.DraftPolicy(
        catalog_pb2.DraftPolicyRequest(document=json.dumps(document), reason="what-if")
    )
    assert drafted.status == "DRAFT"
    return str(drafted.version)


async def test_whatif_reproduces_history_and_shows_a_lower_caps_saving(
    platform: Platform, rng: random.Random, tmp_path: Path
) -> None:
    p = platform
    pool = await p.pool(rng, 1_000_000)
    phone = await p.product(rng, "phone", 0, PHONE_PRICE)
    paid, refunded, cancelled = [
        (await checkout(p, pool, phone, "phone", PHONE_PRICE))[0] for _ in range(3)
    ]
    for order in (paid, refunded):
        await p.ledger.CaptureSubsidy(
            ledger_pb2.CaptureSubsidyRequest(
                order_id=order, payment_ref=f"pay-{order}", paid_amount_fen=PHONE_PRICE - SUBSIDY
            )
        )
    await p.ledger.ReleaseSubsidy(
        ledger_pb2.ReleaseSubsidyRequest(order_id=refunded, reason="REFUNDED")
    )
    await p.ledger.ReleaseSubsidy(
        ledger_pb2.ReleaseSubsidyRequest(order_id=cancelled, reason="CANCELLED")
    )
    draft = await draft_lower_phone_cap(p, rng)
    await p.quiesce()
    size = (await p.audit.GetLogInfo(audit_pb2.GetLogInfoRequest())).size
    before = await p.ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=pool))

    operator = identity_dir(p.infra.identities(Caller(Role.OPERATOR, "li")), tmp_path / "li")
    args = ("--pool", pool, "--audit", f"127.0.0.1:{p.running['audit'].port}", "--json")
    code, same, err = await subsidyctl(
        "policy", "whatif", "--draft", DEMO_POLICY_VERSION, *args, identity=operator
    )
    assert code == 0, err
    assert (same["orders"], same["actual_subsidy_fen"], same["difference_fen"]) == (3, SUBSIDY, 0)
    assert (same["refused_by_draft"], same["orders_changed"], same["changed_orders"]) == (0, 0, [])
    assert all(
        row["draft_available_fen"] == row["actual_available_fen"] for row in same["burn_down"]
    )

    code, lower, err = await subsidyctl(
        "policy", "whatif", "--draft", draft, *args, "--out", str(tmp_path / "out"),
        identity=operator,
    )  # fmt: skip
    assert code == 0, err
    assert (lower["actual_subsidy_fen"], lower["draft_subsidy_fen"]) == (SUBSIDY, LOWER_CAP)
    assert lower["difference_fen"] == LOWER_CAP - SUBSIDY
    assert [(o["order_id"], o["draft_subsidy_fen"]) for o in lower["changed_orders"]] == [
        (paid, LOWER_CAP)
    ]  # the refunded and the cancelled order cost nothing either way
    end = lower["burn_down"][-1]
    assert end["actual_available_fen"] - end["draft_available_fen"] == LOWER_CAP - SUBSIDY
    written = (tmp_path / "out" / "whatif-days.csv").read_text(encoding="utf-8")
    days = list(csv.DictReader(written.splitlines()))  # two if the orders straddled midnight
    assert {d["category"] for d in days} == {"phone"}
    assert sum(int(d["difference_fen"]) for d in days) == LOWER_CAP - SUBSIDY

    code, _, err = await subsidyctl(
        "policy", "whatif", "--draft", "no-such", *args, identity=operator
    )
    assert code == 2 and "no policy version 'no-such'" in err
    # It read the log and wrote nothing anywhere.
    assert (await p.audit.GetLogInfo(audit_pb2.GetLogInfoRequest())).size == size
    assert await p.ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=pool)) == before
