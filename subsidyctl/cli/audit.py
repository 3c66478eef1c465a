"""Auditor commands: ``audit verify`` checks the whole log, ``audit prove`` proves one order's
entries, ``audit key`` prints the key checkpoints are signed with (docs/audit.md).

``verify`` asks the audit service for a fresh signed checkpoint and checks its signature with a
key the auditor pinned (``--key FILE``, or read from Vault transit), fetches every entry the
checkpoint covers (a Rich progress bar on a terminal), recomputes each leaf and the tree's root,
checks a sample of the service's inclusion proofs, checks that the log extends the checkpoint it
trusted last time (``--trusted FILE``, written after every run that passes), cross-checks the
log with every service's own store (``EventLogService``), and rebuilds from the events alone
every total the services report (budget pools, daily quotas, per-person usage, the sales
ledger: :mod:`services.audit.totals`), comparing each with the live service. It prints one JSON
object (``ok``, ``tree_size``, ``root_hex``, ``signature_ok``, ``consistent_with_trusted``,
``cross_check_ok``, ``totals_compared``, ``differences``, ...) and exits 1 when anything is off.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import grpc
import hvac
import typer

from services.audit.totals import Difference, PoolFold, Table, compare, pool_table
from services.audit.verify import LogAudit, Problem, Trusted
from services.invariants import EventDigest, InvariantViolation, LogStoreMismatch
from services.invariants import check_log_matches_stores as match_stores
from services.kernel import rpc, topology, vault
from services.kernel.contract import budget, merkle
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
    catalog_pb2,
    catalog_pb2_grpc,
    eventlog_pb2,
    eventlog_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)

from ..localstack import Ports
from ..stack.certs import AUDITOR_DEMO
from .common import (
    EXIT_NO,
    AuditorIdentityOpt,
    Failure,
    JsonOpt,
    emit,
    identity,
    local_address,
    note,
    run_dir,
)
from .progress import PhaseProgress

app = typer.Typer(name="audit", help="Auditor commands.", no_args_is_help=True)
PAGE = 1000
IN_FLIGHT = 4  # pages of entries requested at once (the service reads while we hash)
SAMPLE = 16  # inclusion proofs checked besides the first and last entry
# How long verify waits for the log to receive store events it does not have yet: the log
# learns of an event through NATS, a moment after the store committed it.
SETTLE_S = 10.0
DEFAULT_ORIGIN = "subsidy.local/audit"
Progress = Callable[[str, int, int], None]
Keys = Callable[[str], Awaitable[list[VerifierKey]]]  # the trusted keys, given the origin


@dataclass
class Sources:
    """Where the auditor reads: the audit log, and each service's read RPCs and store."""

    audit: audit_pb2_grpc.AuditServiceAsyncStub
    ledger: ledger_pb2_grpc.LedgerServiceAsyncStub | None = None
    catalog: catalog_pb2_grpc.CatalogServiceAsyncStub | None = None
    usage: usage_pb2_grpc.UsageServiceAsyncStub | None = None
    stores: Mapping[str, eventlog_pb2_grpc.EventLogServiceAsyncStub] = field(default_factory=dict)


# -- the live side of each total: the owning service's own figures ----------------------------
async def live_pools(src: Sources, log: Table) -> Table | None:
    """Each pool the log has, as the ledger reports it (GetBudget)."""
    if src.ledger is None:
        return None
    pools: list[budget.Pool] = []
    for pool_id in sorted({key[0] for key in log}):
        try:
            b = await src.ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=pool_id))
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
            continue
        pools.append(budget.pool_of(b))  # the pool's figures and each source's
    return pool_table(pools)


async def live_quotas(src: Sources, log: Table) -> Table | None:
    if src.usage is None:
        return None
    out: Table = {}
    cursor = ""
    while True:
        page = await src.usage.ListQuotaUsage(usage_pb2.ListUsageRequest(cursor=cursor, limit=PAGE))
        out |= {(r.category, r.day): {"issued": r.issued} for r in page.rows}
        if not (cursor := page.next_cursor):
            return out


async def live_persons(src: Sources, log: Table) -> Table | None:
    if src.usage is None:
        return None
    out: Table = {}
    cursor = ""
    while True:
        page = await src.usage.ListPersonUsage(
            usage_pb2.ListUsageRequest(cursor=cursor, limit=PAGE)
        )
        out |= {(r.id_number_index, r.category): dict(r.by_status) for r in page.rows}
        if not (cursor := page.next_cursor):
            return out


async def live_sales(src: Sources, log: Table) -> Table | None:
    if src.catalog is None:
        return None
    ledger = await src.catalog.GetSalesLedger(catalog_pb2.GetSalesLedgerRequest())
    return {
        (r.merchant_id, r.sku): {
            "sold_units": r.sold_units,
            "sales_fen": r.sales_fen,
            "subsidy_fen": r.subsidy_fen,
            "refunded_units": r.refunded_units,
            "refunded_sales_fen": r.refunded_sales_fen,
            "refunded_subsidy_fen": r.refunded_subsidy_fen,
        }
        for r in ledger.rows
    }


# One reader per fold of services.audit.totals.FOLDS: a new total adds its fold there and its
# reader here.
LIVE: dict[str, Callable[[Sources, Table], Awaitable[Table | None]]] = {
    "pool": live_pools,
    "quota": live_quotas,
    "person": live_persons,
    "sales": live_sales,
}


# -- fetching ---------------------------------------------------------------------------------
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
        req = audit_pb2.GetEntriesRequest(start=start, end=min(start + PAGE, end), bytes_only=True)
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
            state.add(
                (
                    e.index,
                    bytes.fromhex(e.leaf_hash_hex),
                    bytes.fromhex(e.chain_hash_hex),
                    e.envelope_bytes,
                )
                for e in page.entries
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
    folds = state.rebuild.finish()
    for name, fold in folds.items():
        try:
            table = fold.table()
        except InvariantViolation as exc:
            found.problems.append(Problem("totals", str(exc)))
            continue
        if isinstance(fold, PoolFold):
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
) -> tuple[Verification, LogAudit]:
    """Run every check and collect every disagreement (nothing raises for a finding)."""
    found = Verification()
    checkpoint = await signed_checkpoint(src.audit, keys, found)
    state = LogAudit(
        trusted.tree_size if trusted else 0,
        sample_of(checkpoint.size, sample),
        digests=bool(src.stores),
    )
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
                        checkpoint.size, later.size, checkpoint.root, later.root, list(reply.hashes)
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


# -- keys -------------------------------------------------------------------------------------
def keys_from_file(path: Path) -> list[VerifierKey]:
    """The verifier keys in a file, one vkey a line (``#`` comments and blank lines allowed)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise Failure(f"cannot read the key file {path}: {exc.strerror}") from None
    try:
        return [VerifierKey.parse(ln) for ln in lines if ln.strip() and not ln.startswith("#")]
    except NoteInvalid as exc:
        raise Failure(f"{path}: {exc}") from None


def keys_from_vault(addr: str, token: str, mount: str, origin: str) -> list[VerifierKey]:
    """The tree-head key's public keys as Vault transit publishes them (every version)."""
    try:
        client = vault.Vault(hvac.Client(url=addr, token=token, timeout=10), mount)
        public = client.tree_head_public_keys_sync()
    except vault.VaultUnavailable as exc:
        raise Failure(f"cannot read the tree-head key from Vault at {addr}: {exc}") from None
    return [VerifierKey(origin, pk) for _, pk in sorted(public.items())]


def key_source(
    key_file: Path | None, vault_addr: str, vault_token_file: Path | None, mount: str
) -> Callable[[str], list[VerifierKey]]:
    """Where the trusted keys come from: a pinned file, the given Vault, or the local stack's
    Vault (its root token in the run folder, as ``certs issue`` reads it)."""

    def resolve(origin: str) -> list[VerifierKey]:
        if key_file is not None:
            return keys_from_file(key_file)
        if vault_addr:
            if vault_token_file is None:
                raise Failure("--vault-addr needs --vault-token-file (a token that may read it)")
            return keys_from_vault(vault_addr, _read_token(vault_token_file), mount, origin)
        from .certs import TOKEN_FILE

        token_file = run_dir() / TOKEN_FILE
        if not token_file.exists():
            raise Failure(
                "no key to check the checkpoint with: pass --key FILE (the log's vkey, "
                "docs/audit.md) or --vault-addr and --vault-token-file"
            )
        local = f"http://127.0.0.1:{Ports(_base()).bao}"
        return keys_from_vault(local, _read_token(token_file), mount, origin)

    return resolve


def _base() -> int:
    from .common import base_port

    return base_port()


def _read_token(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise Failure(f"cannot read the Vault token file {path}: {exc.strerror}") from None


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


KeyOpt = Annotated[
    Path | None,
    typer.Option(
        "--key",
        dir_okay=False,
        help="the log's verifier key (a C2SP vkey line, as `audit key` prints it) to check "
        "checkpoints with; default: read it from Vault (--vault-addr, or the local stack's)",
    ),
]
VaultAddrOpt = Annotated[
    str, typer.Option("--vault-addr", help="read the tree-head public key from this Vault")
]
VaultTokenOpt = Annotated[
    Path | None,
    typer.Option(
        "--vault-token-file",
        dir_okay=False,
        help="a Vault token that may read transit/keys/subsidy-tree-head",
    ),
]
MountOpt = Annotated[str, typer.Option("--transit-mount", help="Vault's transit mount")]
AuditAddrOpt = Annotated[
    str, typer.Option(help="audit service HOST:PORT (default: the local stack's)")
]


@app.command("verify")
def verify_command(
    audit: AuditAddrOpt = "",
    ledger: Annotated[
        str, typer.Option(help="ledger service HOST:PORT (default: the local stack's)")
    ] = "",
    catalog: Annotated[
        str, typer.Option(help="catalog service HOST:PORT (default: the local stack's)")
    ] = "",
    eligibility: Annotated[
        str, typer.Option(help="eligibility service HOST:PORT (default: the local stack's)")
    ] = "",
    trusted_file: Annotated[
        Path | None,
        typer.Option(
            "--trusted",
            dir_okay=False,
            help="the trusted state of the last run: the log must extend it; written (or "
            "created) after every run that passes",
        ),
    ] = None,
    key_file: KeyOpt = None,
    vault_addr: VaultAddrOpt = "",
    vault_token_file: VaultTokenOpt = None,
    transit_mount: MountOpt = "transit",
    sample: Annotated[
        int, typer.Option(min=0, max=1000, help="random entries whose inclusion proofs are checked")
    ] = SAMPLE,
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
    """Check the audit log's signed tree, its history, every service's store and every total
    the services report against each other."""
    given = {"catalog": catalog, "eligibility": eligibility, "ledger": ledger, "audit": audit}
    addresses = {name: given[name] or local_address(name) for name in topology.SERVICE_NAMES}
    who = identity(identity_dir, AUDITOR_DEMO)
    resolve = key_source(key_file, vault_addr, vault_token_file, transit_mount)
    trusted = read_trusted(trusted_file)

    async def keys(origin: str) -> list[VerifierKey]:
        return await asyncio.to_thread(resolve, origin)

    async def run() -> dict[str, Any]:
        channels = {name: rpc.channel(addr, who) for name, addr in addresses.items()}
        try:
            src = Sources(
                audit_pb2_grpc.AuditServiceStub(channels["audit"]),
                ledger_pb2_grpc.LedgerServiceStub(channels["ledger"]),
                catalog_pb2_grpc.CatalogServiceStub(channels["catalog"]),
                usage_pb2_grpc.UsageServiceStub(channels["eligibility"]),
                {n: eventlog_pb2_grpc.EventLogServiceStub(ch) for n, ch in channels.items()},
            )
            # A bar on a terminal only: piped, audit verify prints nothing but its answer.
            with PhaseProgress(unit="entries", plain=False, quiet=json_only) as bar:
                found, state = await audit_log(
                    src,
                    keys=keys,
                    trusted=trusted,
                    progress=bar.update,
                    settle_s=settle_s,
                    sample=sample,
                )
        finally:
            for ch in channels.values():
                await ch.close()
        answer = report(found, state)
        if trusted_file is not None:
            answer["trusted"] = {
                "file": str(trusted_file),
                "tree_size": trusted.tree_size if trusted else None,
                "written": False,
            }
            if found.ok and found.checkpoint is not None:
                write_trusted(trusted_file, state.trusted_state(found.note, found.checkpoint))
                answer["trusted"]["written"] = True
        return answer

    answer = asyncio.run(run())
    if not json_only:  # for people: one line per disagreement, then the JSON answer
        for d in answer["differences"]:
            note(d["message"])
    emit(answer)
    if not answer["ok"]:
        raise typer.Exit(EXIT_NO)


# -- prove ------------------------------------------------------------------------------------
async def prove(audit: audit_pb2_grpc.AuditServiceAsyncStub, order_id: str) -> dict[str, Any]:
    """The entries naming ``order_id``, each with its inclusion proof against a fresh signed
    checkpoint: everything ``subsidyctl/verify_proof.py`` needs, offline."""
    cp = await audit.GetCheckpoint(audit_pb2.GetCheckpointRequest(fresh=True))
    page = await audit.ListOrderEntries(audit_pb2.ListOrderEntriesRequest(order_id=order_id))
    entries = []
    for e in page.entries:
        if e.index >= cp.tree_size:
            continue
        proof = await audit.GetInclusionProof(
            audit_pb2.GetInclusionProofRequest(index=e.index, tree_size=cp.tree_size)
        )
        leaf = merkle.leaf_hash(e.envelope_bytes)
        merkle.verify_inclusion(e.index, cp.tree_size, leaf, list(proof.hashes), cp.root_hash)
        entries.append(
            {
                "index": e.index,
                "event_type": e.envelope.event_type,  # labels for people; the bytes are proved
                "event_id": e.envelope.event_id,
                "service": e.envelope.service,
                "envelope_b64": base64.b64encode(e.envelope_bytes).decode(),
                "proof_b64": [base64.b64encode(h).decode() for h in proof.hashes],
            }
        )
    return {
        "order_id": order_id,
        "tree_size": cp.tree_size,
        "root_hex": cp.root_hash.hex(),
        "checkpoint": cp.note,
        "entries": entries,
    }


@app.command("prove")
def prove_command(
    order: Annotated[str, typer.Option("--order", help="the platform's order id")],
    audit: AuditAddrOpt = "",
    out: Annotated[
        Path | None, typer.Option(dir_okay=False, help="also write the proof to this file")
    ] = None,
    identity_dir: AuditorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Print one order's entries with their inclusion proofs against the current signed
    checkpoint; `python subsidyctl/verify_proof.py FILE --key VKEY` checks them offline."""
    who = identity(identity_dir, AUDITOR_DEMO)

    async def run() -> dict[str, Any]:
        channel = rpc.channel(audit or local_address("audit"), who)
        try:
            return await prove(audit_pb2_grpc.AuditServiceStub(channel), order)
        finally:
            await channel.close()

    answer = asyncio.run(run())
    if out is not None:
        out.write_text(json.dumps(answer, indent=1, ensure_ascii=False) + "\n")
    if not json_only and not answer["entries"]:
        note(f"no entry of the audit log names order {order}")
    emit(answer)
    if not answer["entries"]:
        raise typer.Exit(EXIT_NO)


# -- key --------------------------------------------------------------------------------------
@app.command("key")
def key_command(
    origin: Annotated[
        str, typer.Option(help="the log's origin (SUBSIDY_AUDIT_ORIGIN of its audit service)")
    ] = DEFAULT_ORIGIN,
    vault_addr: VaultAddrOpt = "",
    vault_token_file: VaultTokenOpt = None,
    transit_mount: MountOpt = "transit",
    out: Annotated[
        Path | None, typer.Option(dir_okay=False, help="write the vkeys to this file to pin")
    ] = None,
    json_only: JsonOpt = False,
) -> None:
    """Print the verifier key (C2SP vkey) of every version of the tree-head signing key, read
    from Vault transit: what an auditor pins and passes as ``--key``."""
    keys = key_source(None, vault_addr, vault_token_file, transit_mount)(origin)
    if out is not None:
        out.write_text("".join(f"{k.encode()}\n" for k in keys))
    emit({"origin": origin, "vkeys": [k.encode() for k in keys]})
