"""Auditor commands: ``subsidyctl audit verify`` checks the audit log against the ledger and
against every service's event store.

Fetches every entry from the audit service (a Rich progress bar on a terminal), recomputes the
hash chain and compares its head with the one the service reports, rebuilds every budget pool
from the log's events alone (checking the budget invariant after each), and compares each with
what the ledger reports. Then it lists every service's own store (``EventLogService``) and
compares it with the log, event by event: counts per service, and the SHA-256 of every envelope
(:func:`services.audit.verify.compare_with_stores`). Calls as ``--identity DIR`` (default: the
demo auditor). Prints one JSON object; exit 0 when everything agrees, 1 otherwise
(``{"ok": false, "violation": ...}``, and for the stores a line per event that differs).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer

from services.audit.verify import Replay, compare_pools, compare_with_stores, replay
from services.invariants import EventDigest, InvariantViolation, LogStoreMismatch
from services.kernel import rpc, topology
from services.kernel.contract import budget
from services.kernel.events import Envelope
from subsidy.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    eventlog_pb2,
    eventlog_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
)

from ..stack.certs import AUDITOR_DEMO
from .common import EXIT_NO, AuditorIdentityOpt, JsonOpt, emit, identity, local_address, note
from .progress import PhaseProgress

app = typer.Typer(name="audit", help="Auditor commands.", no_args_is_help=True)
PAGE = 1000
# How long verify waits for the log to receive store events it does not have yet: the log
# learns of an event through NATS, a moment after the store committed it.
SETTLE_S = 10.0
Row = tuple[int, bytes, bytes, bytes]  # (index, leaf hash, chain hash, envelope bytes)


@dataclass
class StoreListing:
    """One service's store as listed so far, and where its listing goes on."""

    service: str
    stub: eventlog_pb2_grpc.EventLogServiceAsyncStub
    cursor: str = ""
    events: list[EventDigest] = field(default_factory=list)

    async def read_on(self) -> None:
        """List the events stored since the last call, to the end of the store."""
        while True:
            page = await self.stub.ListEvents(
                eventlog_pb2.ListEventsRequest(cursor=self.cursor, limit=PAGE)
            )
            if page.service != self.service:
                raise InvariantViolation(
                    f"the address given for {self.service} lists the store of"
                    f" {page.service or 'no service'}"
                )
            self.events += [
                EventDigest(
                    self.service,
                    e.event_id,
                    e.sha256_hex,
                    e.stream_id,
                    e.stream_version,
                    e.event_type,
                )
                for e in page.events
            ]
            self.cursor = page.next_cursor
            if len(page.events) < PAGE:
                return


async def fetch_log(
    audit: audit_pb2_grpc.AuditServiceAsyncStub,
    rows: list[Row],
    progress: Callable[[int, int], None] | None,
) -> audit_pb2.LogInfo:
    """Append to ``rows`` the entries after those it holds, up to the log's current size."""
    info = await audit.GetLogInfo(audit_pb2.GetLogInfoRequest())
    while len(rows) < info.size:
        page = await audit.GetEntries(audit_pb2.GetEntriesRequest(start=len(rows), limit=PAGE))
        if not page.entries:
            break
        rows += [
            (
                e.index,
                bytes.fromhex(e.leaf_hash_hex),
                bytes.fromhex(e.chain_hash_hex),
                e.envelope.SerializeToString(deterministic=True),
            )
            for e in page.entries
        ]
        if progress is not None:
            progress(len(rows), info.size)
    return info


def replay_checked(rows: list[Row], info: audit_pb2.LogInfo) -> Replay:
    """:func:`replay`, and the head it reaches must be the head the service reports."""
    result = replay(rows)
    if result.size == info.size and result.head.hex() != info.head_hash_hex:
        raise InvariantViolation("the audit log's reported head does not match its entries")
    return result


async def compare_log_with_stores(
    audit: audit_pb2_grpc.AuditServiceAsyncStub,
    rows: list[Row],
    stores: Mapping[str, eventlog_pb2_grpc.EventLogServiceAsyncStub],
    progress: Callable[[int, int], None] | None,
    settle_s: float,
) -> tuple[dict[str, int], audit_pb2.LogInfo | None]:
    """Every store's events against the log's ``rows`` (fetched before the stores are
    listed, so every entry whose event a store holds finds it listed). Returns the events
    per service, and the log's info if more entries had to be fetched.

    A live platform keeps appending: an event stored after the log was fetched is not in it
    yet. While the only disagreement is store events the log lacks, fetch the log on (and the
    stores, for the events those new entries are) until ``settle_s`` has passed; events stored
    after the first listing must match if logged, but need not be logged yet."""
    listings = [StoreListing(name, stub) for name, stub in stores.items()]
    for listing in listings:
        await listing.read_on()
    required = {e.event_id for listing in listings for e in listing.events}
    logged = {Envelope.FromString(data).event_id for _, _, _, data in rows}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settle_s
    info = None
    while True:
        considered = [
            e
            for listing in listings
            for e in listing.events
            if e.event_id in required or e.event_id in logged
        ]
        try:
            return compare_with_stores(rows, considered), info
        except LogStoreMismatch as exc:
            if not exc.only_unlogged or loop.time() >= deadline:
                raise
        await asyncio.sleep(0.2)
        fetched = len(rows)
        info = await fetch_log(audit, rows, progress)
        logged |= {Envelope.FromString(data).event_id for _, _, _, data in rows[fetched:]}
        for listing in listings:
            await listing.read_on()


async def verify(
    audit: audit_pb2_grpc.AuditServiceAsyncStub,
    ledger: ledger_pb2_grpc.LedgerServiceAsyncStub,
    stores: Mapping[str, eventlog_pb2_grpc.EventLogServiceAsyncStub],
    progress: Callable[[int, int], None] | None = None,
    *,
    settle_s: float = SETTLE_S,
) -> dict[str, Any]:
    """Run every check; raises InvariantViolation at the first disagreement
    (:class:`LogStoreMismatch`, naming each event, when the log and ``stores`` disagree).

    ``stores`` is every service's ``EventLogService`` by service name (a log entry of a
    service not among them matches no store). ``progress(fetched, size)`` is called after
    each page of entries."""
    rows: list[Row] = []
    info = await fetch_log(audit, rows, progress)
    result = replay_checked(rows, info)
    reported: dict[str, budget.Pool] = {}
    for pool_id in result.pools:
        b = await ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=pool_id))
        reported[pool_id] = budget.pool_of(b)  # the pool's figures and each source's
    compare_pools(result.pools, reported)
    in_stores, later = await compare_log_with_stores(audit, rows, stores, progress, settle_s)
    if later is not None and len(rows) > result.size:
        # Entries fetched while waiting for the log: the chain must extend over them too (the
        # pools were compared at the first fetch; the ledger has moved on since).
        replay_checked(rows, later)
    return {
        "ok": True,
        "entries": result.size,
        "head_hash_hex": result.head.hex(),
        "events_by_service": result.events_by_service,
        "store_events_by_service": in_stores,
        "pools": {
            p.pool_id: {
                "funded_fen": p.funded,
                "available_fen": p.available,
                "reserved_fen": p.reserved,
                "spent_fen": p.spent,
            }
            for p in result.pools.values()
        },
    }


@app.command("verify")
def verify_command(
    audit: Annotated[
        str, typer.Option(help="audit service HOST:PORT (default: the local stack's)")
    ] = "",
    ledger: Annotated[
        str, typer.Option(help="ledger service HOST:PORT (default: the local stack's)")
    ] = "",
    catalog: Annotated[
        str, typer.Option(help="catalog service HOST:PORT (default: the local stack's)")
    ] = "",
    eligibility: Annotated[
        str, typer.Option(help="eligibility service HOST:PORT (default: the local stack's)")
    ] = "",
    settle_s: Annotated[
        float,
        typer.Option(
            "--settle-s",
            min=0,
            help="how long to wait for the log to receive events the stores already hold",
        ),
    ] = SETTLE_S,
    identity_dir: AuditorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Check the audit log's chain, the ledger's figures and every service's store against
    each other."""
    given = {"catalog": catalog, "eligibility": eligibility, "ledger": ledger, "audit": audit}
    addresses = {name: given[name] or local_address(name) for name in topology.SERVICE_NAMES}
    who = identity(identity_dir, AUDITOR_DEMO)

    async def run() -> dict[str, Any]:
        channels = {name: rpc.channel(addr, who) for name, addr in addresses.items()}
        try:
            # A bar on a terminal only: piped, audit verify prints nothing but its answer.
            with PhaseProgress(unit="entries", plain=False, quiet=json_only) as bar:
                return await verify(
                    audit_pb2_grpc.AuditServiceStub(channels["audit"]),
                    ledger_pb2_grpc.LedgerServiceStub(channels["ledger"]),
                    {n: eventlog_pb2_grpc.EventLogServiceStub(ch) for n, ch in channels.items()},
                    lambda done, total: bar.update("FETCH", done, total),
                    settle_s=settle_s,
                )
        finally:
            for ch in channels.values():
                await ch.close()

    try:
        emit(asyncio.run(run()))
    except LogStoreMismatch as exc:
        if not json_only:  # for people: one line per disagreement, then the JSON answer
            for line in str(exc).splitlines():
                note(line)
        emit(
            {
                "ok": False,
                "violation": f"the audit log and the services' stores disagree on"
                f" {len(exc.events)} events",
                "counts": exc.counts,
                "events": exc.shown,
                "more_events": exc.more,
            }
        )
        raise typer.Exit(EXIT_NO) from None
    except InvariantViolation as exc:
        emit({"ok": False, "violation": str(exc)})
        raise typer.Exit(EXIT_NO) from None
