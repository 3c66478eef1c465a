"""Supervision cases: the read models, the use cases on the kernel's pipeline, the consumer that
opens cases from the event stream, and the overdue sweeper. The rules are in
:mod:`services.audit.cases_domain`; the gRPC edge is :mod:`services.audit.cases_api`.

- Each case is a stream, ``case/<case_id>``, in the audit service's own store; the ``cases``
  table is its read model (``apply_event`` runs ``cases_domain.evolve``, inside the pipeline's
  transaction), rebuilt from that store by replay.
- Complaint and note texts may hold personal data: each case gets its own data key from Vault
  transit (wrapped in ``case_keys``; deleting the row shreds the texts), and the events carry
  only the ciphertext, its SHA-256 and its length.
- One durable consumer (``audit-supervision``) reads every event: the policy versions (for the
  deadlines), risk decisions (a block or flag opens a RISK_ALERT case), every action of a
  person (``operator_actions``: who, what, when, why), overrides counted per person (the
  policy's limit within its window opens an OPERATOR_ACTIVITY case), eligibility's events
  that name a case (linked to it as CaseOutcomeApplied), and which platform each order is of
  (``case_orders``, from the ledger's SubsidyReserved: a complaint names one of its own).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from google.protobuf.message import Message
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    String,
    Table,
    Text,
    and_,
    bindparam,
    func,
    or_,
    select,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.kernel import topology, vault
from services.kernel.background import every
from services.kernel.contract.policy import Supervision, policy_of
from services.kernel.errors import Unavailable
from services.kernel.events import (
    MACHINE_EVENTS,
    PERSON_KINDS,
    Context,
    Envelope,
    payload_of,
    service_actor,
)
from services.kernel.eventstore import EventStore, Tx
from services.kernel.pipeline import Aggregate, Pipeline
from services.kernel.sql import Statement
from subsidy.v1 import common_pb2
from subsidy.v1 import events_pb2 as ev

from . import cases_domain as domain
from .log import metadata

log = logging.getLogger(__name__)
SERVICE = "audit"
CONSUMER = "audit-supervision"
ALERT = "case-overdue"

cases = Table(
    "cases",
    metadata,
    Column("case_id", String(80), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("priority", String(16), nullable=False),
    Column("status", String(32), nullable=False),
    Column("platform_id", String(64), nullable=False),
    Column("order_id", String(64), nullable=False),
    Column("complainant", String(16), nullable=False),
    Column("opened_at", DateTime(timezone=True), nullable=False),
    Column("first_response_due", DateTime(timezone=True), nullable=False),
    Column("resolution_due", DateTime(timezone=True), nullable=False),
    Column("subject", String(200), nullable=False),
    Column("summary", String(300), nullable=False),
    Column("text_length", Integer, nullable=False),
    Column("text_sha256", String(64), nullable=False, server_default=""),
    Column("responded", Boolean, nullable=False),
    Column("assignee", String(64), nullable=False),
    Column("outcome", String(32), nullable=False),
    Column("qualification_id", String(64), nullable=False),
    Column("amount_fen", BigInteger, nullable=False),
    Column("proposed_by", String(64), nullable=False),
    Column("resolved_by", String(64), nullable=False),
    Column("first_response_alerted", Boolean, nullable=False),
    Column("resolution_alerted", Boolean, nullable=False),
    Column("applied_event_id", String(36), nullable=False),
    Column("notes", Integer, nullable=False),
    Index("cases_open_due", "status", "resolution_due"),
)
# A case's data key, wrapped by Vault's key-encryption key: deleting the row shreds its texts.
case_keys = Table(
    "case_keys",
    metadata,
    Column("case_id", String(80), primary_key=True),
    Column("wrapped_key", Text, nullable=False),
)
# The supervision part of every published policy version (from catalog's PolicyPublished).
case_policies = Table(
    "case_policies",
    metadata,
    Column("version", String(64), primary_key=True),
    Column("effective_from", DateTime(timezone=True), nullable=False),
    Column("first_response_hours", Integer, nullable=False),
    Column("resolution_hours", Integer, nullable=False),
    Column("override_limit", Integer, nullable=False),
    Column("override_window_hours", Integer, nullable=False),
)
# Every action of a person (operator, approver, auditor), from every service's events.
operator_actions = Table(
    "operator_actions",
    metadata,
    Column("event_id", String(36), primary_key=True),
    Column("operator", String(64), nullable=False),
    Column("role", String(16), nullable=False),
    Column("service", String(32), nullable=False),
    Column("event_type", String(200), nullable=False),
    Column("stream_id", String(200), nullable=False),
    Column("reason", String(300), nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("override", Boolean, nullable=False),
    Index("operator_actions_by_person", "operator", "occurred_at"),
)
# Which platform each order is of (from the ledger's SubsidyReserved): whose complaint it may be.
case_orders = Table(
    "case_orders",
    metadata,
    Column("order_id", String(64), primary_key=True),
    Column("platform_id", String(64), nullable=False),
)
TABLES = (cases,)
# Every reservation's order, kept by the consumer (compiled once and run prepared,
# services/kernel/sql.py: it runs for every checkout).
_KEEP_ORDER = Statement(
    pg_insert(case_orders)
    .values(order_id=bindparam("order_id"), platform_id=bindparam("platform_id"))
    .on_conflict_do_nothing(),
    name="keep case order",
)
# The events this consumer reads the payload of (the rest it records by their envelope).
_DECODED = frozenset(
    m.DESCRIPTOR.full_name
    for m in (
        ev.PolicyPublished,
        ev.RiskDecisionRecorded,
        ev.SubsidyReserved,
        ev.RiskBlockLifted,
        ev.QualificationRestored,
        ev.QualificationForfeited,
    )
)  # what a replay of the audit service's own store rebuilds


def supervised_subjects() -> list[str]:
    """The subjects ``audit-supervision`` consumes: every event of every service but those only
    a platform or a service causes (services.kernel.events.MACHINE_EVENTS: the store refuses
    one whose actor is a person), which this consumer would only count. A checkout's
    QualificationLocked, QualificationUsed and SubsidyCaptured, and a claim's
    QualificationClaimed, are never delivered to it."""
    contract = [
        m.full_name
        for m in ev.DESCRIPTOR.message_types_by_name.values()
        if m.full_name != ev.EventEnvelope.DESCRIPTOR.full_name
    ]
    subjects: list[str] = []
    for service in topology.SERVICE_NAMES:
        machine = MACHINE_EVENTS.get(service, frozenset())
        if not machine:
            subjects.append(f"events.{service}.>")
            continue
        subjects += [
            f"events.{service}.{name.rsplit('.', 1)[-1]}"
            for name in contract
            if name not in machine
        ]
    return subjects


_ROLES = {
    common_pb2.Actor.KIND_OPERATOR: "operator",
    common_pb2.Actor.KIND_APPROVER: "approver",
    common_pb2.Actor.KIND_AUDITOR: "auditor",
}


def risk_case_id(decision_id: str) -> str:
    """The case a risk decision opens (one per decision)."""
    return f"risk-{decision_id}"[:80]


def case_stream(case_id: str) -> str:
    return f"case/{case_id}"


def _case(row: object) -> domain.Case:
    r = row._mapping  # type: ignore[attr-defined]
    alerted = (
        (domain.FIRST_RESPONSE, r["first_response_alerted"]),
        (
            domain.RESOLUTION,
            r["resolution_alerted"],
        ),
    )
    return domain.Case(
        case_id=r["case_id"],
        kind=r["kind"],
        priority=r["priority"],
        status=r["status"],
        platform_id=r["platform_id"],
        order_id=r["order_id"],
        complainant=r["complainant"],
        opened_at=r["opened_at"],
        first_response_due=r["first_response_due"],
        resolution_due=r["resolution_due"],
        subject=r["subject"],
        summary=r["summary"],
        text_length=r["text_length"],
        text_sha256=r["text_sha256"],
        responded=r["responded"],
        assignee=r["assignee"],
        outcome=r["outcome"],
        qualification_id=r["qualification_id"],
        amount_fen=r["amount_fen"],
        proposed_by=r["proposed_by"],
        overdue=tuple(name for name, yes in alerted if yes),
        applied_event_id=r["applied_event_id"],
        notes=r["notes"],
    )


async def load_case(conn: AsyncConnection, case_id: str) -> domain.Case | None:
    row = (await conn.execute(select(cases).where(cases.c.case_id == case_id))).first()
    return _case(row) if row is not None else None


@dataclass(frozen=True)
class CaseRow:
    """A case as the read model has it, with who resolved it (the resolving event's actor)."""

    case: domain.Case
    resolved_by: str


async def load_row(conn: AsyncConnection, case_id: str) -> CaseRow | None:
    row = (await conn.execute(select(cases).where(cases.c.case_id == case_id))).first()
    return CaseRow(_case(row), row.resolved_by) if row is not None else None


CASE: Aggregate[str, domain.Case] = Aggregate("case", case_stream, load_case)


async def apply_event(conn: AsyncConnection, env: Envelope) -> None:
    """Apply one of the audit service's own events to the cases read model; a case's status
    comes from :func:`cases_domain.evolve`, never decided here."""
    event = payload_of(env)
    case_id = str(getattr(event, "case_id", ""))
    if not case_id or not env.event_type.startswith("subsidy.v1.Case"):
        return
    after = domain.evolve(await load_case(conn, case_id), event)
    if after is None:
        return
    row = {
        "kind": after.kind,
        "priority": after.priority,
        "status": after.status,
        "platform_id": after.platform_id,
        "order_id": after.order_id,
        "complainant": after.complainant,
        "opened_at": after.opened_at,
        "first_response_due": after.first_response_due,
        "resolution_due": after.resolution_due,
        "subject": after.subject,
        "summary": after.summary,
        "text_length": after.text_length,
        "text_sha256": after.text_sha256,
        "responded": after.responded,
        "assignee": after.assignee,
        "outcome": after.outcome,
        "qualification_id": after.qualification_id,
        "amount_fen": after.amount_fen,
        "proposed_by": after.proposed_by,
        "first_response_alerted": domain.FIRST_RESPONSE in after.overdue,
        "resolution_alerted": domain.RESOLUTION in after.overdue,
        "applied_event_id": after.applied_event_id,
        "notes": after.notes,
    }
    if isinstance(event, ev.CaseResolved):
        row["resolved_by"] = env.actor.id
    stmt = pg_insert(cases).values({"case_id": case_id, "resolved_by": "", **row})
    await conn.execute(stmt.on_conflict_do_update(index_elements=["case_id"], set_=row))


async def supervision_at(conn: AsyncConnection, at: datetime) -> Supervision:
    """The supervision rules of the policy in force at ``at`` (the defaults before any)."""
    row = (
        await conn.execute(
            select(case_policies)
            .where(case_policies.c.effective_from <= at)
            .order_by(case_policies.c.effective_from.desc())
            .limit(1)
        )
    ).first()
    if row is None:
        return Supervision()
    return Supervision(
        first_response_hours=row.first_response_hours,
        resolution_hours=row.resolution_hours,
        override_limit=row.override_limit,
        override_window_hours=row.override_window_hours,
    )


def text_digest(text: str) -> tuple[str, int]:
    """What an event records of a text besides its ciphertext: SHA-256 and length."""
    return hashlib.sha256(text.encode()).hexdigest(), len(text)


@dataclass(frozen=True)
class Revealed:
    """A case's texts, decrypted for a person allowed to read them."""

    text: str
    notes: list[tuple[str, datetime, str]]  # (author, at, text)


class Cases:
    """The supervision cases the audit service keeps."""

    def __init__(
        self,
        store: EventStore,
        keys: vault.Vault,
        *,
        clock: Callable[[], datetime] | None = None,
        sweep_every_s: float = 5.0,
    ) -> None:
        self.store = store
        self.vault = keys
        self.clock = clock or (lambda: datetime.now(UTC))
        self.sweep_every_s = sweep_every_s
        self.pipeline = Pipeline(store, SERVICE, apply_event)

    # -- sealing ---------------------------------------------------------------------------
    async def _new_key(self, tx: Tx, case_id: str) -> bytes:
        try:
            key, wrapped = await self.vault.new_data_key()
        except vault.VaultUnavailable as exc:
            raise Unavailable("VAULT_UNAVAILABLE", str(exc)) from None
        await tx.conn.execute(
            pg_insert(case_keys)
            .values(case_id=case_id, wrapped_key=wrapped.ciphertext)
            .on_conflict_do_nothing()
        )
        return key

    async def _key(self, case_id: str) -> bytes | None:
        async with self.store.engine.connect() as conn:
            wrapped = await conn.scalar(
                select(case_keys.c.wrapped_key).where(case_keys.c.case_id == case_id)
            )
        if wrapped is None:
            return None
        try:
            return await self.vault.unwrap(vault.WrappedKey(wrapped))
        except vault.VaultUnavailable as exc:
            raise Unavailable("VAULT_UNAVAILABLE", str(exc)) from None

    # -- commands --------------------------------------------------------------------------
    async def file_complaint(
        self,
        platform_id: str,
        order_id: str,
        text: str,
        complainant: str,
        actor: common_pb2.Actor,
        complaint_id: str = "",
    ) -> domain.Case:
        """A complaint about an order becomes a case (its text sealed under the case's key).
        With the platform's ``complaint_id`` the case's id is derived from it, so a retry of
        the same complaint answers the case it opened (:func:`cases_domain.file_complaint`)."""
        case_id = (
            domain.complaint_case_id(platform_id, complaint_id)
            if complaint_id
            else f"case-{uuid.uuid4().hex[:20]}"
        )
        now = self.clock()
        digest, length = text_digest(text)
        async with self.store.transaction() as tx:
            order_platform = await tx.conn.scalar(
                select(case_orders.c.platform_id).where(case_orders.c.order_id == order_id)
            )
            domain.check_order(order_platform, platform_id)
            # A retry needs no new key (its text is not stored again: nothing is appended).
            filed = await load_case(tx.conn, case_id) is not None
            key = None if filed else await self._new_key(tx, case_id)
            rules = await supervision_at(tx.conn, now)
            command = domain.Open(
                case_id=case_id,
                kind=domain.COMPLAINT,
                priority=domain.NORMAL,
                now=now,
                supervision=rules,
                platform_id=platform_id,
                order_id=order_id,
                complainant=complainant,
                text_sealed=vault.seal(key, text, case_id.encode()) if key else b"",
                text_sha256=digest,
                text_length=length,
                summary=f"{complainant.lower()} complaint about order {order_id}",
            )
            outcome = await self.pipeline.run(
                CASE,
                case_id,
                lambda c: domain.file_complaint(c, command),
                Context(actor, correlation_id=order_id),
                tx=tx,
            )
        assert outcome.state is not None
        return outcome.state

    async def assign(self, case_id: str, assignee: str, actor: common_pb2.Actor) -> domain.Case:
        command = domain.Assign(assignee, self.clock())
        return await self._run(case_id, lambda c: domain.assign(c, command), actor)

    async def note(self, case_id: str, text: str, actor: common_pb2.Actor) -> domain.Case:
        """A note, sealed under the case's key (a case opened without one gets one now)."""
        digest, length = text_digest(text)
        now = self.clock()
        async with self.store.transaction() as tx:
            if await load_case(tx.conn, case_id) is None:
                raise domain.unknown_case()  # before a key is made for it
            key = await self._key(case_id) or await self._new_key(tx, case_id)
            command = domain.Note(vault.seal(key, text, case_id.encode()), digest, length, now)
            outcome = await self.pipeline.run(
                CASE, case_id, lambda c: domain.note(c, command), Context(actor), tx=tx
            )
        assert outcome.state is not None
        return outcome.state

    async def resolve(
        self,
        case_id: str,
        outcome: str,
        actor: common_pb2.Actor,
        *,
        qualification_id: str = "",
        order_id: str = "",
        amount_fen: int = 0,
    ) -> domain.Case:
        command = domain.Resolve(
            outcome, actor.id, self.clock(), qualification_id, order_id, amount_fen
        )
        return await self._run(case_id, lambda c: domain.resolve(c, command), actor)

    async def approve(self, case_id: str, actor: common_pb2.Actor) -> domain.Case:
        command = domain.Approve(actor.id, self.clock())
        return await self._run(case_id, lambda c: domain.approve(c, command), actor)

    async def _run(
        self,
        case_id: str,
        decide: Callable[[domain.Case | None], list[Message]],
        actor: common_pb2.Actor,
    ) -> domain.Case:
        outcome = await self.pipeline.run(CASE, case_id, decide, Context(actor))
        if outcome.state is None:
            raise domain.unknown_case()
        return outcome.state

    # -- queries ---------------------------------------------------------------------------
    async def get(self, case_id: str, platform: str | None) -> CaseRow:
        """One case; a platform sees only the complaints it filed (others read as unknown)."""
        async with self.store.engine.connect() as conn:
            row = await load_row(conn, case_id)
        if row is None or domain.visible(row.case, platform) is None:
            raise domain.unknown_case()
        return row

    async def listed(self, status: str, limit: int) -> list[CaseRow]:
        query = select(cases).order_by(cases.c.opened_at, cases.c.case_id).limit(limit)
        if status:
            query = query.where(cases.c.status == status)
        async with self.store.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [CaseRow(_case(r), r.resolved_by) for r in rows]

    async def reveal(self, case_id: str, actor: common_pb2.Actor) -> Revealed:
        """The complaint's and the notes' texts (people only; never logged), and a record that
        ``actor`` read them (CaseTextRevealed). A shredded key reveals nothing."""
        now = self.clock()
        await self.pipeline.run(
            CASE, case_id, lambda c: domain.reveal(c, now), Context(actor), reload=False
        )
        key = await self._key(case_id)
        aad = case_id.encode()
        text, notes = "", []
        for env in await self.store.read_stream(case_stream(case_id)):
            event = payload_of(env)
            if key is None:
                continue
            if isinstance(event, ev.CaseOpened) and event.text_sealed:
                text = vault.unseal(key, event.text_sealed, aad)
            elif isinstance(event, ev.CaseNoteAdded):
                at = event.at.ToDatetime(tzinfo=UTC)
                notes.append((env.actor.id, at, vault.unseal(key, event.text_sealed, aad)))
        return Revealed(text, notes)

    async def notes(self, case_id: str) -> list[tuple[str, datetime, int]]:
        """Each note's author, time and length (the text stays sealed)."""
        found = []
        for env in await self.store.read_stream(case_stream(case_id)):
            event = payload_of(env)
            if isinstance(event, ev.CaseNoteAdded):
                found.append((env.actor.id, event.at.ToDatetime(tzinfo=UTC), event.text_length))
        return found

    async def operator_actions(self, operator: str, limit: int) -> list[dict[str, object]]:
        """Every recorded action of one person, oldest first (the newest ``limit``)."""
        query = (
            select(operator_actions)
            .where(operator_actions.c.operator == operator)
            .order_by(operator_actions.c.occurred_at.desc(), operator_actions.c.event_id.desc())
            .limit(limit)
        )
        async with self.store.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [dict(r._mapping) for r in reversed(rows)]

    # -- the supervision consumer ----------------------------------------------------------
    async def on_event(self, tx: Tx, env: Envelope) -> None:
        """Every event of every service, once (the consumer marks it handled in ``tx``)."""
        decode = env.event_type in _DECODED or (
            env.actor.kind in PERSON_KINDS and env.event_type in domain.OVERRIDES
        )
        event = payload_of(env) if decode else None  # most events are only counted
        if isinstance(event, ev.PolicyPublished):
            await self._keep_policy(tx.conn, event)
        elif isinstance(event, ev.RiskDecisionRecorded):
            await self._risk_alert(tx, env, event)
        elif isinstance(event, ev.SubsidyReserved) and env.service == "ledger":
            await _KEEP_ORDER.run(
                tx.conn, order_id=event.order_id[:64], platform_id=event.platform_id[:64]
            )
        if env.service == "eligibility" and isinstance(
            event, ev.QualificationRestored | ev.QualificationForfeited
        ):
            if event.case_id:
                await self._link(tx, env, event.case_id)
        elif env.service == "eligibility" and isinstance(event, ev.RiskBlockLifted):
            await self._link(tx, env, risk_case_id(event.decision_id))  # the alert's case
        if env.actor.kind in PERSON_KINDS:
            await self._record_action(tx, env, event)

    async def _keep_policy(self, conn: AsyncConnection, event: ev.PolicyPublished) -> None:
        policy = policy_of(event)
        rules = policy.supervision
        await conn.execute(
            pg_insert(case_policies)
            .values(
                version=policy.version,
                effective_from=policy.effective_from,
                first_response_hours=rules.first_response_hours,
                resolution_hours=rules.resolution_hours,
                override_limit=rules.override_limit,
                override_window_hours=rules.override_window_hours,
            )
            .on_conflict_do_nothing()
        )

    async def _risk_alert(self, tx: Tx, env: Envelope, event: ev.RiskDecisionRecorded) -> None:
        """A block or flag opens one case per decision (the ledger's decisions reach audit
        twice, once re-recorded by eligibility: the case id is the decision's). Its deadlines
        run from the decision, however late the consumer sees it."""
        now = env.occurred_at.ToDatetime(tzinfo=UTC)
        by = f"rule {event.rule_id}" if event.rule_id else f"list entry {event.entry_id}"
        command = domain.Open(
            case_id=risk_case_id(event.decision_id),
            kind=domain.RISK_ALERT,
            priority=domain.risk_priority(event.outcome),
            now=now,
            supervision=await supervision_at(tx.conn, now),
            order_id=event.reference if event.action == "reserve" else "",
            subject=event.decision_id,
            source_event_id=env.event_id,
            summary=f"{event.action} {event.outcome} by {by}"[:300],
        )
        await self.pipeline.run(
            CASE,
            command.case_id,
            lambda c: domain.open_case(c, command),
            Context(service_actor(SERVICE), causation_id=env.event_id),
            tx=tx,
            reload=False,
        )

    async def open_finding(
        self,
        key: str,
        summary: str,
        *,
        subject: str = "",
        order_id: str = "",
        source_event_id: str = "",
    ) -> domain.Case:
        """Open the case of a post-hoc detector's finding (services/audit/detectors.py: its
        ``key``, a summary of its reason and evidence, ids and amounts only), once per key."""
        now = self.clock()
        async with self.store.transaction() as tx:
            command = domain.Open(
                case_id=domain.finding_case_id(key),
                kind=domain.DETECTION,
                priority=domain.HIGH,
                now=now,
                supervision=await supervision_at(tx.conn, now),
                order_id=order_id[:64],
                subject=(subject or key)[:200],
                source_event_id=source_event_id,
                summary=summary[:300],
            )
            outcome = await self.pipeline.run(
                CASE,
                command.case_id,
                lambda c: domain.open_case(c, command),
                Context(service_actor(SERVICE), correlation_id=order_id),
                tx=tx,
            )
        assert outcome.state is not None
        return outcome.state

    async def open_flagged_action(
        self,
        tx: Tx,
        case_id: str,
        operator: str,
        action_event_id: str,
        summary: str,
        note: str,
        actor: common_pb2.Actor,
    ) -> None:
        """Open the case of an operator action a supervisor flagged in a review (in the
        review's transaction ``tx``), with the supervisor's note as its text, sealed under
        the case's own key."""
        now = self.clock()
        digest, length = text_digest(note)
        key = await self._new_key(tx, case_id)
        command = domain.Open(
            case_id=case_id,
            kind=domain.SUPERVISOR_REVIEW,
            priority=domain.HIGH,
            now=now,
            supervision=await supervision_at(tx.conn, now),
            subject=operator[:200],
            source_event_id=action_event_id,
            summary=summary[:300],
            text_sealed=vault.seal(key, note, case_id.encode()),
            text_sha256=digest,
            text_length=length,
        )
        await self.pipeline.run(
            CASE,
            case_id,
            lambda c: domain.open_case(c, command),
            Context(actor, causation_id=action_event_id),
            tx=tx,
            reload=False,
        )

    async def _link(self, tx: Tx, env: Envelope, case_id: str) -> None:
        await self.pipeline.run(
            CASE,
            case_id,
            lambda c: domain.applied(c, env.service, env.event_id, env.event_type),
            Context(service_actor(SERVICE), causation_id=env.event_id),
            tx=tx,
            reload=False,
        )

    async def _record_action(self, tx: Tx, env: Envelope, event: Message | None) -> None:
        override = env.event_type in domain.OVERRIDES and (
            not isinstance(event, ev.QualificationRestored | ev.QualificationForfeited)
            or bool(event.case_id)
        )
        at = env.occurred_at.ToDatetime(tzinfo=UTC)
        operator = env.actor.id[:64]
        await tx.conn.execute(
            pg_insert(operator_actions)
            .values(
                event_id=env.event_id,
                operator=operator,
                role=_ROLES[env.actor.kind],
                service=env.service[:32],
                event_type=env.event_type[:200],
                stream_id=env.stream_id[:200],
                reason=env.actor.reason[:300],
                occurred_at=at,
                override=override,
            )
            .on_conflict_do_nothing()
        )
        if override:
            await self._watch_overrides(tx, env, operator, at)

    async def _watch_overrides(self, tx: Tx, env: Envelope, operator: str, at: datetime) -> None:
        rules = await supervision_at(tx.conn, at)
        since = at - timedelta(hours=rules.override_window_hours)
        count = await tx.conn.scalar(
            select(func.count())
            .select_from(operator_actions)
            .where(
                operator_actions.c.operator == operator,
                operator_actions.c.override.is_(True),
                operator_actions.c.occurred_at > since,
                operator_actions.c.occurred_at <= at,
            )
        )
        open_case = await tx.conn.scalar(
            select(func.count())
            .select_from(cases)
            .where(
                cases.c.kind == domain.OPERATOR_ACTIVITY,
                cases.c.subject == operator,
                cases.c.status != domain.RESOLVED,
            )
        )
        if not domain.operator_case_due(int(count or 0), rules, bool(open_case)):
            return
        now = at  # the deadlines run from the override that reached the limit
        command = domain.Open(
            case_id=f"ops-{env.event_id}",
            kind=domain.OPERATOR_ACTIVITY,
            priority=domain.HIGH,
            now=now,
            supervision=rules,
            subject=operator,
            source_event_id=env.event_id,
            summary=(
                f"{count} overrides by {operator} within {rules.override_window_hours} h "
                f"(limit {rules.override_limit})"
            ),
        )
        await self.pipeline.run(
            CASE,
            command.case_id,
            lambda c: domain.open_case(c, command),
            Context(service_actor(SERVICE), causation_id=env.event_id),
            tx=tx,
            reload=False,
        )

    # -- the overdue sweeper ---------------------------------------------------------------
    async def raise_overdue(self, batch: int = 500) -> int:
        """Record CaseOverdue for each deadline passed unmet (once each), for up to ``batch``
        cases; returns how many alerts were raised. Each is decided under the case's lock."""
        now = self.clock()
        first_due = and_(
            cases.c.responded.is_(False),
            cases.c.first_response_due <= now,
            cases.c.first_response_alerted.is_(False),
        )
        resolution_due = and_(cases.c.resolution_due <= now, cases.c.resolution_alerted.is_(False))
        async with self.store.engine.connect() as conn:
            due = (
                await conn.execute(
                    select(cases.c.case_id)
                    .where(cases.c.status != domain.RESOLVED, or_(first_due, resolution_due))
                    .order_by(cases.c.resolution_due)
                    .limit(batch)
                )
            ).scalars()
            case_ids = list(due)
        raised = 0
        ctx = Context(service_actor(SERVICE), correlation_id="case-sweep")
        for case_id in case_ids:
            outcome = await self.pipeline.run(
                CASE, case_id, lambda c: domain.overdue(c, now), ctx, reload=False
            )
            for env in outcome.appended:
                alert = ev.CaseOverdue.FromString(env.payload)
                log.warning(
                    "case %s overdue: %s was due %s",
                    case_id,
                    alert.deadline,
                    alert.due.ToDatetime(tzinfo=UTC).isoformat(),
                    extra={"alert": ALERT},
                )
            raised += len(outcome.appended)
        return raised

    async def overdue_loop(self, stop: asyncio.Event) -> None:
        """Sweep overdue cases every ``sweep_every_s`` until ``stop``."""

        async def sweep() -> None:
            while await self.raise_overdue() > 0:
                pass

        await every(
            stop,
            self.sweep_every_s,
            sweep,
            log=log,
            failure="case overdue sweep failed",
            alert=ALERT,
        )
