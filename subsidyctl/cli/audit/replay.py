"""One ``audit verify`` run without its command line: the checkpoint and its signature, every
entry fetched and checked, the sampled inclusion proofs, the trusted checkpoint, the store
cross-check and every total compared (:func:`audit_log`), and the JSON report."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from services.audit.totals import Difference, PoolFold, compare
from services.audit.verify import LogAudit, Problem, Trusted
from services.invariants import EventDigest, InvariantViolation, LogStoreMismatch
from services.invariants import check_log_matches_stores as match_stores
from services.kernel.contract import merkle
from services.kernel.contract.checkpoint import (
    Checkpoint,
    NoteInvalid,
    VerifierKey,
    open_checkpoint,
    split_note,
)
from subsidy.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    catalog_pb2_grpc,
    eventlog_pb2,
    eventlog_pb2_grpc,
    ledger_pb2_grpc,
    usage_pb2_grpc,
)

from ..common import EXIT_NO, Failure
from .live import LIVE, PAGE, Sources

IN_FLIGHT = 4  # pages of entries requested at once (the service reads while we hash)
SAMPLE = 16  # inclusion proofs checked besides the first and last entry
PARALLEL_FROM = 50_000  # entries from which the events are folded in a second process
# How long verify waits for the log to receive store events it does not have yet: the log
# learns of an event through NATS, a moment after the store committed it.
SETTLE_S = 10.0
Progress = Callable[[str, int, int], None]
Keys = Callable[[str], Awaitable[list[VerifierKey]]]  # the trusted keys, given the origin


# -- fetching ---------------------------------------------------------------------------------
async def checked_envelopes(
    audit: audit_pb2_grpc.AuditServiceAsyncStub, progress: Progress | None = None
) -> list[bytes]:
    """Every entry's envelope bytes up to a fresh checkpoint, for a tool that reads the events
    (report daily --from-events, policy whatif): raises Failure when the entries' recomputed
    tree is not the checkpoint's (a changed, missing or added entry). The checkpoint's signature
    and the rest are ``audit verify``'s."""
    checkpoint = await audit.GetCheckpoint(audit_pb2.GetCheckpointRequest(fresh=True))
    size = checkpoint.tree_size
    in_flight = asyncio.Semaphore(IN_FLIGHT)
    fetched = [0]

    async def page(start: int) -> list[bytes]:
        request = audit_pb2.GetEntriesRequest(
            start=start, end=min(start + PAGE, size), bytes_only=True
        )
        async with in_flight:
            got = [e.envelope_bytes for e in (await audit.GetEntries(request)).entries]
        fetched[0] += len(got)
        if progress is not None:
            progress("FETCH", fetched[0], size)
        return got

    pages = await asyncio.gather(*(page(s) for s in range(0, size, PAGE)))
    data = [d for p in pages for d in p]
    if len(data) != size or merkle.root_of(map(merkle.leaf_hash, data)) != checkpoint.root_hash:
        raise Failure(
            f"the audit log's {len(data)} entries do not add up to its checkpoint of {size}:"
            " run subsidyctl audit verify",
            EXIT_NO,
        )
    return data


async def fetch_entries(
    audit: audit_pb2_grpc.AuditServiceAsyncStub,
    state: LogAudit,
    end: int,
    progress: Progress | None,
) -> None:
    """Entries ``[state.size, end)`` into ``state``, a page at a time by index (so a missing
    entry is seen where it is missing), a few pages in flight."""
    starts = iter(range(state.size, end, PAGE))
    pending: list[asyncio.Task[audit_pb2.GetEntriesResponse]] = []

    def request(start: int) -> asyncio.Task[audit_pb2.GetEntriesResponse]:
        req = audit_pb2.GetEntriesRequest(
            start=start, end=min(start + PAGE, end), bytes_only=True, packed=True
        )
        return asyncio.ensure_future(audit.GetEntries(req))

    for start in starts:
        pending.append(request(start))
        if len(pending) >= IN_FLIGHT:
            break
    try:
        while pending:
            page = await pending.pop(0)
            if (following := next(starts, None)) is not None:
                pending.append(request(following))
            if page.entries:  # a service from before the packed answer
                state.add(
                    (
                        e.index,
                        bytes.fromhex(e.leaf_hash_hex),
                        bytes.fromhex(e.chain_hash_hex),
                        e.envelope_bytes,
                    )
                    for e in page.entries
                )
            else:
                state.add_packed(
                    list(page.indexes), page.leaf_hashes, page.chain_hashes, list(page.envelopes)
                )
            if progress is not None:
                progress("FETCH", min(state.size, end), end)
    finally:
        for task in pending:
            task.cancel()


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


@dataclass
class Verification:
    """Everything one ``audit verify`` found."""

    signature_ok: bool | None = None
    checkpoint: Checkpoint | None = None
    note: str = ""
    published_at: str = ""
    consistent_with_trusted: bool | None = None
    proofs_checked: int = 0
    cross_check_ok: bool | None = None
    mismatch: LogStoreMismatch | None = None
    store_events_by_service: dict[str, int] = field(default_factory=dict)
    totals_compared: dict[str, int] = field(default_factory=dict)
    differences: list[Difference] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    pools: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (
            not self.problems
            and not self.differences
            and self.signature_ok is not False
            and self.consistent_with_trusted is not False
            and self.cross_check_ok is not False
        )


async def signed_checkpoint(
    audit: audit_pb2_grpc.AuditServiceAsyncStub, keys: Keys | None, found: Verification
) -> Checkpoint:
    """A fresh checkpoint, its signature checked with the trusted keys (None: not checked)."""
    reply = await audit.GetCheckpoint(audit_pb2.GetCheckpointRequest(fresh=True))
    found.note, found.published_at = reply.note, reply.published_at.ToJsonString()
    text, _ = split_note(reply.note)
    unverified = Checkpoint.parse(text)
    checkpoint = unverified
    if keys is not None:
        try:
            checkpoint = open_checkpoint(reply.note, await keys(unverified.origin))
            found.signature_ok = found.signature_ok is not False
        except NoteInvalid as exc:
            found.signature_ok = False
            found.problems.append(Problem("signature", f"the checkpoint's signature: {exc}"))
    if (checkpoint.size, checkpoint.root) != (reply.tree_size, reply.root_hash):
        found.problems.append(
            Problem("signature", "the checkpoint's note and its size and root fields differ")
        )
    return checkpoint


def sample_of(size: int, count: int) -> list[int]:
    """The entries whose inclusion proofs are checked: the first, the last, and ``count``
    chosen at random (so the service cannot tell which ones will be asked for)."""
    if size == 0:
        return []
    rnd = random.SystemRandom()
    return sorted({0, size - 1, *(rnd.randrange(size) for _ in range(count))})


async def check_inclusion_proofs(
    audit: audit_pb2_grpc.AuditServiceAsyncStub,
    state: LogAudit,
    checkpoint: Checkpoint,
    found: Verification,
) -> None:
    """The service's proofs for the sampled entries lead to the signed root from the leaves
    recomputed from the entries' bytes."""
    for index in sorted(state.leaves):
        proof = await audit.GetInclusionProof(
            audit_pb2.GetInclusionProofRequest(index=index, tree_size=checkpoint.size)
        )
        try:
            merkle.verify_inclusion(
                index, checkpoint.size, state.leaves[index], list(proof.hashes), checkpoint.root
            )
        except merkle.ProofInvalid as exc:
            found.problems.append(
                Problem("proof", f"the log's inclusion proof of entry {index}: {exc}", index)
            )
        found.proofs_checked += 1


async def check_trusted(
    audit: audit_pb2_grpc.AuditServiceAsyncStub,
    state: LogAudit,
    trusted: Trusted,
    checkpoint: Checkpoint,
    found: Verification,
) -> None:
    proof: list[bytes] | None = []
    if 0 < trusted.tree_size < checkpoint.size:
        try:
            reply = await audit.GetConsistencyProof(
                audit_pb2.GetConsistencyProofRequest(
                    old_size=trusted.tree_size, new_size=checkpoint.size
                )
            )
            proof = list(reply.hashes)
            found.proofs_checked += 1
        except grpc.aio.AioRpcError:
            proof = None
    problems = state.check_trusted(trusted, checkpoint, proof)
    found.problems += problems
    found.consistent_with_trusted = not problems


async def cross_check(
    src: Sources, state: LogAudit, found: Verification, progress: Progress | None, settle_s: float
) -> None:
    """Every store's events against the log's entries (fetched before the stores are listed,
    so every entry whose event a store holds finds it listed).

    A live platform keeps appending: an event stored after the log was fetched is not in it
    yet. While the only disagreement is store events the log lacks, fetch the log on (and the
    stores, for the events those new entries are) until ``settle_s`` has passed; events stored
    after the first listing must match if logged, but need not be logged yet."""
    listings = [StoreListing(name, stub) for name, stub in src.stores.items()]
    try:
        for listing in listings:
            await listing.read_on()
    except InvariantViolation as exc:  # an address that lists another service's store
        found.problems.append(Problem("stores", str(exc)))
        found.cross_check_ok = False
        return
    required = {e.event_id for listing in listings for e in listing.events}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settle_s
    while True:
        logged = {d.event_id for _, d in state.digests}
        considered = [
            e
            for listing in listings
            for e in listing.events
            if e.event_id in required or e.event_id in logged
        ]
        try:
            found.store_events_by_service = match_stores(
                considered, state.digests, skipped=state.skipped
            )
            found.cross_check_ok = True
            return
        except LogStoreMismatch as exc:
            if not exc.only_unlogged or loop.time() >= deadline:
                found.cross_check_ok, found.mismatch = False, exc
                return
        await asyncio.sleep(0.2)
        info = await src.audit.GetLogInfo(audit_pb2.GetLogInfoRequest())
        await fetch_entries(src.audit, state, info.size, progress)
        for listing in listings:
            await listing.read_on()


async def compare_totals(src: Sources, state: LogAudit, found: Verification) -> None:
    """Every fold's table against its service's figures."""
    for name, table in state.finish().items():
        if isinstance(table, InvariantViolation):
            found.problems.append(Problem("totals", str(table)))
            continue
        if name == PoolFold.name:
            # The pools' own rows (a source's row is keyed by pool and source).
            found.pools = {key[0]: figures for key, figures in table.items() if len(key) == 1}
        live = await LIVE[name](src, table)
        if live is None:
            continue  # no such service to ask (a caller that gave only some)
        found.totals_compared[name] = len(table.keys() | live.keys())
        found.differences += compare(name, table, live)


async def audit_log(
    src: Sources,
    *,
    keys: Keys | None,
    trusted: Trusted | None = None,
    progress: Progress | None = None,
    settle_s: float = SETTLE_S,
    sample: int = SAMPLE,
    parallel: bool | None = None,
) -> tuple[Verification, LogAudit]:
    """Run every check and collect every disagreement (nothing raises for a finding).

    ``parallel``: parse and fold the events in a second process while this one hashes
    (default: for a log of at least :data:`PARALLEL_FROM` entries, where the second core pays
    for the process's start)."""
    found = Verification()
    checkpoint = await signed_checkpoint(src.audit, keys, found)
    state = LogAudit(
        trusted.tree_size if trusted else 0,
        sample_of(checkpoint.size, sample),
        digests=bool(src.stores),
        parallel=checkpoint.size >= PARALLEL_FROM if parallel is None else parallel,
    )
    try:
        await fetch_entries(src.audit, state, checkpoint.size, progress)
        found.problems += state.check_checkpoint(checkpoint)
        if not state.broken:
            await check_inclusion_proofs(src.audit, state, checkpoint, found)
        if trusted is not None:
            await check_trusted(src.audit, state, trusted, checkpoint, found)
        if src.stores:
            if progress is not None:
                progress("STORES", 0, 1)
            await cross_check(src, state, found, progress, settle_s)
            if state.size > checkpoint.size and not state.broken:
                # Entries fetched while waiting for the log: a later signed checkpoint must cover
                # them, extend the first one, and be their root.
                later = await signed_checkpoint(src.audit, keys, found)
                await fetch_entries(src.audit, state, later.size, progress)
                found.problems += state.check_checkpoint(later)
                if checkpoint.size:
                    reply = await src.audit.GetConsistencyProof(
                        audit_pb2.GetConsistencyProofRequest(
                            old_size=checkpoint.size, new_size=later.size
                        )
                    )
                    try:
                        merkle.verify_consistency(
                            checkpoint.size,
                            later.size,
                            checkpoint.root,
                            later.root,
                            list(reply.hashes),
                        )
                    except merkle.ProofInvalid as exc:
                        found.problems.append(
                            Problem("tree", f"the log moved on inconsistently: {exc}")
                        )
                checkpoint = later
        found.checkpoint = checkpoint
        if progress is not None:
            progress("TOTALS", 0, 1)
        await compare_totals(src, state, found)
        found.problems[:0] = state.problems  # each entry's own findings first, by position
    finally:
        state.close()  # the replay's second process, if it has one
    return found, state


def report(found: Verification, state: LogAudit) -> dict[str, Any]:
    """The one JSON object ``audit verify`` prints."""
    cp = found.checkpoint
    out: dict[str, Any] = {
        "ok": found.ok,
        "tree_size": cp.size if cp else 0,
        "root_hex": cp.root.hex() if cp else "",
        "origin": cp.origin if cp else "",
        "checkpoint_published_at": found.published_at,
        "signature_ok": found.signature_ok,
        "consistent_with_trusted": found.consistent_with_trusted,
        "cross_check_ok": found.cross_check_ok,
        "proofs_checked": found.proofs_checked,
        "totals_compared": found.totals_compared,
        "differences": [p.as_json() for p in found.problems]
        + [d.as_json() for d in found.differences],
        "entries": state.size,
        "head_hash_hex": state.head.hex(),
        "events_by_service": dict(sorted(state.events_by_service.items())),
        "store_events_by_service": found.store_events_by_service,
        "pools": found.pools,
    }
    if found.mismatch is not None:
        exc = found.mismatch
        out["violation"] = (
            f"the audit log and the services' stores disagree on {len(exc.events)} events"
        )
        out |= {"counts": exc.counts, "events": exc.shown, "more_events": exc.more}
        out["differences"] += [
            {"check": "stores", "position": None, "message": line}
            for line in [*exc.counts, *exc.shown]
        ]
    return out


async def verify(
    audit: audit_pb2_grpc.AuditServiceAsyncStub,
    ledger: ledger_pb2_grpc.LedgerServiceAsyncStub,
    stores: Mapping[str, eventlog_pb2_grpc.EventLogServiceAsyncStub],
    progress: Callable[[int, int], None] | None = None,
    *,
    settle_s: float = SETTLE_S,
    catalog: catalog_pb2_grpc.CatalogServiceAsyncStub | None = None,
    usage: usage_pb2_grpc.UsageServiceAsyncStub | None = None,
    keys: Sequence[VerifierKey] | None = None,
) -> dict[str, Any]:
    """:func:`audit_log` for tests and scripts: the report when everything agrees; raises
    :class:`LogStoreMismatch` (naming each event) when the log and ``stores`` disagree, and
    :class:`InvariantViolation` with the first other finding. Without ``keys`` the checkpoint's
    signature is not checked (``signature_ok`` is None); ``subsidyctl audit verify`` always
    checks it."""

    def bar(phase: str, done: int, total: int) -> None:
        if progress is not None and phase == "FETCH":
            progress(done, total)

    async def given(_: str) -> list[VerifierKey]:
        return list(keys or ())

    src = Sources(audit, ledger, catalog, usage, stores)
    found, state = await audit_log(
        src, keys=given if keys is not None else None, progress=bar, settle_s=settle_s
    )
    if found.mismatch is not None:
        raise found.mismatch
    if not found.ok:
        first = [p.message for p in found.problems] + [d.describe() for d in found.differences]
        raise InvariantViolation(first[0] if first else "the checkpoint's signature")
    return report(found, state)


def read_trusted(path: Path | None) -> Trusted | None:
    if path is None or not path.exists():
        return None
    try:
        return Trusted.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise Failure(f"{path} is not a trusted state audit verify wrote: {exc}") from None


def write_trusted(path: Path, trusted: Trusted) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(trusted.as_json(), indent=1) + "\n")
    tmp.replace(path)  # never a half-written trusted state
