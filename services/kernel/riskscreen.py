"""Each service's side of the real-time risk engine (services/kernel/contract/risk.py): its own
copy of the active rules and lists, the observations its velocity counts come from, and the
screen a claim (eligibility) or a reservation (ledger) goes through, in-process.

- **Copy**: eligibility projects its own risk events into these tables; the ledger projects the
  same events from NATS (``RiskRulesActivated``, ``RiskListChanged``). Both bump ``risk_state``,
  the version counter every replica's :class:`ActiveRisk` polls (every 250 ms), so an approved
  change is enforced by every replica within a second.
- **Subjects**: a claim's or an order's circumstances are indexed with ONE Vault transit call
  (``batch_input``), only when there are any; person, merchant and serial are ids already.
- **Counts**: one indexed count per applicable rule, each stopped at the rule's limit, in one
  statement. Taken under transaction-scoped advisory locks on the subjects counted, held until
  the attempt's transaction commits its observation, so two concurrent attempts from one device
  are counted one after the other: counts are exact, not "roughly".
- **Decisions**: a block or flag is a ``RiskDecisionRecorded`` event in the service's own store,
  appended through the pipeline in its own transaction (the refused attempt's rolls back).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    Index,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    func,
    literal,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from subsidy.v1 import common_pb2
from subsidy.v1 import events_pb2 as ev

from . import vault
from .background import every
from .contract import circumstances as circ
from .contract import risk
from .contract.risk import Action, Kind, Outcome, Subject, Subjects, Verdict
from .contract.risk_proto import decision_recorded, rule_set_of
from .errors import FailedPrecondition, InvalidArgument, Unavailable
from .events import Context, service_actor
from .eventstore import Tx
from .pipeline import Aggregate, Pipeline
from .sql import Statement

log = logging.getLogger(__name__)

ACTIVE, REMOVED = "ACTIVE", "REMOVED"
POLL_S = 0.25
# The Vault blind-index purpose of each circumstance (the same purposes registration uses for
# the identifiers it links, so one device has one index everywhere).
PURPOSES = {
    Kind.DEVICE: "device_id",
    Kind.IP: "ip",
    Kind.ADDRESS: "delivery_address",
    Kind.CARD: "bank_card",
}


# --------------------------------------------------------------------------------------------
# Tables (created in each service's own database, on its metadata)


@dataclass(frozen=True)
class RiskTables:
    rule_sets: Table
    list_entries: Table
    state: Table
    observations: Table


def risk_tables(metadata: MetaData) -> RiskTables:
    """The risk tables of one service's database."""
    rule_sets = Table(
        "risk_rule_sets",
        metadata,
        Column("version", BigInteger, primary_key=True),
        Column("document", Text, nullable=False),  # the rule-set document, canonical JSON
        Column("change_id", String(80), nullable=False),
        Column("activated_at", DateTime(timezone=True), nullable=False),
    )
    list_entries = Table(
        "risk_list_entries",
        metadata,
        Column("entry_id", String(64), primary_key=True),
        Column("list", String(8), nullable=False),
        Column("kind", String(16), nullable=False),
        Column("subject_index", String(128), nullable=False),
        Column("subject_masked", String(64), nullable=False),
        Column("expires_at", DateTime(timezone=True), nullable=False),
        Column("reason", Text, nullable=False),
        Column("status", String(8), nullable=False),
        Column("version", BigInteger, nullable=False),  # the lists version that last changed it
        Index("risk_list_entries_live", "status", "expires_at"),
    )
    # One row: the versions every replica polls to know its copy is stale.
    state = Table(
        "risk_state",
        metadata,
        Column("id", SmallInteger, primary_key=True),
        Column("rules_version", BigInteger, nullable=False),
        Column("lists_version", BigInteger, nullable=False),
    )
    # One row per subject of each claim or reservation that went through: what velocity and
    # clustering count (blind indexes and consumer ids only).
    observations = Table(
        "risk_observations",
        metadata,
        Column("id", BigInteger, Identity(always=True), primary_key=True),
        Column("action", String(8), nullable=False),
        Column("kind", String(16), nullable=False),
        Column("subject_index", String(128), nullable=False),
        Column("person", String(64), nullable=False),
        Column("at", DateTime(timezone=True), nullable=False),
        Index("risk_observations_by_subject", "action", "kind", "subject_index", "at"),
    )
    return RiskTables(rule_sets, list_entries, state, observations)


async def _bump(conn: AsyncConnection, t: RiskTables, *, rules: int = 0, lists: int = 0) -> None:
    stmt = pg_insert(t.state).values(id=1, rules_version=rules, lists_version=lists)
    await conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["id"],
            set_={
                "rules_version": func.greatest(t.state.c.rules_version, rules),
                "lists_version": func.greatest(t.state.c.lists_version, lists),
            },
        )
    )


def rule_set_json(rules: risk.RuleSet) -> str:
    return json.dumps(
        {"rules": [risk.rule_document(r) for r in rules.rules]},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )


async def apply_rules_activated(
    conn: AsyncConnection, t: RiskTables, event: ev.RiskRulesActivated, at: dt.datetime
) -> None:
    """A rule-set version became active (eligibility's projection, the ledger's consumer)."""
    rules = rule_set_of(event.rule_set, event.version)
    await conn.execute(
        pg_insert(t.rule_sets)
        .values(
            version=event.version,
            document=rule_set_json(rules),
            change_id=event.change_id,
            activated_at=at,
        )
        .on_conflict_do_nothing()
    )
    await _bump(conn, t, rules=event.version)


async def apply_list_changed(
    conn: AsyncConnection, t: RiskTables, event: ev.RiskListChanged
) -> None:
    """An entry added to or removed from a list. Each event carries the whole entry, so the
    outcome does not depend on the order two events arrive in: a removal wins."""
    e = event.entry
    values = {
        "entry_id": e.entry_id,
        "list": e.list,
        "kind": e.kind,
        "subject_index": e.subject_index,
        "subject_masked": e.subject_masked,
        "expires_at": e.expires_at.ToDatetime(tzinfo=dt.UTC),
        "reason": e.reason,
        "version": event.version,
    }
    if event.change == "add":
        stmt = pg_insert(t.list_entries).values(**values, status=ACTIVE).on_conflict_do_nothing()
    else:
        stmt = (
            pg_insert(t.list_entries)
            .values(**values, status=REMOVED)
            .on_conflict_do_update(
                index_elements=["entry_id"], set_={"status": REMOVED, "version": event.version}
            )
        )
    await conn.execute(stmt)
    await _bump(conn, t, lists=event.version)


# --------------------------------------------------------------------------------------------
# The copy in memory


class ActiveRisk:
    """The rules and lists in force, held in memory and reloaded when the service's
    ``risk_state`` counter moves (polled every ``POLL_S``): what the hot path evaluates."""

    def __init__(
        self, engine: AsyncEngine, tables: RiskTables, clock: Callable[[], dt.datetime]
    ) -> None:
        self.engine = engine
        self.tables = tables
        self.clock = clock
        self.rules = risk.RuleSet()
        self.lists = risk.Lists()
        self._versions = (-1, -1)
        # The poll, four times a second in every replica: compiled once, run prepared.
        self._poll = Statement(
            select(tables.state.c.rules_version, tables.state.c.lists_version), name="risk_poll"
        )

    async def refresh(self) -> bool:
        """Reload if a change was made since the last load; whether it reloaded."""
        t = self.tables
        versions_q = select(t.state.c.rules_version, t.state.c.lists_version)
        # The poll: one small read, committed, not rolled back: psycopg forgets every prepared
        # statement of a connection on ROLLBACK (DEALLOCATE ALL), the hot path's included.
        async with self.engine.begin() as conn:
            row = await self._poll.first(conn)
        polled = (int(row[0]), int(row[1])) if row else (0, 0)
        if polled == self._versions:
            return False
        async with self.engine.connect() as conn:
            # One snapshot for the versions, the rules and the entries they describe.
            conn = await conn.execution_options(isolation_level="REPEATABLE READ")
            row = (await conn.execute(versions_q)).first()
            versions = (int(row[0]), int(row[1])) if row else (0, 0)
            document = await conn.scalar(
                select(t.rule_sets.c.document).where(t.rule_sets.c.version == versions[0])
            )
            rows = (
                await conn.execute(
                    select(t.list_entries).where(
                        t.list_entries.c.status == ACTIVE,
                        t.list_entries.c.expires_at > self.clock(),
                    )
                )
            ).all()
        rules = (
            risk.parse_rule_set(json.loads(document), versions[0])
            if document is not None
            else risk.RuleSet(versions[0])
        )
        entries = [
            risk.ListEntry(
                r.entry_id,
                risk.ListName(r.list),
                Kind(r.kind),
                r.subject_index,
                r.subject_masked,
                r.expires_at,
            )
            for r in rows
        ]
        self.rules, self.lists = rules, risk.Lists.of(versions[1], entries)
        if versions != self._versions and self._versions != (-1, -1):
            log.info(
                "risk rules v%d and lists v%d in force (%d entries)",
                versions[0],
                versions[1],
                len(entries),
            )
        self._versions = versions
        return True

    async def run(self, stop: asyncio.Event, every_s: float = POLL_S) -> None:
        """Background loop: refresh every ``every_s`` until ``stop``."""
        await every(
            stop, every_s, self.refresh, log=log, failure="risk refresh failed", alert="risk"
        )


# --------------------------------------------------------------------------------------------
# The edge: circumstances


@dataclass(frozen=True)
class Circumstances:
    """A request's circumstances in canonical form (validated at the edge); empty: unknown."""

    device_id: str = ""
    ip: str = ""
    delivery_address: str = ""  # normalised
    bank_card: str = ""
    region_code: str = ""  # administrative division code (the campaign-region rule's)


def circumstances_of(
    message: common_pb2.Circumstances, field: str = "circumstances"
) -> Circumstances:
    """Validate a request's ``Circumstances`` (services/kernel/contract/circumstances.py); a
    malformed one is INVALID_ARGUMENT naming its field, never its value."""
    checks: tuple[tuple[str, Callable[[str], str]], ...] = (
        ("device_id", circ.validate_device_id),
        ("ip", circ.validate_ip),
        ("delivery_address", circ.normalise_address),
        ("bank_card", circ.validate_bank_card),
        ("region_code", circ.validate_region_code),
    )
    values: dict[str, str] = {}
    for name, check in checks:
        raw = getattr(message, name)
        if not raw:
            continue
        try:
            values[name] = check(raw)
        except circ.InvalidCircumstance as exc:
            path = f"{field}.{name}"
            raise InvalidArgument(exc.reason, f"{path}: {exc}", field=path) from None
    return Circumstances(**values)


MASKS: dict[Kind, Callable[[str], str]] = {
    Kind.DEVICE: circ.mask_token,
    Kind.IP: circ.mask_ip,
    Kind.ADDRESS: circ.mask_address,
    Kind.CARD: circ.mask_bank_card,
}


# --------------------------------------------------------------------------------------------
# The screen


class RiskBlocked(FailedPrecondition):
    """A claim or reservation the risk rules or lists block (FAILED_PRECONDITION: well-formed,
    but the state of the rules forbids it). Names the field and the rule, never the value."""

    def __init__(self, verdict: Verdict, decision_id: str) -> None:
        target = verdict.field or "request"
        super().__init__(
            "RISK_BLOCKED",
            f"{target}: refused by risk rule {verdict.rule_id} (rules v{verdict.rule_set_version},"
            f" lists v{verdict.lists_version}); decision {decision_id}",
            field=verdict.field,
            rule_id=verdict.rule_id,
            decision_id=decision_id,
        )
        self.verdict = verdict
        self.decision_id = decision_id


def _lock_key(subject: Subject) -> int:
    digest = hashlib.sha256(f"risk:{subject.kind}:{subject.index}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def _no_state(conn: AsyncConnection, decision_id: str) -> None:
    return None


DECISION: Aggregate[str, None] = Aggregate(
    "risk-decision", lambda decision_id: f"risk-decision/{decision_id}", _no_state
)


@dataclass(frozen=True)
class Screening:
    """One attempt's subjects and the verdict on it (with the id its decision is recorded
    under, if it blocks or flags)."""

    action: Action
    consumer_id: str
    reference: str
    subjects: Subjects
    verdict: Verdict
    decision_id: str


class RiskScreen:
    """Screens claims or reservations of one service against the rules and lists in force."""

    def __init__(
        self,
        service: str,
        pipeline: Pipeline,
        keys: vault.Vault,
        tables: RiskTables,
        clock: Callable[[], dt.datetime],
    ) -> None:
        self.service = service
        self.pipeline = pipeline
        self.vault = keys
        self.tables = tables
        self.clock = clock
        self.active = ActiveRisk(pipeline.store.engine, tables, clock)

    async def subjects(
        self,
        consumer_id: str,
        circumstances: Circumstances | None,
        *,
        merchant: str = "",
        serial: str = "",
    ) -> dict[Kind, Subject]:
        """The subjects of one attempt: the person, the merchant and serial as they are, and
        each circumstance as its blind index, all of them from one Vault call."""
        person = risk.person_of(consumer_id)
        found = {Kind.PERSON: Subject(Kind.PERSON, person, person)}
        if merchant:
            found[Kind.MERCHANT] = Subject(Kind.MERCHANT, merchant, merchant)
        if serial:
            found[Kind.SERIAL] = Subject(Kind.SERIAL, serial, serial)
        c = circumstances or Circumstances()
        raw = {
            Kind.DEVICE: c.device_id,
            Kind.IP: c.ip,
            Kind.ADDRESS: c.delivery_address,
            Kind.CARD: c.bank_card,
        }
        present = [(kind, value) for kind, value in raw.items() if value]
        if present:
            try:
                indexes = await self.vault.blind_indexes([(PURPOSES[k], v) for k, v in present])
            except vault.VaultUnavailable as exc:
                raise Unavailable("VAULT_UNAVAILABLE", str(exc)) from None
            for (kind, value), index in zip(present, indexes, strict=True):
                found[kind] = Subject(kind, index, MASKS[kind](value))
        return found

    async def subject_of(self, kind: Kind, value: str) -> Subject:
        """One subject from its canonical value (a list entry an operator names): a device or
        address as its blind index, anything else as it is."""
        if kind is Kind.PERSON:
            person = risk.person_of(value)
            return Subject(kind, person, person)
        if kind not in PURPOSES:
            return Subject(kind, value, value)
        try:
            (index,) = await self.vault.blind_indexes([(PURPOSES[kind], value)])
        except vault.VaultUnavailable as exc:
            raise Unavailable("VAULT_UNAVAILABLE", str(exc)) from None
        return Subject(kind, index, MASKS[kind](value))

    async def judge(
        self,
        conn: AsyncConnection | None,
        action: Action,
        consumer_id: str,
        reference: str,
        subjects: Subjects,
        now: dt.datetime,
        *,
        lock: bool = False,
    ) -> Screening:
        """The verdict on one attempt, from the copy in memory and the counts it needs. With
        ``lock`` the counted subjects are locked first (advisory locks of ``conn``'s
        transaction, held until the attempt's observation commits in it), so the count is
        exact; without, ``conn`` may be None and a connection is taken only if a rule needs a
        count (an early look before anything else is locked)."""
        rules, lists = self.active.rules, self.active.lists
        needed = risk.counts_needed(rules, lists, action, subjects, now)
        counts: dict[str, int] = {}
        if needed:
            if conn is None:
                assert not lock, "locks need the attempt's own transaction"
                async with self.pipeline.store.engine.connect() as own:
                    counts = await self._count(own, needed)
            else:
                if lock:
                    keys = sorted({_lock_key(c.subject) for c in needed})
                    await conn.execute(
                        text(
                            "SELECT pg_advisory_xact_lock(k) FROM unnest(CAST(:keys AS bigint[])) k"
                        ),
                        {"keys": keys},
                    )
                counts = await self._count(conn, needed)
        verdict = risk.evaluate(rules, lists, action, subjects, counts, now)
        decision_id = f"rd-{uuid.uuid4().hex}" if verdict.outcome is not Outcome.ALLOW else ""
        return Screening(action, consumer_id, reference, subjects, verdict, decision_id)

    async def _count(self, conn: AsyncConnection, needed: Sequence[risk.Count]) -> dict[str, int]:
        o = self.tables.observations.c
        columns = []
        for i, c in enumerate(needed):
            where = (
                o.action == str(c.action),
                o.kind == str(c.subject.kind),
                o.subject_index == c.subject.index,
                o.at >= c.since,
            )
            if c.kind == risk.VELOCITY:
                inner = select(literal(1)).where(*where).limit(c.limit)
            else:
                inner = (
                    select(o.person).where(*where, o.person != c.person).distinct().limit(c.limit)
                )
            columns.append(
                select(func.count()).select_from(inner.subquery()).scalar_subquery().label(f"c{i}")
            )
        row = (await conn.execute(select(*columns))).one()
        return {c.rule_id: int(row[i]) for i, c in enumerate(needed)}

    async def observe(self, conn: AsyncConnection, screening: Screening, now: dt.datetime) -> None:
        """Record the attempt that went through (in its own transaction, so a rolled-back
        claim or reservation counts for nothing)."""
        person = risk.person_of(screening.consumer_id)
        rows = [
            {
                "action": str(screening.action),
                "kind": str(s.kind),
                "subject_index": s.index,
                "person": person,
                "at": now,
            }
            for kind, s in screening.subjects.items()
            if kind in risk.VELOCITY_SUBJECTS
        ]
        if rows:
            await conn.execute(self.tables.observations.insert(), rows)

    async def record(self, screening: Screening, tx: Tx | None = None) -> None:
        """Append the decision of a screening that blocked or flagged (in its own transaction
        unless ``tx``); an allowed one records nothing."""
        if screening.verdict.outcome is Outcome.ALLOW:
            return
        event = decision_recorded(
            screening.verdict,
            screening.decision_id,
            screening.action,
            screening.consumer_id,
            screening.reference,
        )
        await self.pipeline.run(
            DECISION,
            screening.decision_id,
            lambda existing: [event] if existing is None else [],
            Context(service_actor(self.service), correlation_id=screening.reference),
            tx=tx,
            reload=False,
        )

    async def refuse(self, screening: Screening) -> RiskBlocked:
        """Record a block (its own transaction: the attempt's rolled back) and the error to
        raise."""
        await self.record(screening)
        return RiskBlocked(screening.verdict, screening.decision_id)
