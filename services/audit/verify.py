"""What an auditor checks: the log's tree and signed checkpoint, its history against what they
trusted before, the money and every other total, and the log against every service's store.

Nothing here trusts the audit service: each entry's leaf is recomputed from its bytes, the tree
is recomputed from the leaves (:class:`LogAudit`), the checkpoint's signature is checked with a
key the auditor pinned, and the trusted state of the last run (:class:`Trusted`: a checkpoint
and the right edge of its tree) tells whether today's log extends what was seen then. Every
disagreement is a :class:`Problem` with its position in the log where it has one.

The totals are rebuilt from the events alone (:mod:`services.audit.totals`); the budget pools
through the fold the ledger decides with (:mod:`services.kernel.contract.budget`), which checks
the budget invariant after every event. The tree proves the log was not changed *after* an
entry was written, not that the entry was true: :func:`compare_with_stores` checks each entry
against the store of the service that wrote the event (an entry forged on the bus, or written
into the log's database and re-hashed, matches no stored event).
"""

from __future__ import annotations

import gc
import hashlib
import pickle
import queue
import subprocess
import sys
import threading
import traceback
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from google.protobuf.message import DecodeError

from services.invariants import EventDigest, InvariantViolation, check_log_matches_stores
from services.kernel.contract import budget, merkle
from services.kernel.contract.budget import POOL_STREAM_PREFIX
from services.kernel.contract.checkpoint import Checkpoint
from services.kernel.contract.merkle import CompactRange, ProofInvalid
from services.kernel.events import Envelope, check_actor
from subsidy.v1 import common_pb2
from subsidy.v1 import events_pb2 as ev

from .domain import GENESIS, chain_hash, leaf_hash
from .totals import Fold, PoolFold, Rebuild, Table

POOL_STREAM = POOL_STREAM_PREFIX
SKIPPED = ev.OutboxEventSkipped.DESCRIPTOR.full_name
Row = tuple[int, bytes, bytes, bytes]  # (index, leaf hash, chain hash, envelope bytes)
HASH = merkle.HASH_SIZE
QUEUED_PAGES = 4  # pages handed to the replay process's pipe ahead of its reading


@dataclass
class Replay:
    """The outcome of replaying the log: its size and head, and every pool's figures."""

    size: int = 0
    head: bytes = GENESIS
    pools: dict[str, budget.Pool] = field(default_factory=dict)
    events_by_service: dict[str, int] = field(default_factory=dict)


def replay(entries: Iterable[Row]) -> Replay:
    """Replay ``(index, leaf hash, chain hash, envelope bytes)`` from index 0, in order; raise
    :class:`InvariantViolation` at the first entry out of place or off the chain, or whose
    event the store would have refused (:func:`check_entry_actor`), or a pool whose events do
    not add up.

    The log records events in the order they reached the audit service, which after a crash or
    a redelivery is not the order they happened in; each budget pool is therefore folded in its
    own stream's version order, and a missing version is a violation.
    """
    out = Replay()
    pools = PoolFold()
    folds = Rebuild([pools])
    for idx, leaf, chained, data in entries:
        if idx != out.size:
            raise InvariantViolation(f"audit entry {idx} out of order (expected {out.size})")
        if leaf_hash(data) != leaf or chain_hash(out.head, leaf) != chained:
            raise InvariantViolation(f"audit entry {idx} does not match its hash chain")
        out.head, out.size = chained, out.size + 1
        env = Envelope.FromString(data)
        check_entry_actor(idx, env)
        out.events_by_service[env.service] = out.events_by_service.get(env.service, 0) + 1
        folds.add(env)
    folds.finish()
    out.pools = pools.pools()
    return out


def check_entry_actor(idx: int, env: Envelope) -> None:
    """Entry ``idx``'s event against what the store enforces at every append
    (:func:`services.kernel.events.check_actor`, i.e.
    :func:`services.invariants.check_machine_event`: a person is never the actor of an event
    only platforms and services cause); raises :class:`InvariantViolation` as
    :func:`refused_at_append` words it."""
    try:
        check_actor(env)
    except InvariantViolation as exc:
        raise InvariantViolation(refused_at_append(idx, env, exc)) from None


def refused_at_append(idx: int, env: Envelope, exc: InvariantViolation) -> str:
    """The finding for entry ``idx``, whose event the store would have refused at append
    (``exc``): it was written around the store (a row inserted straight into a service's
    events table, a message forged on the bus). Names the entry, its event (id, service,
    stream, version, type) and its actor's kind, never the actor's id."""
    event = EventDigest(
        env.service, env.event_id, "", env.stream_id, env.stream_version, env.event_type
    )
    kind = common_pb2.Actor.Kind.Name(env.actor.kind).removeprefix("KIND_").lower()
    return (
        f"audit entry {idx}: event {event.described()}: {exc} (actor kind {kind}); the store"
        " refuses such an event at append, so it was written around the store"
    )


def compare_pools(replayed: dict[str, budget.Pool], reported: dict[str, budget.Pool]) -> None:
    """The ledger's figures must be exactly what the log's events add up to."""
    for pool_id in sorted(replayed.keys() | reported.keys()):
        if replayed.get(pool_id) != reported.get(pool_id):
            raise InvariantViolation(
                f"pool {pool_id}: the log adds up to {replayed.get(pool_id)},"
                f" the ledger reports {reported.get(pool_id)}"
            )


def digest_of(env: Envelope, data: bytes) -> EventDigest:
    """An entry as the log-to-store cross-check compares it."""
    return EventDigest(
        env.service,
        env.event_id,
        hashlib.sha256(data).hexdigest(),
        env.stream_id,
        env.stream_version,
        env.event_type,
    )


def skip_named(env: Envelope) -> str | None:
    """The event an ``OutboxEventSkipped`` entry says its service's outbox let pass."""
    if env.event_type != SKIPPED:
        return None
    return str(ev.OutboxEventSkipped.FromString(env.payload).event_id)


def compare_with_stores(entries: Iterable[Row], stored: Iterable[EventDigest]) -> dict[str, int]:
    """Cross-check the log's ``(index, leaf hash, chain hash, envelope bytes)`` entries with
    every event the services' stores list (``stored``, each with the SHA-256 of its stored
    envelope bytes): see :func:`services.invariants.check_log_matches_stores`, which raises
    :class:`~services.invariants.LogStoreMismatch` naming every event that differs. A stored
    event the log lacks because an operator skipped it at the outbox (the log holds that
    service's ``OutboxEventSkipped`` naming it) is accounted for. Returns the events per
    service."""
    logged = []
    skipped: dict[str, tuple[str, str]] = {}
    for idx, _, _, data in entries:
        env = Envelope.FromString(data)
        if (stuck := skip_named(env)) is not None:
            skipped[stuck] = (env.service, env.event_id)
        logged.append((idx, digest_of(env, data)))
    return check_log_matches_stores(stored, logged, skipped=skipped)


# -- the tree, the checkpoint and the trusted state --------------------------------------------
@dataclass(frozen=True)
class Problem:
    """One thing that is off: which check found it, where in the log (if it has a place), and
    what, in words."""

    check: str  # signature, tree, trusted, proof, actor, stores, totals
    message: str
    position: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {"check": self.check, "position": self.position, "message": self.message}


@dataclass(frozen=True)
class Trusted:
    """What the auditor verified last time: the signed checkpoint, and its tree's right edge
    (the roots of the complete subtrees that tile it), which also tells *where* a later log
    differs from it."""

    note: str
    tree_size: int
    root: bytes
    right_edge: tuple[bytes, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "note": self.note,
            "tree_size": self.tree_size,
            "root_hex": self.root.hex(),
            "right_edge_hex": [h.hex() for h in self.right_edge],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Trusted:
        """Read a trusted state; its right edge must be the tree of its root."""
        trusted = cls(
            str(data["note"]),
            int(data["tree_size"]),
            bytes.fromhex(data["root_hex"]),
            tuple(bytes.fromhex(h) for h in data["right_edge_hex"]),
        )
        edge = CompactRange(trusted.tree_size, list(trusted.right_edge))
        if len(edge.nodes()) != len(trusted.right_edge) or edge.root() != trusted.root:
            raise ValueError("the trusted state's right edge is not the tree of its root")
        return trusted


def first_difference(size: int, mine: Sequence[bytes], theirs: Sequence[bytes]) -> range:
    """Where two trees of ``size`` leaves differ, from their right edges: the leaves of the
    first complete subtree whose hashes disagree."""
    for (level, index), a, b in zip(merkle.range_nodes(0, size), mine, theirs, strict=True):
        if a != b:
            return range(index << level, (index + 1) << level)
    raise ValueError("the two right edges are equal")


def _span(r: range) -> str:
    return f"entry {r.start}" if len(r) == 1 else f"entries {r.start}..{r.stop - 1}"


def tables_of(folds: dict[str, Fold]) -> dict[str, Table | InvariantViolation]:
    """Each fold's table, or the violation its events show."""
    out: dict[str, Table | InvariantViolation] = {}
    for name, fold in folds.items():
        try:
            out[name] = fold.table()
        except InvariantViolation as exc:
            out[name] = exc
    return out


class EventReplay:
    """What the auditor makes of the entries' events, once their bytes are checked: each
    envelope parsed (an entry that is not one is a problem at its position), each event checked
    as the store checks it at append (:func:`check_entry_actor`: a finding at its position),
    the events per service, the digests the stores are compared with, the events an outbox
    skipped, and the totals' rebuild. :class:`LogAudit` runs one in its own process, or in a
    second process (:class:`ReplayProcess`) for a large log, so that hashing and folding use
    both cores."""

    def __init__(self, digests: bool = True) -> None:
        self.keep_digests = digests  # only the cross-check with the stores needs them
        self.events_by_service: Counter[str] = Counter()
        self.digests: list[tuple[int, EventDigest]] = []
        self.skipped: dict[str, tuple[str, str]] = {}
        # (the entry's ordinal among those LogAudit took, the problem): merged in that order
        self.problems: list[tuple[int, Problem]] = []
        self.rebuild = Rebuild(arrivals={SKIPPED: self._skipped})

    def _skipped(self, env: Envelope) -> None:
        if (stuck := skip_named(env)) is not None:
            self.skipped[stuck] = (env.service, env.event_id)

    def add(self, ordinal: int, indexes: Sequence[int], envelopes: Sequence[bytes]) -> None:
        """The next entries LogAudit took (``ordinal``: the first one's among them)."""
        parse = Envelope.FromString
        kept: Sequence[int] = range(len(envelopes))  # the entries parsed (positions in the page)
        try:
            parsed = [parse(data) for data in envelopes]  # the usual case: all of them parse
        except DecodeError:
            parsed, kept = self._parse_each(ordinal, indexes, envelopes)
        problems = self.problems
        for at, env in zip(kept, parsed, strict=True):  # what the store refuses at append
            try:
                check_actor(env)
            except InvariantViolation as exc:
                message = refused_at_append(indexes[at], env, exc)
                problems.append((ordinal + at, Problem("actor", message, indexes[at])))
        if self.keep_digests:
            self.digests += [
                (indexes[at], digest_of(env, envelopes[at]))
                for at, env in zip(kept, parsed, strict=True)
            ]
        self.rebuild.add_all(parsed, self.events_by_service)

    def _parse_each(
        self, ordinal: int, indexes: Sequence[int], envelopes: Sequence[bytes]
    ) -> tuple[list[Envelope], list[int]]:
        """The envelopes that parse and their positions in the page; each entry that is not
        one is a problem at its position."""
        parsed: list[Envelope] = []
        kept: list[int] = []
        for at, (idx, data) in enumerate(zip(indexes, envelopes, strict=True)):
            try:
                parsed.append(Envelope.FromString(data))
            except DecodeError:
                self.problems.append(
                    (
                        ordinal + at,
                        Problem("tree", f"audit entry {idx} is not an event envelope", idx),
                    )
                )
                continue
            kept.append(at)
        return parsed, kept

    def sync(self) -> None:
        """Nothing to fetch: everything added is here already."""

    def finish(self) -> dict[str, Table | InvariantViolation]:
        """Every fold's table, after what still waits for an earlier version
        (:meth:`Rebuild.finish`), or the violation that fold found instead."""
        return tables_of(self.rebuild.finish())

    def close(self) -> None:
        """Nothing to stop."""


def serve_replay(source: BinaryIO, sink: BinaryIO, digests: bool) -> None:
    """The second process of :class:`ReplayProcess` (``python -m services.audit.replay``): an
    :class:`EventReplay` fed with pickled messages on ``source``. Answers ``sync`` on ``sink``
    with what was found since the last answer, and ``finish`` with that and the folds; a
    failure is answered with its traceback, never silence."""
    # No cyclic garbage collection in this short-lived process: the folds hold a million small
    # objects that never form cycles, and every full collection walked them all (it was about
    # 40 % of this process's time over a million events; freed objects still go at once).
    gc.disable()
    replay = EventReplay(digests)
    sent = (0, 0)  # digests and problems already sent

    def news() -> tuple[Any, ...]:
        nonlocal sent
        found = (
            replay.digests[sent[0] :],
            replay.problems[sent[1] :],
            replay.skipped,
            replay.events_by_service,
        )
        sent = (len(replay.digests), len(replay.problems))
        return found

    def answer(message: tuple[Any, ...]) -> None:
        pickle.dump(message, sink, protocol=pickle.HIGHEST_PROTOCOL)
        sink.flush()

    try:
        while True:
            try:
                message = pickle.load(source)
            except EOFError:  # the auditor went away
                return
            if message[0] == "add":
                replay.add(*message[1:])
            elif message[0] == "sync":
                answer(("ok", news()))
            else:  # finish
                found = news()
                answer(("ok", (*found, replay.finish())))
                return
    except Exception:  # handed to the auditor, who raises it
        answer(("error", traceback.format_exc()))


class ReplayProcess:
    """An :class:`EventReplay` in a second process (a fresh interpreter: nothing of this
    process's gRPC or event loop is inherited): entries are pickled to it over a pipe as they
    are checked, and what the replay found comes back at :meth:`sync` and :meth:`finish`. The
    same code folds the same events in the same order as in one process; only where it runs
    differs."""

    def __init__(self, digests: bool = True) -> None:
        # The child imports this package from where this process did, whatever its sys.path:
        # `python -m` puts its working directory first on the path.
        root = str(Path(__file__).resolve().parents[2])
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "services.audit.replay", "1" if digests else "0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=root,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._to, self._from = self._proc.stdin, self._proc.stdout
        self.keep_digests = digests
        self.events_by_service: Counter[str] = Counter()
        self.digests: list[tuple[int, EventDigest]] = []
        self.skipped: dict[str, tuple[str, str]] = {}
        self.problems: list[tuple[int, Problem]] = []
        self._dirty = False
        # A page is larger than a pipe holds: written from this process's own thread, a
        # page waits for the replay to read it without stopping this one's hashing (and its
        # event loop); a few pages at most are queued, so a slow replay slows the fetch.
        self._outbox: queue.Queue[bytes | None] = queue.Queue(maxsize=QUEUED_PAGES)
        self._broken: BaseException | None = None
        self._writer = threading.Thread(target=self._write, name="replay-pipe", daemon=True)
        self._writer.start()

    def _write(self) -> None:
        while True:
            data = self._outbox.get()
            try:
                if data is None:
                    return
                if self._broken is None:  # else drained, so that no put waits for nothing
                    self._to.write(data)
                    self._to.flush()
            except OSError as exc:  # BrokenPipeError: the replay process ended
                self._broken = exc
            finally:
                self._outbox.task_done()

    def _send(self, message: tuple[Any, ...]) -> None:
        if self._broken is None:
            self._outbox.put(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        if self._broken is not None:
            raise RuntimeError(f"the replay process ended (exit {self._proc.wait()})") from None

    def add(self, ordinal: int, indexes: Sequence[int], envelopes: Sequence[bytes]) -> None:
        self._send(("add", ordinal, list(indexes), list(envelopes)))
        self._dirty = True

    def _ask(self, what: str) -> tuple[Any, ...]:
        self._send((what,))
        self._outbox.join()  # written, every message before it too
        if self._broken is not None:
            raise RuntimeError(f"the replay process ended (exit {self._proc.wait()})")
        try:
            status, found = pickle.load(self._from)
        except EOFError:
            raise RuntimeError("the replay process ended without an answer") from None
        if status != "ok":
            raise RuntimeError(f"the replay process failed:\n{found}")
        digests, problems, skipped, by_service = found[:4]
        self.digests += digests
        self.problems += problems
        self.skipped, self.events_by_service = skipped, by_service
        self._dirty = False
        return tuple(found[4:])

    def sync(self) -> None:
        """Fetch what the replay found for every entry added so far."""
        if self._dirty:
            self._ask("sync")

    def finish(self) -> dict[str, Table | InvariantViolation]:
        # The tables come back, not the folds: far fewer objects to pickle.
        (tables,) = self._ask("finish")
        self._proc.wait(30)
        by_name: dict[str, Table | InvariantViolation] = tables
        return by_name

    def close(self) -> None:
        """Stop the process (after :meth:`finish` it has ended by itself)."""
        if self._writer.is_alive():
            self._broken = self._broken or RuntimeError("closed")  # drop what is queued
            try:  # the queue is full only while the replay reads: it drains
                self._outbox.put(None, timeout=5)
            except queue.Full:
                self._proc.kill()  # not reading: the write in progress fails
                self._outbox.put(None, timeout=5)
            self._writer.join(5)
        for pipe in (self._to, self._from):
            try:
                pipe.close()
            except BrokenPipeError:
                pass
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)


class LogAudit:
    """The log as the auditor downloads it, page by page in index order: each entry's leaf
    recomputed from its bytes, the tree recomputed from those leaves (and, apart, from the
    leaves the service reports: when those add up to the signed root, they are the tree's, and
    every entry whose bytes hash to another leaf is named by position), the hash chain; and
    each entry's event handed to an :class:`EventReplay` (the events per service, the digests
    the stores are compared with, the totals' rebuild), in a second process when
    ``parallel``."""

    def __init__(
        self,
        trusted_size: int = 0,
        watch: Iterable[int] = (),
        *,
        digests: bool = True,
        parallel: bool = False,
    ) -> None:
        self.size = 0  # entries seen (the next index expected)
        self.tree = CompactRange()  # from the leaves recomputed from the bytes
        # From the leaves the service reports: the same as ``tree`` until an entry's bytes
        # hash to another leaf than it reports, so kept apart only from then on.
        self._reported: CompactRange | None = None
        self.broken = False  # an entry is missing: no root can be recomputed
        self.head = GENESIS
        self._problems: list[tuple[int, Problem]] = []  # (ordinal of the entry, problem)
        self._taken = 0  # entries taken so far (each one's ordinal, for the order of problems)
        self.keep_digests = digests
        self.replay: EventReplay | ReplayProcess = (
            ReplayProcess(digests) if parallel else EventReplay(digests)
        )
        self.trusted_size = trusted_size
        self.edge_at_trusted: list[bytes] | None = [] if trusted_size == 0 else None
        self.watched = set(watch)
        self.leaves: dict[int, bytes] = {}  # the recomputed leaves of the watched entries

    # What the replay found, as of every entry added so far.
    @property
    def problems(self) -> list[Problem]:
        """Each entry's own findings (hashes, positions, envelopes), in log order."""
        self.replay.sync()
        merged = sorted(self._problems + self.replay.problems, key=lambda p: p[0])
        return [p for _, p in merged]

    @property
    def events_by_service(self) -> Counter[str]:
        self.replay.sync()
        return self.replay.events_by_service

    @property
    def digests(self) -> list[tuple[int, EventDigest]]:
        self.replay.sync()
        return self.replay.digests

    @property
    def skipped(self) -> dict[str, tuple[str, str]]:
        self.replay.sync()
        return self.replay.skipped

    def finish(self) -> dict[str, Table | InvariantViolation]:
        """Each total's table (or the violation its fold found), after the last entry (the
        replay takes no more entries)."""
        return self.replay.finish()

    def close(self) -> None:
        self.replay.close()

    @property
    def reported(self) -> CompactRange:
        """The tree of the leaf hashes the service reports."""
        return self.tree if self._reported is None else self._reported

    def add(self, rows: Iterable[Row]) -> None:
        """The next page of entries, as ``(index, leaf hash, chain hash, envelope bytes)``."""
        page = list(rows)
        self.add_columns(
            [r[0] for r in page], [r[1] for r in page], [r[2] for r in page], [r[3] for r in page]
        )

    def add_packed(
        self, indexes: Sequence[int], leaves: bytes, chains: bytes, envelopes: Sequence[bytes]
    ) -> None:
        """The next page as GetEntries' packed answer: the indexes, the leaf and the chain
        hashes as reported (32 bytes each, concatenated), the envelopes' bytes."""
        n = len(envelopes)
        if len(indexes) != n or len(leaves) != HASH * n or len(chains) != HASH * n:
            self._problems.append(
                (
                    self._taken,
                    Problem(
                        "tree",
                        f"a page of entries from {self.size} whose columns differ in length:"
                        f" {len(indexes)} indexes, {n} envelopes, "
                        f"{len(leaves)} and {len(chains)} bytes of hashes",
                        self.size,
                    ),
                )
            )
            return
        if self._add_in_line(indexes, leaves, chains, envelopes):
            return
        cut = range(0, HASH * n, HASH)
        self.add_columns(
            indexes,
            [leaves[at : at + HASH] for at in cut],
            [chains[at : at + HASH] for at in cut],
            envelopes,
        )

    def _add_in_line(
        self, indexes: Sequence[int], leaves: bytes, chains: bytes, envelopes: Sequence[bytes]
    ) -> bool:
        """A page as :meth:`add_columns` takes it, when every entry is in place: the next
        indexes, each leaf the one its bytes hash to, the hash chain unbroken (a page compared
        whole, not entry by entry); False, with nothing changed, when any one is not (and
        :meth:`add_columns` names it) or when the trusted size falls inside the page."""
        size, n, head = self.size, len(envelopes), self.head
        if (
            self._reported is not None
            or not head
            or size < self.trusted_size < size + n  # its right edge is taken inside the page
            or not (indexes and indexes[0] == size and list(indexes) == [*range(size, size + n)])
        ):
            return False
        sha256 = hashlib.sha256
        actual = [sha256(b"\x00" + data).digest() for data in envelopes]  # RFC 6962 leaves
        if b"".join(actual) != leaves:
            return False
        chained = head
        if b"".join([chained := sha256(chained + a).digest() for a in actual]) != chains:
            return False
        tree = self.tree  # CompactRange.extend, inline
        edge, tree_size = tree.hashes, tree.size
        for h in actual:
            s = tree_size
            while s & 1:
                h = sha256(b"\x01" + edge.pop() + h).digest()
                s >>= 1
            edge.append(h)
            tree_size += 1
        tree.size = tree_size
        for idx in self.watched:
            if size <= idx < size + n:
                self.leaves[idx] = actual[idx - size]
        ordinal = self._taken
        self.head, self.size, self._taken = chained, size + n, ordinal + n
        if self.size == self.trusted_size and not self.broken:
            self.edge_at_trusted = list(edge)
        self.replay.add(ordinal, indexes, envelopes)
        return True

    def add_columns(
        self,
        indexes: Sequence[int],
        leaves: Sequence[bytes],
        chains: Sequence[bytes],
        envelopes: Sequence[bytes],
    ) -> None:
        """The next page of entries as columns: their indexes, their leaf and chain hashes as
        the service reports them, their envelopes' bytes."""
        # The hot loop of a million-entry audit: the hashes and the tree's append inline, the
        # attributes it changes per entry kept in locals (written back before _misplaced,
        # which reads and changes them, and at the end).
        tree, sha256, watched = self.tree, hashlib.sha256, self.watched
        edge = tree.hashes
        ordinal = self._taken
        taken: list[int] | None = None  # positions taken, once one was not
        head, size, count, tree_size = self.head, self.size, self._taken, tree.size
        trusted_size, reported_tree = self.trusted_size, self._reported
        rows = zip(indexes, leaves, chains, envelopes, strict=True)
        for k, (idx, reported, chained, data) in enumerate(rows):
            if idx != size:
                self.head, self.size, self._taken = head, size, count
                misplaced = self._misplaced(idx)
                head, size = self.head, self.size
                if not misplaced:
                    if taken is None:
                        taken = list(range(k))
                    continue
            if taken is not None:
                taken.append(k)
            actual = sha256(b"\x00" + data).digest()  # RFC 6962 leaf, as merkle.leaf_hash
            if actual != reported:
                if reported_tree is None:
                    reported_tree = self._reported = CompactRange(tree_size, list(edge))
                self._problems.append(
                    (
                        count,
                        Problem(
                            "tree",
                            f"audit entry {idx}: its bytes hash to leaf {actual.hex()}, the "
                            f"log's tree has {reported.hex()} there",
                            idx,
                        ),
                    )
                )
            elif head and sha256(head + actual).digest() != chained:  # chain_hash
                self._problems.append(
                    (count, Problem("tree", f"audit entry {idx}: the hash chain breaks here", idx))
                )
            head = chained
            h, s = actual, tree_size  # CompactRange.append
            while s & 1:
                h = sha256(b"\x01" + edge.pop() + h).digest()
                s >>= 1
            edge.append(h)
            tree_size += 1
            if reported_tree is not None:
                reported_tree.append(reported)
            if idx in watched:
                self.leaves[idx] = actual
            size = idx + 1
            count += 1
            if size == trusted_size and not self.broken:
                self.edge_at_trusted = list(edge)
        self.head, self.size, self._taken, tree.size = head, size, count, tree_size
        if taken is None:
            self.replay.add(ordinal, indexes, envelopes)
        elif taken:
            self.replay.add(ordinal, [indexes[k] for k in taken], [envelopes[k] for k in taken])

    def _misplaced(self, idx: int) -> bool:
        """An entry not where the next one should be: served twice (skip it: False), or
        after a gap (name the gap, and take the entry: True)."""
        if idx < self.size:
            self._problems.append(
                (
                    self._taken,
                    Problem("tree", f"audit entry {idx} is served twice or out of order", idx),
                )
            )
            return False
        self._problems.append(
            (
                self._taken,
                Problem(
                    "tree",
                    f"audit {_span(range(self.size, idx))} missing: the log goes from entry "
                    f"{self.size - 1} to entry {idx}",
                    self.size,
                ),
            )
        )
        self.broken, self.size = True, idx
        self.head = b""  # the chain before this entry is in the missing ones
        return True

    def check_checkpoint(self, checkpoint: Checkpoint) -> list[Problem]:
        """The entries fetched so far against a signed checkpoint of exactly that many (what
        :meth:`add` found is in :attr:`problems`; this returns what the root shows)."""
        found: list[Problem] = []
        if self.size < checkpoint.size:
            missing = range(self.size, checkpoint.size)
            found.append(
                Problem(
                    "tree",
                    f"audit {_span(missing)} missing: the log serves {self.size} of the "
                    f"{checkpoint.size} entries its checkpoint signs",
                    self.size,
                )
            )
        elif self.broken:
            pass  # named where the gap is
        elif self.tree.root() != checkpoint.root:
            if self.reported.root() == checkpoint.root:
                message = (
                    "the entries do not add up to the signed root: the entries named above "
                    "were changed after they were signed"
                )
            else:
                message = (
                    "the leaf hashes the log reports do not add up to its signed root "
                    "either: its stored tree was changed"
                )
            found.append(Problem("tree", message))
        return found

    def check_trusted(
        self, trusted: Trusted, checkpoint: Checkpoint, proof: Sequence[bytes] | None
    ) -> list[Problem]:
        """Today's checkpoint against the one trusted last time: the log may only have grown.
        ``proof`` is the service's consistency proof from the trusted size to today's (None
        when it could not give one); the right edge recomputed from the entries at the
        trusted size locates where a rewritten history first differs."""
        found: list[Problem] = []
        t, n = trusted.tree_size, checkpoint.size
        if n < t:
            found.append(
                Problem(
                    "trusted",
                    f"the log has {n} entries, fewer than the {t} of your trusted checkpoint: "
                    f"it was truncated at entry {n}",
                    n,
                )
            )
        elif n == t and checkpoint.root != trusted.root:
            found.append(
                Problem("trusted", f"the log signs another root for your trusted size {t}")
            )
        elif n > t and t > 0:
            try:
                if proof is None:
                    raise ProofInvalid("the log gave no consistency proof")
                merkle.verify_consistency(t, n, trusted.root, checkpoint.root, proof)
            except ProofInvalid as exc:
                found.append(
                    Problem(
                        "trusted",
                        f"the log of {n} entries is not consistent with your trusted "
                        f"checkpoint of {t}: {exc}",
                    )
                )
        edge = self.edge_at_trusted
        if t and edge is not None and edge != list(trusted.right_edge) and n >= t:
            differs = first_difference(t, edge, trusted.right_edge)
            found.append(
                Problem(
                    "trusted",
                    f"the first {t} entries are not those you trusted: they differ within "
                    f"{_span(differs)}",
                    differs.start,
                )
            )
        return found

    def trusted_state(self, note: str, checkpoint: Checkpoint) -> Trusted:
        """What to trust next time: this checkpoint and the recomputed right edge."""
        return Trusted(note, checkpoint.size, checkpoint.root, tuple(self.tree.hashes))
