"""Dead letters handled, not only parked, on the real platform: a cause of its own (catalog's
runtime role lost its privilege on the sales table, as a broken migration would leave it) makes
catalog's consumer dead-letter a paid order's ledger events; once the grant is back, ``subsidyctl
dlq replay`` hands them over and each is handled exactly once, recorded as the operator's event;
replaying again changes nothing. Operators only.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

from psycopg import sql
from sqlalchemy import text
from sqlalchemy.engine import make_url

from services.kernel.events import Envelope
from services.kernel.identity import Caller, Role
from subsidy.v1 import events_pb2 as ev
from tests.e2e.cli import identity_dir
from tests.e2e.conftest import Platform, eventually
from tests.e2e.test_audit_tamper import checkout, database

CONSUMER = "catalog-sales"
REPLAYED = ev.DeadLetterReplayed.DESCRIPTOR.full_name


async def dlq(*args: str, identity: Path) -> tuple[int, list[dict[str, Any]], str]:
    """``subsidyctl dlq ...`` in its own process: exit code, its JSON lines, stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUBSIDY_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "subsidyctl",
        "dlq",
        *args,
        "--identity",
        str(identity),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, [json.loads(line) for line in out.splitlines()], err.decode()


async def handled_count(p: Platform, event_ids: set[str]) -> int:
    async with p.running["catalog"].runtime.store.engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT event_id FROM handled_events WHERE consumer = :c"), {"c": CONSUMER}
        )
        return sum(1 for (e,) in rows if e in event_ids)


async def replay_events(p: Platform) -> list[ev.DeadLetterReplayed]:
    async with p.running["catalog"].runtime.store.engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT envelope FROM events WHERE event_type = :t"), {"t": REPLAYED}
        )
        return [ev.DeadLetterReplayed.FromString(Envelope.FromString(r[0]).payload) for r in rows]


async def test_a_dead_letter_is_replayed_after_the_fix_once_and_recorded(
    platform: Platform, tmp_path: Path
) -> None:
    p = platform
    rng = random.Random(1515)
    catalog = ("--service", "catalog", "--address", f"127.0.0.1:{p.running['catalog'].port}")
    operator = identity_dir(p.infra.identities(Caller(Role.OPERATOR, "ops-dlq")), tmp_path / "op")
    platform_id = identity_dir(p.infra.identities(Caller(Role.PLATFORM, "jd")), tmp_path / "jd")
    runtime = make_url(p.running["catalog"].runtime.settings.database_url).username
    assert runtime
    grant = sql.Identifier(runtime)
    code, before, err = await dlq("list", *catalog, identity=operator)
    assert code == 0, err
    known = {d["sequence"] for d in before}

    # The cause: catalog's runtime role may no longer write its sales table.
    async with database(p, "catalog") as db:
        await db.execute(sql.SQL("REVOKE INSERT, UPDATE ON sales_orders FROM {}").format(grant))
    try:
        order = await checkout(p, rng)

        async def parked() -> list[dict[str, Any]]:
            code, letters, err = await dlq(
                "list", *catalog, "--consumer", CONSUMER, identity=operator
            )
            assert code == 0, err
            new = [d for d in letters if d["sequence"] not in known]
            assert {d["event_type"].rsplit(".", 1)[-1] for d in new} >= {
                "SubsidyReserved",
                "SubsidyCaptured",
            }
            return new

        letters = await eventually(parked, within=60)
    finally:
        async with database(p, "catalog") as db:  # the fix
            await db.execute(sql.SQL("GRANT INSERT, UPDATE ON sales_orders TO {}").format(grant))
    ids = {d["event_id"] for d in letters}
    assert all(d["consumer"] == CONSUMER and d["reason"] == "ProgrammingError" for d in letters)
    assert all(not d["handled"] and d["dead_lettered_at"] for d in letters)
    assert await handled_count(p, ids) == 0

    # show: the envelope's metadata, no payload.
    code, [shown], err = await dlq("show", str(letters[0]["sequence"]), *catalog, identity=operator)
    assert code == 0, err
    assert shown["service"] == "catalog" and shown["producer"] == "ledger"
    assert shown["event_id"] == letters[0]["event_id"] and "payload" not in shown
    # Metadata only: ids, types, times, the reason; the order is found by its correlation id.
    assert set(shown) == {
        "service", "sequence", "event_id", "event_type", "consumer", "reason",
        "dead_lettered_at", "handled", "original_subject", "stream_id", "stream_version",
        "producer", "occurred_at", "correlation_id", "causation_id",
    }  # fmt: skip
    assert shown["correlation_id"] == order

    # Not an operator: refused, nothing replayed.
    code, _, err = await dlq("replay", "--all", *catalog, "--reason", "x", identity=platform_id)
    assert code == 2 and "PERMISSION_DENIED" in err
    assert await handled_count(p, ids) == 0

    # Replay after the fix: each handled once, each recorded with the operator and the reason.
    code, outcomes, err = await dlq(
        "replay", "--all", *catalog, "--consumer", CONSUMER, "--reason", "grant restored",
        identity=operator,
    )  # fmt: skip
    assert code == 0, err
    mine = [o for o in outcomes if o["event_id"] in ids]
    assert sorted(o["event_id"] for o in mine) == sorted(ids)
    assert {o["outcome"] for o in mine} == {"handled"}
    assert await handled_count(p, ids) == len(ids)
    recorded = [r for r in await replay_events(p) if r.event_id in ids]
    assert sorted(r.event_id for r in recorded) == sorted(ids)
    assert {r.reason for r in recorded} == {"grant restored"}
    async with p.running["catalog"].runtime.store.engine.connect() as conn:
        status = await conn.scalar(
            text("SELECT status FROM sales_orders WHERE order_id = :o"), {"o": order}
        )
    assert status == "CAPTURED"
    await p.quiesce()  # every consumer has handled every stored event, the replays included

    # Twice: nothing changes.
    code, again, err = await dlq(
        "replay", str(letters[0]["sequence"]), *catalog, "--reason", "again", identity=operator
    )
    assert code == 0, err
    assert [o["outcome"] for o in again] == ["already_handled"]
    assert len([r for r in await replay_events(p) if r.event_id in ids]) == len(ids)
    assert await handled_count(p, ids) == len(ids)
    code, after, err = await dlq("list", *catalog, "--consumer", CONSUMER, identity=operator)
    assert all(d["handled"] for d in after if d["event_id"] in ids)
