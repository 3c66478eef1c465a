"""``subsidyctl risk``: rules, lists and decisions from the command line, maker-checker, with
certificates, against the running eligibility service."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.kernel.identity import Caller, Role
from subsidy.v1 import common_pb2, eligibility_pb2
from subsidyctl.demo import DEMO_REGION
from tests.e2e.cli import identity_dir, subsidyctl
from tests.e2e.conftest import Platform, eventually, status_of
from tests.e2e.test_risk import Risk, active_copy, within


async def test_rules_lists_and_decisions_through_the_cli(
    platform: Platform, rng: random.Random, tmp_path: Path
) -> None:
    p = platform
    at = ("--eligibility", f"127.0.0.1:{p.running['eligibility'].port}")
    operator, same_person, approver, auditor = (
        identity_dir(p.infra.identities(who), tmp_path / who.principal)
        for who in (
            Caller(Role.OPERATOR, "cli-li"),
            Caller(Role.APPROVER, "cli-li"),
            Caller(Role.APPROVER, "cli-wang"),
            Caller(Role.AUDITOR, "cli-zhao"),
        )
    )
    code, before, _ = await subsidyctl("risk", "rules", *at, identity=auditor)
    assert code == 0 and before["version"] >= 0

    # A rule-set document as operators write it; an unknown kind is refused by the service.
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - {rule_id: r1, kind: geofence, action: claim, window_s: 60}\n")
    code, answer, err = await subsidyctl(
        "risk", "rules", "propose", str(bad), "--reason", "try", *at, identity=operator
    )
    assert (code, answer) == (2, {}) and '"reason": "UNKNOWN_RULE_KIND"' in err
    doc = tmp_path / "rules.yaml"
    doc.write_text(
        "rules:\n"
        "  - rule_id: device-claims-cli\n"
        "    kind: velocity\n"
        "    action: claim\n"
        "    subject: device\n"
        "    window_s: 3600\n"
        "    max_count: 50\n"
        "    verdict: block\n"
    )
    code, proposed, _ = await subsidyctl(
        "risk", "rules", "propose", str(doc), "--reason", "hoarding", *at, identity=operator
    )
    assert code == 0 and (proposed["status"], proposed["proposed_by"]) == ("PROPOSED", "cli-li")
    change = proposed["change_id"]
    code, answer, err = await subsidyctl(
        "risk", "approve", change, "--reason", "ok", *at, identity=same_person
    )
    assert (code, answer) == (2, {}) and '"reason": "MAKER_CHECKER"' in err
    code, approved, _ = await subsidyctl(
        "risk", "approve", change, "--reason", "ok", *at, identity=approver
    )
    assert code == 0 and approved["activated_version"] == before["version"] + 1
    code, shown, _ = await subsidyctl("risk", "rules", *at, identity=auditor)
    assert (shown["version"], [r["rule_id"] for r in shown["rules"]]) == (
        before["version"] + 1,
        ["device-claims-cli"],
    )

    # A device on the block list: proposed, approved, listed masked, enforced, lifted.
    banned = f"dev-cli-{rng.randrange(16**10):010x}"
    code, added, _ = await subsidyctl(
        "risk", "lists", "add", "device", banned, "--days", "1", "--reason", "reseller",
        *at, identity=operator,
    )  # fmt: skip
    assert code == 0 and added["entry"]["subject_masked"] == f"{banned[:2]}***{banned[-2:]}"
    assert banned not in json.dumps(added)
    code, approved, _ = await subsidyctl(
        "risk", "approve", added["change_id"], "--reason", "ok", *at, identity=approver
    )
    assert code == 0
    await within(
        1.0, lambda: active_copy(p, "eligibility").lists.version >= approved["activated_version"]
    )
    code, listed, _ = await subsidyctl(
        "risk", "lists", "--list", "block", "--kind", "device", *at, identity=auditor
    )
    assert added["entry"]["entry_id"] in {e["entry_id"] for e in listed["entries"]}
    _, consumer = await p.person(rng)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await p.eligibility.ClaimQualification(
            eligibility_pb2.ClaimQualificationRequest(
                consumer_id=consumer,
                category="refrigerator",
                channel="jd",
                circumstances=common_pb2.Circumstances(device_id=banned, region_code=DEMO_REGION),
            )
        )
    assert status_of(refused.value)[1] == "RISK_BLOCKED"

    async def decision() -> dict[str, Any]:
        code, found, _ = await subsidyctl(
            "risk", "decisions", "--outcome", "block", "--status", "OPEN", *at, identity=auditor
        )
        mine = [d for d in found["decisions"] if d["consumer_id"] == consumer]
        assert code == 0 and len(mine) == 1
        found_one: dict[str, Any] = mine[0]
        return found_one

    blocked = await eventually(decision)
    code, answer, err = await subsidyctl(
        "risk", "lift", str(blocked["decision_id"]), "--reason", "x", *at, identity=auditor
    )
    assert (code, answer) == (2, {}) and '"reason": "ROLE_NOT_ALLOWED"' in err
    code, lifted, _ = await subsidyctl(
        "risk", "lift", str(blocked["decision_id"]), "--reason", "seller's demo phone",
        *at, identity=operator,
    )  # fmt: skip
    assert code == 0 and (lifted["status"], lifted["lifted_by"]) == ("LIFTED", "cli-li")
    code, listed, _ = await subsidyctl("risk", "lists", "--list", "block", *at, identity=auditor)
    assert added["entry"]["entry_id"] not in {e["entry_id"] for e in listed["entries"]}

    # Put the rule set back as it was.
    risk = Risk(p)
    try:
        await risk.activate(before["rules"], reason="put back after the CLI test")
    finally:
        await risk.close()
