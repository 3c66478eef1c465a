"""``subsidyctl budget``: funding a pool from the command line, maker-checker, with certificates."""

from __future__ import annotations

import random
from pathlib import Path

from services.kernel.identity import Caller, Role
from tests.e2e.cli import identity_dir, subsidyctl
from tests.e2e.conftest import Platform


async def test_propose_then_approve_by_another_person_funds_the_pool(
    platform: Platform, rng: random.Random, tmp_path: Path
) -> None:
    p = platform
    ledger = ("--ledger", f"127.0.0.1:{p.running['ledger'].port}")
    operator, same_person, approver = (
        identity_dir(p.infra.identities(who), tmp_path / who.principal)
        for who in (
            Caller(Role.OPERATOR, "li"),
            Caller(Role.APPROVER, "li"),
            Caller(Role.APPROVER, "wang"),
        )
    )
    pool = f"cli-pool-{rng.randrange(10**9)}"
    code, proposal, _ = await subsidyctl(
        "budget", "propose", pool, "--amount-fen", "500000", "--reason", "Q1", *ledger,
        identity=operator,
    )  # fmt: skip
    assert code == 0
    assert (proposal["status"], proposal["proposed_by"], proposal["pool_funded_fen"]) == (
        "PROPOSED",
        "li",
        0,
    )
    pid = proposal["proposal_id"]
    code, answer, err = await subsidyctl(
        "budget", "approve", pid, "--reason", "ok", *ledger, identity=same_person
    )
    assert (code, answer) == (2, {}) and '"reason": "MAKER_CHECKER"' in err
    code, answer, err = await subsidyctl(
        "budget", "approve", pid, "--reason", "ok", *ledger, identity=operator
    )
    assert (code, answer) == (2, {}) and '"reason": "ROLE_NOT_ALLOWED"' in err
    code, approved, _ = await subsidyctl(
        "budget", "approve", pid, "--reason", "ok", *ledger, identity=approver
    )
    assert code == 0
    assert (approved["status"], approved["approved_by"], approved["pool_funded_fen"]) == (
        "APPROVED",
        "wang",
        500_000,
    )
    code, status, _ = await subsidyctl("budget", "status", pool, *ledger, identity=operator)
    assert (code, status["funded_fen"], status["available_fen"]) == (0, 500_000, 500_000)
