"""``subsidyctl backup`` and ``restore`` on the real, separate-process stack: a backup after some
checkouts, a refund and an erasure, a second erasure after it, PostgreSQL and NATS wiped, a
restore into the empty databases (the second erasure brought back by the erasure register), the
stack started on the restored data and still working; a corrupted archive and a non-empty
target refused before anything changes; a read model that differs from its replay reported; and
a restore against a running ``subsidyctl up`` that stops and restarts its services itself."""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from services.eligibility.projections import consumer_stream
from services.kernel import bus
from subsidy.v1 import eligibility_pb2, ledger_pb2
from subsidy.v1 import events_pb2 as ev
from subsidyctl import demo
from subsidyctl.backup import migration_databases
from subsidyctl.localstack import SERVICES, LocalStack, Ports, free_base, wait_until_audited
from subsidyctl.replay_check import check_read_models
from subsidyctl.stack.openbao import OpenBao
from subsidyctl.stack.postgres import Postgres, migration_user, sqlalchemy_url

POOL, SKU, PRICE = "pingshan-2025", "demo-fridge-g1", 1_200_000


def cli(
    stack: LocalStack,
    *args: str,
    json_only: bool = True,
    deployed: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``subsidyctl`` as an operator runs it against this stack (its run folder and ports), or
    with ``deployed`` as the chart's CronJob runs it (those variables, no run folder); without
    ``json_only`` it also writes its progress lines on stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUBSIDY_")}
    if deployed is None:
        env |= {"SUBSIDY_RUN_DIR": str(stack.run_dir), "SUBSIDY_BASE_PORT": str(stack.ports.base)}
    else:  # nothing of the local stack to fall back on: a run folder with nothing in it
        nowhere = stack.run_dir.parent / "nowhere"
        nowhere.mkdir(exist_ok=True)
        env |= {"SUBSIDY_RUN_DIR": str(nowhere), "SUBSIDY_BASE_PORT": "1"} | deployed
    return subprocess.run(
        [sys.executable, "-m", "subsidyctl", *args, *(["--json"] if json_only else [])],
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
        refunded = done[-1]["order_id"] if seed else ""
        if seed:  # crypto-shred the first buyer and refund the last order before the backup
            await client.eligibility.EraseConsumer(
                eligibility_pb2.EraseConsumerRequest(consumer_id=erased, reason="withdrew consent")
            )
            back = await client.ledger.ReleaseSubsidy(
                ledger_pb2.ReleaseSubsidyRequest(order_id=refunded, reason="REFUNDED")
            )
            assert back.status == "RELEASED"
        size = await wait_until_audited(stack, client)
        budget = await client.ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=POOL))
        return {
            "available": budget.available_fen,
            "audit_size": size,
            "erased": erased,
            "refunded": refunded,
            "buyers": [d["consumer_id"] for d in done],
        }
    finally:
        await client.close()


async def _order(stack: LocalStack, order_id: str) -> ledger_pb2.Reservation:
    client = demo.Client(stack.endpoints())
    try:
        return await client.ledger.GetReservation(
            ledger_pb2.GetReservationRequest(order_id=order_id)
        )
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


def _deployment(stack: LocalStack) -> dict[str, str]:
    """The variables the chart's backup CronJob sets (the services' names for them), pointing
    at this stack's PostgreSQL and OpenBao."""
    env = {
        "SUBSIDY_VAULT_ADDR": f"http://127.0.0.1:{stack.ports.bao}",
        "SUBSIDY_VAULT_TOKEN_FILE": str(stack.token_file),
        "SUBSIDY_VAULT_TRANSIT_MOUNT": "transit",
    }
    for service in SERVICES:
        prefix = f"SUBSIDY_{service.upper()}_MIGRATION_DATABASE"
        env[f"{prefix}_URL"] = sqlalchemy_url(
            migration_user(service), None, stack.ports.postgres, service
        )
        env[f"{prefix}_PASSWORD_FILE"] = str(
            stack.run_dir / "secrets" / f"{service}-db-migration-password"
        )
    return env


def _count(stack: LocalStack, query: str, *args: str) -> int:
    assert stack.pg is not None
    with psycopg.connect(stack.pg.conninfo("eligibility")) as db:
        row = db.execute(query, args).fetchone()
    assert row is not None
    return int(row[0])


def _keys(stack: LocalStack, consumer: str) -> int:
    return _count(stack, "SELECT count(*) FROM person_keys WHERE consumer_id = %s", consumer)


def _erasure_events(stack: LocalStack, consumer: str) -> int:
    """``ConsumerErased`` events of ``consumer`` in eligibility's store."""
    erasures = _count(
        stack,
        "SELECT count(*) FROM events WHERE event_type = %s AND stream_id = %s",
        ev.ConsumerErased.DESCRIPTOR.full_name,
        consumer_stream(consumer),
    )
    read_model = _count(
        stack, "SELECT count(*) FROM consumer_erasures WHERE consumer_id = %s", consumer
    )
    assert read_model == erasures, (read_model, erasures)  # events and read models agree
    return erasures


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

        # The chart's CronJob, twice: dated archives from the deployment's variables with the
        # stored checkpoint, the older pruned by --keep 1.
        nightly = tmp_path / "nightly"
        for _ in range(2):
            time.sleep(1.1)  # archives are dated to the second
            scheduled = cli(
                stack,
                *("backup", "--out", str(nightly), "--dated", "--keep", "1"),
                "--stored-checkpoint",
                deployed=_deployment(stack),
            )
            assert scheduled.returncode == 0, scheduled.stderr
        made = json.loads(scheduled.stdout)
        assert len(made["pruned"]) == 1 and made["pruned"][0] not in made["out"]
        assert [p.name for p in nightly.iterdir()] == [Path(made["out"]).name]
        assert sorted(made["files"]) == files[:-1]
        assert made["tree_size"] > 0

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
    # No --erased: the erasure after the backup comes back from the erasure register. Restored
    # as in a deployment: from the services' variables, no run folder.
    done, restored_keys = _restore_without_services(
        stack,
        tmp_path / "bk",
        consumer=later,
        provision=True,
        then=_a_changed_read_model,
        deployed=_deployment(stack),
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["ok"] is True
    assert answer["root_matches_checkpoint"] is True and answer["signature_ok"] is True
    assert answer["read_models_match_replay"] is True
    assert answer["read_model_events_replayed"] > 0
    assert answer["erasures_registered"] == 2  # both erasures, the one before and after
    assert answer["services_restarted"] is False  # none were running
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
        # Both erasures are recorded: the one in the backup, and the one after it, which
        # eligibility re-applied from the register through its own pipeline at start.
        assert _erasure_events(stack, before["erased"]) == 1
        assert _erasure_events(stack, later) == 1
        refunded = asyncio.run(_order(stack, before["refunded"]))
        assert refunded.status == "RELEASED" and refunded.release_reason == "REFUNDED"
        after = asyncio.run(_checkouts(stack, 1, seed=False))
        assert after["available"] == before["available"] - 200_000
        assert after["audit_size"] > before["audit_size"]
        verified = cli(stack, "audit", "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert json.loads(verified.stdout)["ok"] is True
    finally:
        stack.stop()

    # Against a running `subsidyctl up`: --force replaces its (non-empty) databases; the
    # restore stops the services once the archive passed its checks and starts them again.
    up = _up(run, ports)
    try:
        forced = cli(
            stack, "restore", str(tmp_path / "bk"), "--force", "--erased", later, json_only=False
        )
        assert forced.returncode == 0, forced.stderr
        again = json.loads(forced.stdout)
        assert again["ok"] is True and again["root_hex"] == answer["root_hex"]
        assert again["entries"] == answer["entries"]  # the backup's log, not the longer live one
        assert again["services_restarted"] is True
        assert again["read_models_match_replay"] is True
        # and it ran `audit verify` on the restarted stack itself
        assert again["audit_verify"]["ok"] is True, again["audit_verify"]
        assert again["audit_verify"]["cross_check_ok"] is True
        for phase in ("quiesce: 1/1", "restore: 4/4", "replay: 1/1", "restart: 1/1"):
            assert phase in forced.stderr, forced.stderr  # progress shown
        assert (run / "stack.state").read_text().strip() == "serving"
        assert up.poll() is None  # `up` kept running through it
        budget = asyncio.run(_available(stack))
        assert budget == before["available"]  # the archive's figures, served again
        verified = cli(stack, "audit", "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert json.loads(verified.stdout)["ok"] is True
        # The events stream was reset: it carries the restored history republished, not the
        # abandoned one (the checkout made after the first restore is in no store now).
        assert asyncio.run(_stream_messages(stack)) <= _stored_events(stack)
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)


async def _stream_messages(stack: LocalStack) -> int:
    assert stack.nats is not None
    nc, js = await bus.connect(stack.nats.url, "test", stack.nats.operator)
    try:
        return int((await js.stream_info(bus.EVENTS_STREAM)).state.messages)
    finally:
        await nc.close()


def _stored_events(stack: LocalStack) -> int:
    assert stack.pg is not None
    total = 0
    for service in SERVICES:
        with psycopg.connect(stack.pg.conninfo(service)) as db:
            row = db.execute("SELECT count(*) FROM events").fetchone()
        assert row is not None
        total += int(row[0])
    return total


def _up(run: Path, ports: Ports) -> subprocess.Popen[bytes]:
    """``subsidyctl up`` on the run folder, as an operator starts it; returns once serving."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUBSIDY_")}
    args = ["--run-dir", str(run), "--base-port", str(ports.base), "--json"]
    with (run / "logs" / "up.log").open("ab") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "subsidyctl", "up", *args], env=env, stdout=log, stderr=log
        )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        state = run / "stack.state"
        if state.exists() and state.read_text().strip() == "serving":
            return up
        if up.poll() is not None:
            break
        time.sleep(0.5)
    up.kill()
    up.wait(30)
    raise AssertionError((run / "logs" / "up.log").read_text()[-3000:])


async def _available(stack: LocalStack) -> int:
    client = demo.Client(stack.endpoints())
    try:
        budget = await client.ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=POOL))
        return int(budget.available_fen)
    finally:
        await client.close()


def _a_changed_read_model(stack: LocalStack) -> None:
    """A restored read model that is not what its events give is reported, naming the table;
    put back, it matches again (the check can fail, and fails only for the change)."""
    secrets = stack.run_dir / "secrets"
    databases = migration_databases(
        "127.0.0.1",
        stack.ports.postgres,
        {n: (secrets / f"{n}-db-migration-password").read_text().strip() for n in SERVICES},
    )
    assert stack.pg is not None
    with psycopg.connect(stack.pg.conninfo("eligibility"), autocommit=True) as db:
        db.execute("UPDATE quota_usage SET issued = issued + 1")
        try:
            problems, _ = asyncio.run(check_read_models(databases))
        finally:
            db.execute("UPDATE quota_usage SET issued = issued - 1")
    assert [(p.check, p.message.split(":")[0]) for p in problems] == [
        ("read_models", "eligibility.quota_usage")
    ]
    assert "1 rows only restored, 1 only replayed" in problems[0].message
    problems, applied = asyncio.run(check_read_models(databases))
    assert problems == [] and applied > 0


def _restore_without_services(
    stack: LocalStack,
    archive: Path,
    *args: str,
    consumer: str,
    provision: bool = False,
    then: Callable[[LocalStack], None] | None = None,
    deployed: dict[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess[str], int]:
    """``restore`` with only PostgreSQL and OpenBao running (Vault unwraps the archive's key);
    returns its outcome and how many keys ``consumer`` has afterwards; ``then`` runs after
    it, PostgreSQL still up."""
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
            done = cli(stack, "restore", str(archive), *args, deployed=deployed)
            if then is not None and done.returncode == 0:
                then(stack)
            return done, _keys(stack, consumer)
        finally:
            bao.stop()
    finally:
        stack.pg.stop()
