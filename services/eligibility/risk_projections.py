"""Eligibility's risk read models, fed by its risk events: the proposed changes, the rule sets
and list entries in force (the kernel's risk tables, which every replica's in-memory copy
reloads from), and the decisions operators review (the ledger's too, from its events).

``risk_observations`` is not a read model: the circumstances' blind indexes it holds are in no
event (a claim's event does not carry them), so it is never rebuilt, like ``person_keys``.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import replace
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    LargeBinary,
    String,
    Table,
    Text,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.kernel import riskscreen
from services.kernel.contract import risk
from services.kernel.events import Envelope, payload_of
from services.kernel.eventstore import START, EventStore
from subsidy.v1 import events_pb2 as ev

from . import risk_domain
from .projections import metadata

tables = riskscreen.risk_tables(metadata)

risk_changes = Table(
    "risk_changes",
    metadata,
    Column("change_id", String(80), primary_key=True),
    Column("kind", String(8), nullable=False),
    Column("status", String(16), nullable=False),
    Column("proposed_by", String(64), nullable=False),
    Column("approved_by", String(64), nullable=False),
    Column("proposal", LargeBinary, nullable=False),  # the RiskChangeProposed message
    Column("activated_version", BigInteger, nullable=False),
    Column("proposed_at", DateTime(timezone=True), nullable=False),
    Index("risk_changes_by_status", "status", "proposed_at"),
)
risk_decisions = Table(
    "risk_decisions",
    metadata,
    Column("decision_id", String(64), primary_key=True),
    Column("service", String(16), nullable=False),
    Column("action", String(8), nullable=False),
    Column("outcome", String(8), nullable=False),
    Column("rule_id", String(80), nullable=False),
    Column("rule_set_version", BigInteger, nullable=False),
    Column("lists_version", BigInteger, nullable=False),
    Column("inputs", Text, nullable=False),  # masked, JSON
    Column("consumer_id", String(64), nullable=False),
    Column("reference", String(64), nullable=False),
    Column("subject_kind", String(16), nullable=False),
    Column("subject_index", String(128), nullable=False),
    Column("subject_masked", String(64), nullable=False),
    Column("entry_id", String(64), nullable=False),
    Column("window_s", BigInteger, nullable=False),
    Column("decided_at", DateTime(timezone=True), nullable=False),
    Column("status", String(8), nullable=False),
    Column("lifted_by", String(64), nullable=False),
    Column("lift_reason", Text, nullable=False),
    Index("risk_decisions_by_time", "decided_at"),
)

RISK_EVENTS = (
    ev.RiskChangeProposed,
    ev.RiskChangeApproved,
    ev.RiskRulesActivated,
    ev.RiskListChanged,
    ev.RiskDecisionRecorded,
    ev.RiskBlockLifted,
)


def _at(env: Envelope) -> dt.datetime:
    return env.occurred_at.ToDatetime(tzinfo=dt.UTC)


def change_of(row: Any) -> risk_domain.RiskChange:
    proposed = ev.RiskChangeProposed.FromString(row.proposal)
    change = risk_domain.evolve_change(None, proposed, row.proposed_by)
    assert change is not None
    return replace(change, status=row.status, approved_by=row.approved_by)


async def load_change(conn: AsyncConnection, change_id: str) -> risk_domain.RiskChange | None:
    row = (
        await conn.execute(select(risk_changes).where(risk_changes.c.change_id == change_id))
    ).first()
    return change_of(row) if row is not None else None


async def load_decision(conn: AsyncConnection, decision_id: str) -> risk_domain.Decision | None:
    row = (
        await conn.execute(
            select(risk_decisions).where(risk_decisions.c.decision_id == decision_id)
        )
    ).first()
    if row is None:
        return None
    subject = (
        risk.Subject(risk.Kind(row.subject_kind), row.subject_index, row.subject_masked)
        if row.subject_kind
        else None
    )
    return risk_domain.Decision(
        row.decision_id, row.outcome, row.status, subject, row.entry_id, int(row.window_s)
    )


async def load_live_entry(conn: AsyncConnection, entry_id: str) -> risk.ListEntry | None:
    """The entry, if it is on its list (not removed; an expired one is still there)."""
    e = tables.list_entries.c
    row = (
        await conn.execute(
            select(tables.list_entries).where(e.entry_id == entry_id, e.status == riskscreen.ACTIVE)
        )
    ).first()
    if row is None:
        return None
    return risk.ListEntry(
        row.entry_id,
        risk.ListName(row.list),
        risk.Kind(row.kind),
        row.subject_index,
        row.subject_masked,
        row.expires_at,
    )


async def versions(conn: AsyncConnection) -> tuple[int, int]:
    """(rules version, lists version) as the projections have them."""
    s = tables.state.c
    row = (await conn.execute(select(s.rules_version, s.lists_version))).first()
    return (int(row[0]), int(row[1])) if row else (0, 0)


async def apply_event(conn: AsyncConnection, env: Envelope) -> None:
    """Apply one risk event (eligibility's own, or a ledger decision) to the read models."""
    event = payload_of(env)
    if isinstance(event, ev.RiskChangeProposed):
        change = risk_domain.evolve_change(None, event, env.actor.id)
        assert change is not None
        await conn.execute(
            insert(risk_changes).values(
                change_id=change.change_id,
                kind=change.kind,
                status=change.status,
                proposed_by=change.proposed_by,
                approved_by="",
                proposal=event.SerializeToString(deterministic=True),
                activated_version=0,
                proposed_at=_at(env),
            )
        )
    elif isinstance(event, ev.RiskChangeApproved):
        await conn.execute(
            update(risk_changes)
            .where(risk_changes.c.change_id == event.change_id)
            .values(status=risk_domain.APPROVED, approved_by=env.actor.id)
        )
    elif isinstance(event, ev.RiskRulesActivated):
        await riskscreen.apply_rules_activated(conn, tables, event, _at(env))
        await _activated(conn, event.change_id, event.version)
    elif isinstance(event, ev.RiskListChanged):
        await riskscreen.apply_list_changed(conn, tables, event)
        if event.change_id:
            await _activated(conn, event.change_id, event.version)
    elif isinstance(event, ev.RiskDecisionRecorded):
        stmt = pg_insert(risk_decisions).values(
            decision_id=event.decision_id,
            service=env.service,
            action=event.action,
            outcome=event.outcome,
            rule_id=event.rule_id,
            rule_set_version=event.rule_set_version,
            lists_version=event.lists_version,
            inputs=json.dumps(dict(event.inputs), sort_keys=True, ensure_ascii=False),
            consumer_id=event.consumer_id,
            reference=event.reference,
            subject_kind=event.subject_kind,
            subject_index=event.subject_index,
            subject_masked=event.subject_masked,
            entry_id=event.entry_id,
            window_s=event.window_s,
            decided_at=_at(env),
            status=risk_domain.OPEN,
            lifted_by="",
            lift_reason="",
        )
        await conn.execute(stmt.on_conflict_do_nothing())
    elif isinstance(event, ev.RiskBlockLifted):
        await conn.execute(
            update(risk_decisions)
            .where(risk_decisions.c.decision_id == event.decision_id)
            .values(status=risk_domain.LIFTED, lifted_by=env.actor.id, lift_reason=event.reason)
        )


async def _activated(conn: AsyncConnection, change_id: str, version: int) -> None:
    await conn.execute(
        update(risk_changes)
        .where(risk_changes.c.change_id == change_id)
        .values(activated_version=version)
    )


async def rebuild(store: EventStore) -> int:
    """Empty the risk read models and replay eligibility's risk events; returns how many were
    applied. The ledger's decisions (fed by its events) and the observations are kept."""
    n = 0
    async with store.transaction() as tx:
        for table in (risk_changes, tables.rule_sets, tables.list_entries, tables.state):
            await tx.conn.execute(table.delete())
        await tx.conn.execute(
            risk_decisions.delete().where(risk_decisions.c.service == "eligibility")
        )
        pos = START
        while batch := await store.read_all(pos, limit=1000):
            for rec in batch:
                pos = rec.position
                if rec.envelope.event_type in _RISK_TYPES:
                    await apply_event(tx.conn, rec.envelope)
                    n += 1
    return n


_RISK_TYPES = frozenset(e.DESCRIPTOR.full_name for e in RISK_EVENTS)
