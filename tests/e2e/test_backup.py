"""``subsidyctl backup`` and ``restore`` on the real, separate-process stack: a backup after some
checkouts and an erasure, PostgreSQL and NATS wiped, a restore into the empty databases, the
stack started on the restored data and still working; a corrupted archive and a non-empty
target refused before anything changes."""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from subsidy.v1 import eligibility_pb2, ledger_pb2
from subsidyctl import demo
from subsidyctl.localstack import LocalStack, Ports, free_base, wait_until_audited
from subsidyctl.stack.openbao import OpenBao
from subsidyctl.stack.postgres import Postgres

POOL, SKU, PRICE = "pingshan-2025", "demo-fridge-g1", 1_200_000


def cli(stack: LocalStack, *args: str) -> subprocess.CompletedProcess[str]:
    """``subsidyctl`` as an operator runs it against this stack (its run folder and ports)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUBSIDY_")}
    env |= {"SUBSIDY_RUN_DIR": str(stack.run_dir), "SUBSIDY_BASE_PORT": str(stack.ports.base)}
    return subprocess.run(
        [sys.executable, "-m", "subsidyctl", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


async def _checkouts(stack: LocalStack, n: int, *, seed: bool) -> dict[str, Any]:
    client = demo.Client(stack.endpoints())
    rng = random.Random(7)
    try:
        if seed:
            await demo.seed(client, rng, {**demo.load_demo(), "consumers": 1})
        done = [
            await demo.checkout(client, rng, pool_id=POOL, sku=SKU, price_fen=PRICE)
            for _ in range(n)
        ]
        erased = done[0]["consumer_id"] if seed else ""
        if seed:  # crypto-shred the first buyer before the backup
            await client.eligibility.EraseConsumer(
                eligibility_pb2.EraseConsumerRequest(consumer_id=erased, reason="withdrew consent")
            )
        size = await wait_until_audited(stack, client)
        budget = await client.ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=POOL))
        return {
            "available": budget.available_fen,
            "audit_size": size,
            "erased": erased,
            "buyers": [d["consumer_id"] for d in done],
        }
    finally:
        await client.close()


async def _erase(stack: LocalStack, consumer: str) -> None:
    client = demo.Client(stack.endpoints())
    try:
        await client.eligibility.EraseConsumer(
            eligibility_pb2.EraseConsumerRequest(consumer_id=consumer, reason="withdrew consent")
        )
    finally:
        await client.close()


def _keys(stack: LocalStack, consumer: str) -> int:
    assert stack.pg is not None
    with psycopg.connect(stack.pg.conninfo("eligibility")) as db:
        row = db.execute(
            "SELECT count(*) FROM person_keys WHERE consumer_id = %s", (consumer,)
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.slow
def test_backup_wipe_restore_verify_and_the_stack_runs_on(tmp_path: Path) -> None:
    ports, quiet = Ports(free_base()), io.StringIO()
    run = tmp_path / "run"
    stack = LocalStack(run, ports, durable=False, log=quiet)
    stack.start()
    try:
        before = asyncio.run(_checkouts(stack, 3, seed=True))
        assert _keys(stack, before["erased"]) == 0
        done = cli(stack, "backup", "--out", str(tmp_path / "bk"))
        assert done.returncode == 0, done.stderr
        files = sorted(p.name for p in (tmp_path / "bk").iterdir())
        assert files == [
            "audit.dump.enc",
            "catalog.dump.enc",
            "eligibility.dump.enc",
            "ledger.dump.enc",
            "manifest.json",
        ]
        # Encrypted: no table name, no event type in clear in any dump.
        for name in files[:-1]:
            assert b"person_keys" not in (tmp_path / "bk" / name).read_bytes()
            assert b"audit_entries" not in (tmp_path / "bk" / name).read_bytes()

        # An erasure after the backup: the archive still holds this buyer's key.
        later = before["buyers"][1]
        asyncio.run(_erase(stack, later))
        assert _keys(stack, later) == 0

        # A corrupted archive is refused naming the file, before the (non-empty) targets are
        # even looked at; a sound archive is refused because the target is not empty.
        bad = tmp_path / "bad"
        shutil.copytree(tmp_path / "bk", bad)
        dump = bytearray((bad / "ledger.dump.enc").read_bytes())
        dump[len(dump) // 2] ^= 0x01
        (bad / "ledger.dump.enc").write_bytes(bytes(dump))
        refused = cli(stack, "restore", str(bad))
        assert refused.returncode == 2
        assert f"{bad / 'ledger.dump.enc'}: its SHA-256 is not the manifest's" in refused.stderr
        refused = cli(stack, "restore", str(tmp_path / "bk"))
        assert refused.returncode == 2
        assert "database catalog is not empty" in refused.stderr
        assert "--force" in refused.stderr
    finally:
        stack.stop()

    # The disaster: PostgreSQL's and NATS's data gone (Vault has its own backups, kept).
    shutil.rmtree(run / "data" / "postgres")
    shutil.rmtree(run / "data" / "nats")
    (run / "LOCAL-ONLY-postgres-password").unlink()
    stack = LocalStack(run, ports, durable=False, log=quiet)
    done, restored_keys = _restore_without_services(
        stack, tmp_path / "bk", "--erased", later, provision=True
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["ok"] is True
    assert answer["root_matches_checkpoint"] is True and answer["signature_ok"] is True
    assert answer["tree_size"] >= before["audit_size"]
    assert answer["entries"] >= answer["tree_size"]
    # Every restored store's events are in the restored log, or still to be republished.
    by_service = answer["store_events_by_service"]
    assert all(by_service.get(s, 0) > 0 for s in ("catalog", "eligibility", "ledger")), by_service
    # The erasure before the backup had no key in it; the one after it is re-applied.
    assert answer["keys_shredded"] == 1
    assert restored_keys == 0

    # The stack starts on the restored data: the budget is what it was, the erased buyer's
    # key is still gone, a new checkout works and is audited, and audit verify passes.
    stack = LocalStack(run, ports, durable=False, log=quiet)
    stack.start()
    try:
        assert _keys(stack, before["erased"]) == 0
        assert _keys(stack, later) == 0
        after = asyncio.run(_checkouts(stack, 1, seed=False))
        assert after["available"] == before["available"] - 200_000
        assert after["audit_size"] > before["audit_size"]
        verified = cli(stack, "audit", "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert json.loads(verified.stdout)["ok"] is True
    finally:
        stack.stop()

    # --force replaces databases that are not empty (the services stopped).
    stack = LocalStack(run, ports, durable=False, log=quiet)
    forced, _ = _restore_without_services(stack, tmp_path / "bk", "--force", "--erased", later)
    assert forced.returncode == 0, forced.stderr
    again = json.loads(forced.stdout)
    assert again["ok"] is True and again["root_hex"] == answer["root_hex"]
    assert again["entries"] == answer["entries"]  # the backup's log, not the longer live one


def _restore_without_services(
    stack: LocalStack, archive: Path, *args: str, provision: bool = False
) -> tuple[subprocess.CompletedProcess[str], int]:
    """``restore`` with only PostgreSQL and OpenBao running (Vault unwraps the archive's key);
    returns its outcome and how many keys the last ``--erased`` consumer has afterwards."""
    run = stack.run_dir
    stack.pg = Postgres(
        data_dir=run / "data" / "postgres",
        port=stack.ports.postgres,
        log_dir=stack.logs,
        durable=False,
        password_file=run / "LOCAL-ONLY-postgres-password",
    )
    stack.pg.start()
    try:
        if provision:  # empty databases and their roles, as at a first start
            stack.provision_databases()
        bao = OpenBao(
            data_dir=run / "data" / "openbao", port=stack.ports.bao, log_dir=stack.logs, dev=False
        )
        bao.start()
        try:
            done = cli(stack, "restore", str(archive), *args)
            return done, _keys(stack, args[-1])
        finally:
            bao.stop()
    finally:
        stack.pg.stop()
