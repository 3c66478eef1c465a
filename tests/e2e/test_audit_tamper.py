"""The Merkle log on the real platform: checkpoints kept and proofs for past sizes, an order
proved offline, every total compared, and tampering with the stored log detected with its
position: a flipped byte, a deleted entry, two swapped entries, a truncated log, and a forked
history served to an auditor who holds a trusted checkpoint.

Tampering is done straight in the databases as the PostgreSQL superuser, as someone with the
database's credentials would; each test puts everything back (the session platform is shared).
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from sqlalchemy.engine import make_url

from services.audit.domain import leaf_hash
from services.kernel import metrics, rpc
from services.kernel.consumer import PERSON_ACTOR
from services.kernel.contract import merkle
from services.kernel.contract.checkpoint import VerifierKey, open_checkpoint
from services.kernel.events import Context, Envelope, new_envelope, service_actor
from subsidy.v1 import audit_pb2, common_pb2, ledger_pb2, usage_pb2, usage_pb2_grpc
from subsidy.v1 import events_pb2 as ev
from subsidyctl import verify_proof
from tests.e2e.cli import identity_dir, subsidyctl
from tests.e2e.conftest import Platform, eventually, status_of
from tests.e2e.test_audit_crosscheck import (
    AUDITOR,
    Entry,
    lock_log,
    log_key,
    put_back_checkpoints,
    read_checkpoints,
    read_log,
    rewrite,
    run_cli,
    tampered,
)

PHONE_PRICE = 300_000


def conninfo(platform: Platform, service: str) -> str:
    """A service's database, as the superuser."""
    database = make_url(platform.running[service].runtime.settings.database_url).database
    assert database
    return platform.infra.pg.conninfo(database)


@asynccontextmanager
async def database(platform: Platform, service: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    async with await psycopg.AsyncConnection.connect(
        conninfo(platform, service), autocommit=True
    ) as conn:
        yield conn


async def checkout(p: Platform, rng: random.Random) -> str:
    """One paid phone order; returns its id."""
    _, consumer = await p.person(rng)
    sku = await p.product(rng, "phone", 0, PHONE_PRICE)
    pool = await p.pool(rng, 10_000_000)
    qualification = await p.claim(consumer, "phone")
    order = f"o-{rng.randrange(10**12)}"
    await p.ledger.ReserveSubsidy(
        ledger_pb2.ReserveSubsidyRequest(
            order_id=order,
            platform_id="jd",
            pool_id=pool,
            consumer_id=consumer,
            qualification_id=qualification,
            sku=sku,
            unit_price_fen=PHONE_PRICE,
        )
    )
    await p.ledger.CaptureSubsidy(ledger_pb2.CaptureSubsidyRequest(order_id=order, payment_ref="x"))
    return order


async def settled(p: Platform) -> audit_pb2.Checkpoint:
    """Everything handled, and every entry in the tree under a signed checkpoint."""
    await p.quiesce()
    return await p.audit.GetCheckpoint(audit_pb2.GetCheckpointRequest(fresh=True))


def of(answer: dict[str, Any], check: str) -> list[dict[str, Any]]:
    return [
        {k: d[k] for k in ("check", "position", "message")}
        for d in answer["differences"]
        if d["check"] == check
    ]


async def tree_leaf(conn: psycopg.AsyncConnection[Any], index: int) -> bytes:
    cur = await conn.execute(
        "SELECT hash FROM audit_tree_nodes WHERE level = 0 AND idx = %s", (index,)
    )
    row = await cur.fetchone()
    assert row is not None
    return bytes(row[0])


async def envelope_at(conn: psycopg.AsyncConnection[Any], index: int) -> bytes:
    cur = await conn.execute("SELECT envelope FROM audit_entries WHERE idx = %s", (index,))
    row = await cur.fetchone()
    assert row is not None
    return bytes(row[0])


def leaf_changed(index: int, data: bytes, leaf: bytes) -> dict[str, Any]:
    return {
        "check": "tree",
        "position": index,
        "message": f"audit entry {index}: its bytes hash to leaf {leaf_hash(data).hex()}, the "
        f"log's tree has {leaf.hex()} there",
    }


CHANGED_AFTER_SIGNING = {
    "check": "tree",
    "position": None,
    "message": "the entries do not add up to the signed root: the entries named above were "
    "changed after they were signed",
}


# -- the log, its checkpoints and proofs ------------------------------------------------------
async def test_checkpoints_are_kept_and_proofs_answer_for_every_past_size(
    platform: Platform, rng: random.Random, tmp_path: Path
) -> None:
    p = platform
    vkey = await log_key(p, tmp_path / "key")
    keys = [VerifierKey.parse(line) for line in vkey.read_text().splitlines()]
    first = await settled(p)
    await checkout(p, rng)
    second = await settled(p)
    assert second.tree_size > first.tree_size
    old, new = open_checkpoint(first.note, keys), open_checkpoint(second.note, keys)
    assert (old.size, old.root) == (first.tree_size, first.root_hash)
    assert (new.size, new.root) == (second.tree_size, second.root_hash)
    # The earlier checkpoint is still served, exactly as it was signed.
    again = await p.audit.GetCheckpoint(audit_pb2.GetCheckpointRequest(tree_size=first.tree_size))
    assert again.note == first.note
    proof = await p.audit.GetConsistencyProof(
        audit_pb2.GetConsistencyProofRequest(old_size=old.size, new_size=new.size)
    )
    merkle.verify_consistency(old.size, new.size, old.root, new.root, list(proof.hashes))
    # An entry proved in the old tree and in the new one, by index and by leaf hash.
    page = await p.audit.GetEntries(audit_pb2.GetEntriesRequest(start=old.size - 1, end=old.size))
    (entry,) = page.entries
    leaf = leaf_hash(entry.envelope_bytes)
    for size, root in ((old.size, old.root), (new.size, new.root)):
        by_index = await p.audit.GetInclusionProof(
            audit_pb2.GetInclusionProofRequest(index=entry.index, tree_size=size)
        )
        by_leaf = await p.audit.GetInclusionProof(
            audit_pb2.GetInclusionProofRequest(leaf_hash=leaf, tree_size=size)
        )
        assert by_leaf == by_index and by_index.leaf_hash == leaf
        merkle.verify_inclusion(entry.index, size, leaf, list(by_index.hashes), root)


async def test_an_orders_entries_are_proved_offline_by_the_standard_library_script(
    platform: Platform, rng: random.Random, tmp_path: Path
) -> None:
    order = await checkout(platform, rng)
    await settled(platform)
    who = identity_dir(platform.infra.identities(AUDITOR), tmp_path / "auditor")
    out = tmp_path / "proof.json"
    audit_addr = f"127.0.0.1:{platform.running['audit'].port}"
    code, answer, err = await subsidyctl(
        "audit", "prove", "--order", order, "--audit", audit_addr, "--out", str(out), identity=who
    )
    assert code == 0, err
    assert {e["event_type"] for e in answer["entries"]} >= {
        "subsidy.v1.SubsidyReserved",
        "subsidy.v1.SubsidyCaptured",
        "subsidy.v1.QualificationLocked",
        "subsidy.v1.QualificationUsed",
    }
    for e in answer["entries"]:  # each names the order, in its correlation id or its payload
        env = Envelope.FromString(base64.b64decode(e["envelope_b64"]))
        assert env.correlation_id == order or order.encode() in env.payload
    vkey = await log_key(platform, tmp_path / "key")
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-I", "-S", verify_proof.__file__, str(out), "--key", str(vkey)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"OK   checkpoint {answer['checkpoint'].split(chr(10))[0]} ")
    assert len(lines) == 1 + len(answer["entries"]) and all(ln.startswith("OK") for ln in lines)
    code, answer, _ = await subsidyctl(
        "audit", "prove", "--order", "o-never-placed", "--audit", audit_addr, identity=who
    )
    assert (code, answer["entries"]) == (1, [])


async def test_a_trusted_checkpoint_is_written_then_extended(
    platform: Platform, rng: random.Random, tmp_path: Path
) -> None:
    trusted = tmp_path / "trusted.json"
    await settled(platform)
    code, answer, err = await run_cli(platform, tmp_path, "--trusted", str(trusted))
    assert code == 0, (answer["differences"], err)
    assert answer["consistent_with_trusted"] is None  # the first run has nothing to compare
    assert answer["trusted"] == {"file": str(trusted), "tree_size": None, "written": True}
    first = json.loads(trusted.read_text())
    assert first["tree_size"] == answer["tree_size"] and first["root_hex"] == answer["root_hex"]
    assert answer["signature_ok"] is True and answer["cross_check_ok"] is True
    assert set(answer["totals_compared"]) == {
        "pool",
        "quota",
        "person",
        "sales",
        "settlement",
        "returns",
    }
    assert answer["proofs_checked"] >= 2
    await checkout(platform, rng)
    await settled(platform)
    code, answer, err = await run_cli(platform, tmp_path, "--trusted", str(trusted))
    assert code == 0, (answer["differences"], err)
    assert answer["consistent_with_trusted"] is True
    assert answer["trusted"]["tree_size"] == first["tree_size"] < answer["tree_size"]
    assert json.loads(trusted.read_text())["tree_size"] == answer["tree_size"]


async def test_every_total_a_service_reports_wrongly_is_named(
    platform: Platform, rng: random.Random, tmp_path: Path
) -> None:
    order = await checkout(platform, rng)
    await settled(platform)
    async with database(platform, "eligibility") as e, database(platform, "catalog") as c:
        cur = await e.execute("SELECT category, day, issued FROM quota_usage LIMIT 1")
        category, day, issued = await cur.fetchone() or ("", "", 0)
        cur = await e.execute(
            "SELECT q.qualification_id, c.id_number_index, q.category FROM qualifications q"
            " JOIN consumers c USING (consumer_id) WHERE q.order_id = %s",
            (order,),
        )
        qualification, person, q_category = await cur.fetchone() or ("", "", "")
        cur = await c.execute(
            "SELECT merchant_id, sku, subsidy_fen FROM sales_orders WHERE order_id = %s", (order,)
        )
        merchant, sku, subsidy = await cur.fetchone() or ("", "", 0)
        await e.execute(
            "UPDATE quota_usage SET issued = issued + 1 WHERE category = %s AND day = %s",
            (category, day),
        )
        await e.execute(
            "UPDATE qualifications SET status = 'FORFEITED' WHERE qualification_id = %s",
            (qualification,),
        )
        await c.execute(
            "UPDATE sales_orders SET subsidy_fen = subsidy_fen - 1 WHERE order_id = %s", (order,)
        )
        try:
            code, answer, _ = await run_cli(platform, tmp_path)
        finally:
            await e.execute(
                "UPDATE quota_usage SET issued = issued - 1 WHERE category = %s AND day = %s",
                (category, day),
            )
            await e.execute(
                "UPDATE qualifications SET status = 'USED' WHERE qualification_id = %s",
                (qualification,),
            )
            await c.execute(
                "UPDATE sales_orders SET subsidy_fen = subsidy_fen + 1 WHERE order_id = %s",
                (order,),
            )
    assert code == 1 and answer["ok"] is False
    found = {
        (d["total"], tuple(d["key"]), d["figure"]): (d["log"], d["live"])
        for d in answer["differences"]
        if d["check"] == "totals"
    }
    assert found == {
        ("quota", (category, day), "issued"): (issued, issued + 1),
        ("person", (person, q_category), "USED"): (1, 0),
        ("person", (person, q_category), "FORFEITED"): (0, 1),
        ("sales", (merchant, sku), "subsidy_fen"): (subsidy, subsidy - 1),
    }
    # The tree, the signature and the stores are fine: only the totals are wrong.
    assert answer["signature_ok"] is True and answer["cross_check_ok"] is True
    assert of(answer, "tree") == [] and of(answer, "trusted") == []


# -- tampering with the stored log ------------------------------------------------------------
async def test_a_flipped_byte_of_a_stored_entry_is_named_at_its_position(
    platform: Platform, rng: random.Random, tmp_path: Path
) -> None:
    await checkout(platform, rng)
    cp = await settled(platform)
    i = cp.tree_size // 2
    async with database(platform, "audit") as conn:
        data, leaf = await envelope_at(conn, i), await tree_leaf(conn, i)
        event_id = Envelope.FromString(data).event_id
        at = data.index(event_id.encode())  # a byte of the event id: the entry still parses
        flipped = data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]
        await conn.execute("UPDATE audit_entries SET envelope = %s WHERE idx = %s", (flipped, i))
        try:
            code, answer, _ = await run_cli(platform, tmp_path, "--settle-s", "0")
        finally:
            await conn.execute("UPDATE audit_entries SET envelope = %s WHERE idx = %s", (data, i))
    assert code == 1 and answer["ok"] is False
    assert of(answer, "tree") == [leaf_changed(i, flipped, leaf), CHANGED_AFTER_SIGNING]
    assert answer["signature_ok"] is True  # the checkpoint is true; the entry is not
    # The stores tell the same: the changed entry names an event no store holds.
    assert answer["cross_check_ok"] is False
    assert any(line.startswith(f"audit entry {i}: event ") for line in answer["events"])


async def test_a_deleted_entry_is_named_at_its_position(
    platform: Platform, rng: random.Random, tmp_path: Path
) -> None:
    cp = await settled(platform)
    i = cp.tree_size // 3
    async with database(platform, "audit") as conn:
        cur = await conn.execute(
            "SELECT idx, event_id, service, event_type, leaf_hash, chain_hash, envelope"
            " FROM audit_entries WHERE idx = %s",
            (i,),
        )
        row = await cur.fetchone()
        assert row is not None
        await conn.execute("DELETE FROM audit_entries WHERE idx = %s", (i,))
        try:
            code, answer, _ = await run_cli(platform, tmp_path, "--settle-s", "0.5")
        finally:
            await conn.execute(
                "INSERT INTO audit_entries (idx, event_id, service, event_type, leaf_hash,"
                " chain_hash, envelope) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                row,
            )
    assert code == 1 and answer["ok"] is False
    assert of(answer, "tree") == [
        {
            "check": "tree",
            "position": i,
            "message": f"audit entry {i} missing: the log goes from entry {i - 1} to entry {i + 1}",
        }
    ]
    assert answer["cross_check_ok"] is False
    assert any(
        line.startswith(f"event {row[1]} (") and line.endswith("but not in the audit log")
        for line in answer["events"]
    )


async def test_two_swapped_entries_are_named_though_every_store_still_matches(
    platform: Platform, rng: random.Random, tmp_path: Path
) -> None:
    cp = await settled(platform)
    i, j = 1, cp.tree_size - 2
    async with database(platform, "audit") as conn:
        a, b = await envelope_at(conn, i), await envelope_at(conn, j)
        leaf_i, leaf_j = await tree_leaf(conn, i), await tree_leaf(conn, j)
        await conn.execute("UPDATE audit_entries SET envelope = %s WHERE idx = %s", (b, i))
        await conn.execute("UPDATE audit_entries SET envelope = %s WHERE idx = %s", (a, j))
        try:
            code, answer, _ = await run_cli(platform, tmp_path, "--settle-s", "0")
        finally:
            await conn.execute("UPDATE audit_entries SET envelope = %s WHERE idx = %s", (a, i))
            await conn.execute("UPDATE audit_entries SET envelope = %s WHERE idx = %s", (b, j))
    assert code == 1 and answer["ok"] is False
    assert of(answer, "tree") == [
        leaf_changed(i, b, leaf_i),
        leaf_changed(j, a, leaf_j),
        CHANGED_AFTER_SIGNING,
    ]
    # Every event is still in the log, once, with its bytes: only the tree knows the order.
    assert answer["cross_check_ok"] is True


async def test_a_truncated_log_is_caught_by_the_trusted_checkpoint(
    platform: Platform, rng: random.Random, tmp_path: Path
) -> None:
    trusted = tmp_path / "trusted.json"
    await checkout(platform, rng)
    cp = await settled(platform)
    code, answer, err = await run_cli(platform, tmp_path, "--trusted", str(trusted))
    assert code == 0, (answer["differences"], err)
    n, k = answer["tree_size"], answer["tree_size"] - 3
    assert n == cp.tree_size
    async with database(platform, "audit") as conn:
        saved: dict[str, list[tuple[Any, ...]]] = {}
        for table, where in (
            ("audit_entries", "idx >= %(k)s"),
            ("audit_tree_nodes", "(idx + 1) * (1::bigint << level) > %(k)s"),
            ("audit_entry_keys", "idx >= %(k)s"),
            ("audit_checkpoints", "tree_size > %(k)s"),
            ("audit_head", "true"),
            ("audit_tree", "true"),
        ):
            cur = await conn.execute(f"SELECT * FROM {table} WHERE {where}", {"k": k})
            saved[table] = [tuple(r) for r in await cur.fetchall()]
        chain = await conn.execute("SELECT chain_hash FROM audit_entries WHERE idx = %s", (k - 1,))
        (head,) = await chain.fetchone() or (b"",)
        async with conn.transaction():  # the attacker cuts the log and its tree cleanly at k
            await conn.execute("DELETE FROM audit_entries WHERE idx >= %s", (k,))
            await conn.execute(
                "DELETE FROM audit_tree_nodes WHERE (idx + 1) * (1::bigint << level) > %s", (k,)
            )
            await conn.execute("DELETE FROM audit_entry_keys WHERE idx >= %s", (k,))
            await conn.execute("DELETE FROM audit_checkpoints WHERE tree_size > %s", (k,))
            await conn.execute(
                "UPDATE audit_head SET size = %s, chain_hash = %s WHERE id = 1", (k, head)
            )
            await conn.execute("UPDATE audit_tree SET size = %s WHERE id = 1", (k,))
        try:
            code, answer, _ = await run_cli(
                platform, tmp_path, "--trusted", str(trusted), "--settle-s", "0"
            )
        finally:
            async with conn.transaction():
                await conn.execute("DELETE FROM audit_checkpoints WHERE tree_size > %s", (k,))
                for table in ("audit_head", "audit_tree"):
                    await conn.execute(f"DELETE FROM {table}")
                for table, rows in saved.items():
                    if rows:
                        marks = ", ".join(["%s"] * len(rows[0]))
                        async with conn.cursor() as cur:
                            await cur.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)
    assert code == 1 and answer["ok"] is False
    assert answer["tree_size"] == k  # the log signed its truncated self
    assert answer["signature_ok"] is True and answer["consistent_with_trusted"] is False
    assert of(answer, "trusted") == [
        {
            "check": "trusted",
            "position": k,
            "message": f"the log has {k} entries, fewer than the {n} of your trusted "
            f"checkpoint: it was truncated at entry {k}",
        }
    ]
    assert answer["trusted"]["written"] is False
    assert json.loads(trusted.read_text())["tree_size"] == n  # still what was trusted


async def test_a_forked_history_is_refused_to_an_auditor_holding_a_trusted_checkpoint(
    platform: Platform, rng: random.Random, tmp_path: Path
) -> None:
    """The attacker rewrites one old entry and rebuilds the whole log, tree and checkpoints:
    the service signs the fork, the fork verifies on its own, but not against what the
    auditor trusted last time; the position is where the two histories part."""
    trusted = tmp_path / "trusted.json"
    await checkout(platform, rng)
    await settled(platform)
    code, answer, err = await run_cli(platform, tmp_path, "--trusted", str(trusted))
    assert code == 0, (answer["differences"], err)
    n = answer["tree_size"]
    i = n // 2

    def fork(entries: list[Entry]) -> list[Entry]:
        event_id, service, event_type, data = entries[i]
        env = Envelope.FromString(data)
        env.correlation_id = "history-rewritten"
        forged = new_envelope(
            "ledger",
            "refusal/o-forked",
            ev.ReservationRefused(order_id="o-forked", reason="POOL_EXHAUSTED"),
            Context(service_actor("ledger")),
            version=1,
        )
        return [
            *entries[:i],
            (event_id, service, event_type, env.SerializeToString(deterministic=True)),
            *entries[i + 1 :],
            (forged.event_id, "ledger", forged.event_type, forged.SerializeToString()),
        ]

    async with tampered(platform, fork):
        code, answer, _ = await run_cli(
            platform, tmp_path, "--trusted", str(trusted), "--settle-s", "0"
        )
    assert code == 1 and answer["ok"] is False
    assert answer["signature_ok"] is True  # the fork is signed: the service signs its database
    assert of(answer, "tree") == []  # and consistent on its own
    assert answer["tree_size"] == n + 1
    assert answer["consistent_with_trusted"] is False
    (level, index) = next(
        (lv, ix) for lv, ix in merkle.range_nodes(0, n) if ix << lv <= i < (ix + 1) << lv
    )
    start, stop = index << level, ((index + 1) << level) - 1
    span = f"entry {start}" if start == stop else f"entries {start}..{stop}"
    proof_failed, parted = of(answer, "trusted")
    assert re.fullmatch(
        rf"the log of {n + 1} entries is not consistent with your trusted checkpoint of {n}: "
        r"the proof does not lead to the (old|new) root \(size \d+\)",
        proof_failed["message"],
    )
    assert parted == {
        "check": "trusted",
        "position": start,
        "message": f"the first {n} entries are not those you trusted: they differ within {span}",
    }
    assert any(line.startswith(f"audit entry {i}: event ") for line in answer["events"])
    assert json.loads(trusted.read_text())["tree_size"] == n


# -- an event written around a service's store -----------------------------------------------
async def forget_event(platform: Platform, service: str, event_id: str) -> None:
    """Take an event out of ``service``'s store, of every consumer's record of having handled
    it, and out of the audit log (the entries after it move up; only the checkpoints signed
    before it are kept, which the log without it still extends)."""
    async with database(platform, service) as conn:
        await conn.execute("DELETE FROM events WHERE event_id = %s", (event_id,))
    for name in platform.running:
        async with database(platform, name) as conn:
            await conn.execute("DELETE FROM handled_events WHERE event_id = %s", (event_id,))
    async with await psycopg.AsyncConnection.connect(conninfo(platform, "audit")) as conn:
        async with conn.transaction():
            await lock_log(conn)
            entries = await read_log(conn)
            ids = [e[0] for e in entries]
            if event_id not in ids:  # the log refused it
                return
            at = ids.index(event_id)
            signed = await read_checkpoints(conn)
            await rewrite(conn, entries[:at] + entries[at + 1 :])
            await put_back_checkpoints(conn, [c for c in signed if c[0] <= at])


async def test_a_machine_event_by_a_person_inserted_into_a_store_is_refused_and_named(
    platform: Platform, rng: random.Random, tmp_path: Path
) -> None:
    """The store refuses, at every append, an event only platforms and services cause whose
    actor is a person (services.invariants.check_machine_event). A row inserted straight into
    eligibility's events table, as the superuser, goes around that, and the relay publishes it.
    Every consumer checks what it receives as the store would have (services.kernel.consumer.
    refusal): the audit log refuses it into the dead-letter stream (`MachineEventByPerson`,
    counted, alerted), so the verifier names the event as one the store lists and the log does
    not, and fails the run (never naming the actor's id). A log recorded before consumers
    refused such an event still fails on the replay's own actor check
    (tests/unit/test_audit_actors.py)."""
    await checkout(platform, rng)
    await settled(platform)
    stream = f"consumer/c-by-hand-{rng.randrange(10**12)}"
    operator = Context(common_pb2.Actor(kind=common_pb2.Actor.KIND_OPERATOR, id="op-by-hand"))
    env = new_envelope(
        "eligibility",
        stream,
        ev.QualificationUsed(qualification_id="q-by-hand", order_id="o-by-hand"),
        operator,
        version=1,
    )
    before = metrics.EVENTS_REFUSED.labels("audit-log", PERSON_ACTOR)._value.get()
    async with database(platform, "eligibility") as conn:
        await conn.execute(
            "INSERT INTO events (event_id, stream_id, stream_version, event_type, envelope)"
            " VALUES (%s, %s, 1, %s, %s)",
            (env.event_id, stream, env.event_type, env.SerializeToString(deterministic=True)),
        )
    try:

        async def refused() -> None:
            assert metrics.EVENTS_REFUSED.labels("audit-log", PERSON_ACTOR)._value.get() > before

        await eventually(refused, within=30)
        async with database(platform, "audit") as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM audit_entries WHERE event_id = %s", (env.event_id,)
            )
            assert await cur.fetchone() == (0,)
        code, answer, err = await run_cli(platform, tmp_path)
    finally:
        await forget_event(platform, "eligibility", env.event_id)
    assert code == 1 and answer["ok"] is False
    counts, named = answer["differences"]
    tally = re.fullmatch(
        r"eligibility: (\d+) entries in the audit log, (\d+) events in its store",
        counts["message"],
    )
    assert counts["check"] == "stores" and tally is not None
    assert int(tally[2]) == int(tally[1]) + 1  # the store has exactly the one the log refused
    assert named == {
        "check": "stores",
        "position": None,
        "message": f"event {env.event_id} (eligibility {stream} v1"
        " subsidy.v1.QualificationUsed) is in eligibility's store but not in the audit log",
    }
    assert answer["signature_ok"] is True
    assert "op-by-hand" not in json.dumps(answer) + err
    # The history without it verifies again.
    await settled(platform)
    code, answer, err = await run_cli(platform, tmp_path)
    assert code == 0, (answer["differences"], err)
    assert of(answer, "stores") == [] and of(answer, "actor") == []


# -- eligibility's figures, as the auditor reads them ----------------------------------------
async def test_usage_pages_through_every_quota_and_person_and_refuses_a_forged_cursor(
    platform: Platform, rng: random.Random
) -> None:
    await checkout(platform, rng)
    await checkout(platform, rng)
    await platform.quiesce()
    address = f"127.0.0.1:{platform.running['eligibility'].port}"
    channel = rpc.channel(address, platform.infra.identities(AUDITOR))
    try:
        usage = usage_pb2_grpc.UsageServiceStub(channel)
        whole = await usage.ListPersonUsage(usage_pb2.ListUsageRequest(limit=1000))
        paged: list[usage_pb2.PersonUsage] = []
        cursor = ""
        while True:  # one row a page: the cursor resumes exactly after the last row
            page = await usage.ListPersonUsage(usage_pb2.ListUsageRequest(cursor=cursor, limit=1))
            paged += page.rows
            if not (cursor := page.next_cursor):
                break
        assert paged == list(whole.rows) and len(paged) >= 2
        # Persons are blind indexes, never an ID number.
        assert not any(re.fullmatch(r"[0-9]{17}[0-9X]", r.id_number_index) for r in paged)
        quotas = await usage.ListQuotaUsage(usage_pb2.ListUsageRequest())
        async with database(platform, "eligibility") as conn:
            cur = await conn.execute("SELECT category, day, issued FROM quota_usage")
            stored = {(c, d): int(n) for c, d, n in await cur.fetchall()}
        assert {(r.category, r.day): r.issued for r in quotas.rows} == stored
        for request, reason, field in (
            (usage_pb2.ListUsageRequest(cursor="not-a-cursor"), "INVALID_CURSOR", "cursor"),
            (usage_pb2.ListUsageRequest(cursor="W10="), "INVALID_CURSOR", "cursor"),  # []
            (usage_pb2.ListUsageRequest(cursor="x" * 601), "INVALID_CURSOR", "cursor"),
            (usage_pb2.ListUsageRequest(limit=1001), "INVALID_LIMIT", "limit"),
            (usage_pb2.ListUsageRequest(limit=-1), "INVALID_LIMIT", "limit"),
        ):
            for call in (usage.ListQuotaUsage, usage.ListPersonUsage):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call(request)
                assert status_of(caught.value) == (grpc.StatusCode.INVALID_ARGUMENT, reason, field)
    finally:
        await channel.close()


async def test_every_proof_still_verifies_after_a_person_is_crypto_shredded(
    platform: Platform, rng: random.Random, tmp_path: Path
) -> None:
    """The tree hashes the ciphertext: destroying a person's data key (crypto-shredding)
    changes no entry, so their registration's proof and the whole audit still verify."""
    order = await checkout(platform, rng)
    cp = await settled(platform)
    page = await platform.audit.ListOrderEntries(audit_pb2.ListOrderEntriesRequest(order_id=order))
    locked = next(e for e in page.entries if e.envelope.event_type.endswith("QualificationLocked"))
    consumer = locked.envelope.stream_id.removeprefix("consumer/")
    recent = await platform.audit.GetEntries(  # the checkout's own entries are among these
        audit_pb2.GetEntriesRequest(start=max(0, cp.tree_size - 1000), end=cp.tree_size)
    )
    registered = next(
        e
        for e in recent.entries
        if Envelope.FromString(e.envelope_bytes).stream_id == f"consumer/{consumer}"
        and Envelope.FromString(e.envelope_bytes).stream_version == 1
    )
    async with database(platform, "eligibility") as conn:
        await conn.execute("DELETE FROM person_keys WHERE consumer_id = %s", (consumer,))
    proof = await platform.audit.GetInclusionProof(
        audit_pb2.GetInclusionProofRequest(
            leaf_hash=leaf_hash(registered.envelope_bytes), tree_size=cp.tree_size
        )
    )
    assert proof.index == registered.index
    merkle.verify_inclusion(
        proof.index,
        cp.tree_size,
        leaf_hash(registered.envelope_bytes),
        list(proof.hashes),
        cp.root_hash,
    )
    code, answer, err = await run_cli(platform, tmp_path)
    assert code == 0, (answer["differences"], err)
