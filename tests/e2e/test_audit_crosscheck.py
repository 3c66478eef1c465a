"""subsidyctl audit verify compares the audit log with every service's own store, on the real
in-process platform: an entry no store wrote, a stored event the log lacks and an entry whose
bytes differ are each named, although the log's hash chain and Merkle tree were recomputed (and
signed anew) to hide them.

The tampering is done as an attacker with access to the audit database would: straight into
its tables, as the PostgreSQL superuser, chain, tree and heads recomputed, the old checkpoints
deleted (tests/e2e/test_audit_tamper.py shows what an auditor with a trusted checkpoint sees).
Each test puts the log back exactly as it was (the session's platform is shared), under the
head rows' locks so the audit consumer cannot append in between.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from services.audit.domain import GENESIS, chain_hash, leaf_hash
from services.audit.tree import keys_of
from services.invariants import LogStoreMismatch
from services.kernel.contract.merkle import CompactRange
from services.kernel.events import Context, Envelope, new_envelope, service_actor
from services.kernel.eventstore import START
from services.kernel.identity import Caller, Role
from subsidy.v1 import eventlog_pb2
from subsidy.v1 import events_pb2 as ev
from subsidyctl.cli.audit import verify
from tests.e2e.cli import identity_dir, subsidyctl
from tests.e2e.conftest import Platform, status_of

AUDITOR = Caller(Role.AUDITOR, "audit")
# (event id, service, event type, envelope bytes), in log order
Entry = tuple[str, str, str, bytes]


def audit_conninfo(platform: Platform) -> str:
    """The audit database, as the superuser (not the service's own role)."""
    url = platform.running["audit"].runtime.settings.database_url
    database = make_url(url).database
    assert database
    return platform.infra.pg.conninfo(database)


async def rewrite(conn: psycopg.AsyncConnection[Any], entries: list[Entry]) -> None:
    """Replace the whole log with ``entries``, chained, its Merkle tree rebuilt and with heads
    that match, and the signed checkpoints deleted (so the service signs the new tree): after
    this, the log's own chain and tree verify whatever the entries are."""
    await conn.execute("DELETE FROM audit_entries")
    await conn.execute("DELETE FROM audit_tree_nodes")
    await conn.execute("DELETE FROM audit_entry_keys")
    await conn.execute("DELETE FROM audit_checkpoints")
    head = GENESIS
    nodes: list[tuple[int, int, bytes]] = []
    tree = CompactRange()
    for idx, (event_id, service, event_type, data) in enumerate(entries):
        leaf = leaf_hash(data)
        head = chain_hash(head, leaf)
        await conn.execute(
            "INSERT INTO audit_entries"
            " (idx, event_id, service, event_type, leaf_hash, chain_hash, envelope)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (idx, event_id, service, event_type, leaf, head, data),
        )
        tree.append(leaf, lambda level, index, h: nodes.append((level, index, h)))
        for key in keys_of(data):
            await conn.execute(
                "INSERT INTO audit_entry_keys (key, idx) VALUES (%s, %s)", (key, idx)
            )
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO audit_tree_nodes (level, idx, hash) VALUES (%s, %s, %s)", nodes
        )
    await conn.execute(
        "UPDATE audit_head SET size = %s, chain_hash = %s WHERE id = 1", (len(entries), head)
    )
    await conn.execute("UPDATE audit_tree SET size = %s WHERE id = 1", (len(entries),))


async def lock_log(conn: psycopg.AsyncConnection[Any]) -> None:
    """Hold the log's head and its tree's head (no append, integration or signature meanwhile)."""
    await conn.execute("SELECT 1 FROM audit_head WHERE id = 1 FOR UPDATE")
    await conn.execute("SELECT 1 FROM audit_tree WHERE id = 1 FOR UPDATE")


async def read_checkpoints(conn: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
    cur = await conn.execute(
        "SELECT tree_size, root_hash, note, published_at FROM audit_checkpoints"
    )
    return [tuple(r) for r in await cur.fetchall()]


async def put_back_checkpoints(
    conn: psycopg.AsyncConnection[Any], saved: list[tuple[Any, ...]]
) -> None:
    await conn.execute("DELETE FROM audit_checkpoints")
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO audit_checkpoints (tree_size, root_hash, note, published_at)"
            " VALUES (%s, %s, %s, %s)",
            saved,
        )


async def read_log(conn: psycopg.AsyncConnection[Any]) -> list[Entry]:
    cur = await conn.execute(
        "SELECT event_id, service, event_type, envelope FROM audit_entries ORDER BY idx"
    )
    return [(r[0], r[1], r[2], bytes(r[3])) for r in await cur.fetchall()]


@asynccontextmanager
async def tampered(
    platform: Platform, change: Callable[[list[Entry]], list[Entry]]
) -> AsyncIterator[None]:
    """The audit log changed by ``change`` (and rechained) for the body; then put back."""
    await platform.quiesce()  # nothing on its way to the log while it is changed
    async with await psycopg.AsyncConnection.connect(audit_conninfo(platform)) as conn:
        async with conn.transaction():
            await lock_log(conn)
            original = await read_log(conn)
            signed = await read_checkpoints(conn)
            changed = change(list(original))
            await rewrite(conn, changed)
            added = {e[0] for e in changed} - {e[0] for e in original}  # forged: not put back
        try:
            yield
        finally:
            async with conn.transaction():
                await lock_log(conn)
                known = {e[0] for e in original} | set(added)
                # Entries the consumer appended meanwhile stay, after the original ones.
                arrived = [e for e in await read_log(conn) if e[0] not in known]
                await rewrite(conn, [*original, *arrived])
                # The checkpoints signed before, which the true tree extends; not the forged.
                await put_back_checkpoints(conn, signed)


def first_of(entries: list[Entry], service: str) -> int:
    """The index of the first entry of ``service``."""
    for i, (_, s, _, _) in enumerate(entries):
        if s == service:
            return i
    raise AssertionError(f"no {service} entry in the log")


def forge(entries: list[Entry]) -> list[Entry]:
    """One ledger event more, as the review's forgery was: a ``ReservationRefused`` for a
    pending order, of the ledger's own id scheme, that the ledger never stored."""
    env = new_envelope(
        "ledger",
        f"refusal/o-forged-{len(entries)}",
        ev.ReservationRefused(order_id=f"o-forged-{len(entries)}", reason="POOL_EXHAUSTED"),
        Context(service_actor("ledger")),
        version=1,
    )
    data = env.SerializeToString(deterministic=True)
    return [*entries, (env.event_id, "ledger", env.event_type, data)]


def token_file(directory: Path, token: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vault-token").write_text(token)
    return directory / "vault-token"


async def log_key(platform: Platform, directory: Path) -> Path:
    """The log's verifier key, as an auditor gets it once from Vault (``audit key``) and pins."""
    token, vkey = token_file(directory, platform.infra.bao.token), directory / "log.vkey"
    code, answer, err = await subsidyctl(
        "audit", "key", "--vault-addr", platform.infra.bao.addr,
        "--vault-token-file", str(token), "--out", str(vkey),
        "--origin", platform.running["audit"].runtime.settings.audit_origin,
    )  # fmt: skip
    assert code == 0, err
    assert answer["vkeys"] and vkey.read_text().splitlines() == answer["vkeys"]
    return vkey


async def run_cli(
    platform: Platform, tmp_path: Path, *extra: str
) -> tuple[int, dict[str, Any], str]:
    addresses = [
        arg
        for name in ("catalog", "eligibility", "ledger", "audit")
        for arg in (f"--{name}", f"127.0.0.1:{platform.running[name].port}")
    ]
    who = identity_dir(platform.infra.identities(AUDITOR), tmp_path / "auditor")
    key = await log_key(platform, tmp_path / "key")
    return await subsidyctl("audit", "verify", *addresses, "--key", str(key), *extra, identity=who)


async def store_counts(platform: Platform) -> dict[str, int]:
    return {name: await r.runtime.store.count() for name, r in platform.running.items()}


async def test_every_service_lists_its_store_with_the_hash_of_each_stored_envelope(
    platform: Platform,
) -> None:
    await platform.quiesce()
    store = platform.running["catalog"].runtime.store
    expected = await store.read_all(START, limit=100_000)
    stub = platform.event_logs["catalog"]
    listed: list[eventlog_pb2.StoredEvent] = []
    cursor = ""
    while True:  # small pages: the cursor carries on exactly where a page ended
        page = await stub.ListEvents(eventlog_pb2.ListEventsRequest(cursor=cursor, limit=7))
        assert page.service == "catalog"
        listed += page.events
        if not page.events:
            assert page.next_cursor == cursor
            break
        cursor = page.next_cursor
    assert [e.event_id for e in listed] == [r.envelope.event_id for r in expected]
    async with store.engine.connect() as conn:
        rows = (await conn.execute(text("SELECT event_id, envelope FROM events"))).all()
    raw: dict[str, bytes] = {str(r[0]): bytes(r[1]) for r in rows}
    for e in listed:
        assert e.sha256_hex == hashlib.sha256(raw[e.event_id]).hexdigest()
    first = expected[0].envelope
    assert (listed[0].stream_id, listed[0].stream_version, listed[0].event_type) == (
        first.stream_id,
        first.stream_version,
        first.event_type,
    )
    for request, field in (
        (eventlog_pb2.ListEventsRequest(cursor="12:x"), "cursor"),
        (eventlog_pb2.ListEventsRequest(cursor="1" * 42 + ":1"), "cursor"),
        (eventlog_pb2.ListEventsRequest(cursor="99999999999999999999:1"), "cursor"),
        (eventlog_pb2.ListEventsRequest(limit=1001), "limit"),
        (eventlog_pb2.ListEventsRequest(limit=-1), "limit"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListEvents(request)
        assert status_of(caught.value)[0::2] == (grpc.StatusCode.INVALID_ARGUMENT, field)


async def test_the_untouched_platform_verifies_and_every_store_matches_the_log(
    platform: Platform, tmp_path: Path, rng: random.Random
) -> None:
    # Events in every service's store (run alone, the platform has only the policy's).
    _, consumer = await platform.person(rng)
    await platform.claim(consumer, "phone")
    await platform.product(rng, "phone", 0, 300_000)
    await platform.pool(rng, 1_000_000)
    await platform.quiesce()
    code, answer, err = await run_cli(platform, tmp_path)
    assert code == 0, (answer, err)
    assert answer["ok"] is True
    counts = await store_counts(platform)
    assert all(counts[name] for name in ("catalog", "eligibility", "ledger"))
    expected = {name: n for name, n in counts.items() if n}
    assert answer["store_events_by_service"] == expected
    assert answer["events_by_service"] == expected
    assert answer["entries"] == sum(counts.values())


async def test_an_entry_no_store_wrote_is_named_though_its_chain_verifies(
    platform: Platform, tmp_path: Path
) -> None:
    """The review's forgery: the log accepted a ledger event the ledger never stored."""
    forged: list[str] = []

    def add(entries: list[Entry]) -> list[Entry]:
        changed = forge(entries)
        forged.append(changed[-1][0])
        return changed

    async with tampered(platform, add):
        ledger_events = await platform.running["ledger"].runtime.store.count()
        code, answer, err = await run_cli(platform, tmp_path)
        assert code == 1, (answer, err)
        assert answer["ok"] is False
        assert answer["counts"] == [
            f"ledger: {ledger_events + 1} entries in the audit log, {ledger_events} events in"
            " its store"
        ]
        (line,) = answer["events"]
        assert line.startswith("audit entry ") and line.endswith(" is in no service's store")
        assert f"event {forged[0]} (ledger " in line
        assert answer["more_events"] == 0
        assert line in err.splitlines()  # one line each for the person reading it
        with pytest.raises(LogStoreMismatch):
            await verify(platform.audit, platform.ledger, platform.event_logs, settle_s=0)
    await platform.quiesce()
    report = await verify(platform.audit, platform.ledger, platform.event_logs, settle_s=5)
    assert report["ok"]  # put back: the other tests see the true log


async def test_a_stored_event_missing_from_the_log_is_named(
    platform: Platform, tmp_path: Path
) -> None:
    removed: list[str] = []

    def drop(entries: list[Entry]) -> list[Entry]:
        i = first_of(entries, "catalog")
        removed.append(entries[i][0])
        return entries[:i] + entries[i + 1 :]

    async with tampered(platform, drop):
        code, answer, err = await run_cli(platform, tmp_path, "--settle-s", "0.5")
        assert code == 1, (answer, err)
        (line,) = answer["events"]
        assert line.startswith(f"event {removed[0]} (catalog ")
        assert line.endswith(" is in catalog's store but not in the audit log")
        (count,) = answer["counts"]
        assert count.startswith("catalog: ")
    await platform.quiesce()
    assert (await verify(platform.audit, platform.ledger, platform.event_logs))["ok"]


async def test_an_entry_whose_bytes_differ_from_its_store_is_named(platform: Platform) -> None:
    changed: list[str] = []

    def alter(entries: list[Entry]) -> list[Entry]:
        i = first_of(entries, "catalog")
        event_id, service, event_type, data = entries[i]
        env = Envelope.FromString(data)
        env.correlation_id = "rewritten-after-the-fact"
        changed.append(event_id)
        return [
            *entries[:i],
            (event_id, service, event_type, env.SerializeToString(deterministic=True)),
            *entries[i + 1 :],
        ]

    async with tampered(platform, alter):
        with pytest.raises(LogStoreMismatch) as caught:
            await verify(platform.audit, platform.ledger, platform.event_logs, settle_s=0)
        assert caught.value.counts == []  # the counts agree; only the hashes tell
        (line,) = caught.value.events
        assert f"event {changed[0]} (catalog " in line
        assert "differs from catalog's store: envelope sha256 " in line
    await platform.quiesce()
    assert (await verify(platform.audit, platform.ledger, platform.event_logs))["ok"]
