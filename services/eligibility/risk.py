"""Eligibility's risk-control use cases: the claim's screen, and the maker-checker changes of
the rule sets and lists it owns (services/eligibility/risk_domain.py decides them; the kernel's
pipeline appends and projects them, services/eligibility/risk_projections.py).

The claim's screen runs in-process: the rules and lists in force are this replica's copy in
memory (refreshed within 250 ms of any change, services/kernel/riskscreen.py), the circumstances
are blind-indexed in one Vault call, and the counts are of this service's own observations, taken
under advisory locks inside the claim's transaction, so they are exact under concurrency.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from services.kernel import vault
from services.kernel.contract import risk
from services.kernel.events import Context, Envelope, payload_of
from services.kernel.eventstore import EventStore, Tx
from services.kernel.pipeline import Aggregate, Pipeline
from services.kernel.riskscreen import ACTIVE, Circumstances, RiskScreen, Screening
from subsidy.v1 import common_pb2
from subsidy.v1 import events_pb2 as ev

from . import risk_domain
from .risk_projections import (
    apply_event,
    change_of,
    load_change,
    load_decision,
    load_live_entry,
    risk_changes,
    risk_decisions,
    tables,
    versions,
)

SERVICE = "eligibility"


@dataclass(frozen=True)
class ListsState:
    """The lists version, and the entry a change is about if it is still on its list."""

    version: int
    live: risk.ListEntry | None


@dataclass(frozen=True)
class LiftState:
    decision: risk_domain.Decision | None
    blocking: risk.ListEntry | None  # the list entry that blocked, if still on its list


async def _load_rules_version(conn: AsyncConnection, key: str) -> int:
    return (await versions(conn))[0]


async def _load_lists(conn: AsyncConnection, entry_id: str) -> ListsState:
    live = await load_live_entry(conn, entry_id) if entry_id else None
    return ListsState((await versions(conn))[1], live)


async def _load_lift(conn: AsyncConnection, decision_id: str) -> LiftState:
    decision = await load_decision(conn, decision_id)
    blocking = None
    if decision is not None and decision.entry_id:
        blocking = await load_live_entry(conn, decision.entry_id)
    return LiftState(decision, blocking)


CHANGE: Aggregate[str, risk_domain.RiskChange] = Aggregate(
    "risk-change", lambda change_id: f"risk-change/{change_id}", load_change
)
# One stream each: its version IS the rule-set version (the lists version).
RULES: Aggregate[str, int] = Aggregate("risk-rules", lambda _: "risk-rules", _load_rules_version)
LISTS: Aggregate[str, ListsState] = Aggregate("risk-lists", lambda _: "risk-lists", _load_lists)
LIFT: Aggregate[str, LiftState] = Aggregate(
    "risk-decision", lambda decision_id: f"risk-decision/{decision_id}", _load_lift
)


class _Refused(Exception):
    """Inside the claim's screen: the verdict is a block (rolls the claim's transaction back)."""


class RiskControl:
    """The rules and lists eligibility owns, and the screen claims go through."""

    def __init__(
        self, store: EventStore, keys: vault.Vault, clock: Callable[[], datetime] | None = None
    ) -> None:
        self.store = store
        self.clock = clock or (lambda: datetime.now(UTC))
        self.pipeline = Pipeline(store, SERVICE, apply_event)
        self.screen = RiskScreen(SERVICE, self.pipeline, keys, tables, self.clock)
        self.active = self.screen.active

    def idle(self) -> bool:
        """No rule and no list entry is in force: nothing could block or flag a claim."""
        return not self.active.rules.rules and not self.active.lists.entries

    # -- the claim's screen ---------------------------------------------------------------
    @asynccontextmanager
    async def screened_claim(
        self,
        consumer_id: str,
        circumstances: Circumstances | None,
        reference: str,
        now: datetime,
    ) -> AsyncIterator[Tx]:
        """The claim's transaction, screened: the verdict is taken in it, under locks on the
        subjects it counts; a block raises RISK_BLOCKED before the claim writes anything (and
        the decision is recorded in its own transaction); otherwise the claim runs in the
        yielded transaction and its observation commits with it. A flag is recorded once the
        claim's transaction has ended (never holding two connections)."""
        subjects = await self.screen.subjects(consumer_id, circumstances)
        screening: Screening | None = None
        try:
            async with self.store.transaction() as tx:
                screening = await self.screen.judge(
                    tx.conn, risk.Action.CLAIM, consumer_id, reference, subjects, now, lock=True
                )
                if screening.verdict.outcome is risk.Outcome.BLOCK:
                    raise _Refused()
                yield tx
                await self.screen.observe(tx.conn, screening, now)
        except _Refused:
            assert screening is not None
            raise await self.screen.refuse(screening) from None
        finally:
            if screening is not None and screening.verdict.outcome is risk.Outcome.FLAG:
                await self.screen.record(screening)

    # -- changes, maker-checker -----------------------------------------------------------
    async def propose_rules(
        self, rules: risk.RuleSet, reason: str, actor: common_pb2.Actor
    ) -> risk_domain.RiskChange:
        """An operator proposes a rule-set version; nothing changes until it is approved."""
        cmd = risk_domain.ProposeRules(f"rc-{uuid.uuid4().hex}", rules, reason)
        outcome = await self.pipeline.run(
            CHANGE,
            cmd.change_id,
            lambda existing: risk_domain.propose_rules(existing, cmd),
            Context(actor, correlation_id=cmd.change_id),
        )
        assert outcome.state is not None
        return outcome.state

    async def subject(self, kind: risk.Kind, value: str) -> risk.Subject:
        """The subject a list entry names, from its canonical value (Vault for a device or an
        address: only the blind index is kept)."""
        return await self.screen.subject_of(kind, value)

    async def propose_list_change(
        self,
        change: str,
        entry: risk.ListEntry | None,
        entry_id: str,
        entry_reason: str,
        reason: str,
        actor: common_pb2.Actor,
    ) -> risk_domain.RiskChange:
        """An operator proposes adding ``entry`` or removing the live entry ``entry_id``."""
        if change == risk_domain.REMOVE:
            async with self.store.engine.connect() as conn:
                entry = await load_live_entry(conn, entry_id)
                entry_reason = str(
                    await conn.scalar(
                        select(tables.list_entries.c.reason).where(
                            tables.list_entries.c.entry_id == entry_id
                        )
                    )
                    or ""
                )
            if entry is None:
                raise risk_domain.unknown_entry()
        assert entry is not None
        cmd = risk_domain.ProposeListChange(
            f"rc-{uuid.uuid4().hex}", change, entry, entry_reason, reason
        )
        outcome = await self.pipeline.run(
            CHANGE,
            cmd.change_id,
            lambda existing: risk_domain.propose_list_change(existing, cmd),
            Context(actor, correlation_id=cmd.change_id),
        )
        assert outcome.state is not None
        return outcome.state

    async def approve(
        self, cmd: risk_domain.Approve, actor: common_pb2.Actor
    ) -> tuple[risk_domain.RiskChange, int]:
        """A different approver approves: in one transaction the change is approved and made
        active (lock order: the change's stream, then risk-rules or risk-lists). Returns the
        change and the version its approval made."""
        ctx = Context(actor, correlation_id=cmd.change_id)
        async with self.store.transaction() as tx:
            outcome = await self.pipeline.run(
                CHANGE, cmd.change_id, lambda c: risk_domain.approve(c, cmd), ctx, tx=tx
            )
            change = outcome.state
            assert change is not None
            if outcome.appended:
                if change.kind == risk_domain.RULES:
                    await self.pipeline.run(
                        RULES,
                        "",
                        lambda v: risk_domain.activate_rules(v or 0, change),
                        ctx,
                        tx=tx,
                        reload=False,
                    )
                else:
                    assert change.entry is not None
                    about = change.entry.entry_id if change.list_change == "remove" else ""
                    await self.pipeline.run(
                        LISTS,
                        about,
                        lambda s: risk_domain.change_list(
                            _lists(s).version, change, _lists(s).live
                        ),
                        ctx,
                        tx=tx,
                        reload=False,
                    )
            activated = await tx.conn.scalar(
                select(risk_changes.c.activated_version).where(
                    risk_changes.c.change_id == cmd.change_id
                )
            )
        return change, int(activated or 0)

    async def change(self, change_id: str) -> tuple[risk_domain.RiskChange, int]:
        async with self.store.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(risk_changes).where(risk_changes.c.change_id == change_id)
                )
            ).first()
        if row is None:
            raise risk_domain.unknown_change()
        return change_of(row), int(row.activated_version)

    # -- lifting a block ------------------------------------------------------------------
    async def lift(
        self, decision_id: str, reason: str, exempt_for_s: int, actor: common_pb2.Actor
    ) -> dict[str, Any]:
        """An operator lifts a block (risk_domain.lift): the decision and the list change it
        makes, in one transaction (lock order: the decision's stream, then risk-lists)."""
        cmd = risk_domain.Lift(
            decision_id, reason, exempt_for_s, f"rle-{uuid.uuid4().hex}", self.clock()
        )
        ctx = Context(actor, correlation_id=decision_id)
        edits: list[risk_domain.ListEdit] = []

        def decide(state: LiftState | None) -> list[Any]:
            assert state is not None
            events, edit = risk_domain.lift(state.decision, cmd, state.blocking)
            if edit is not None:
                edits.append(edit)
            return events

        async with self.store.transaction() as tx:
            await self.pipeline.run(LIFT, decision_id, decide, ctx, tx=tx, reload=False)
            if edits:  # at most one
                edit = edits[0]
                about = edit.entry.entry_id if edit.change == risk_domain.REMOVE else ""
                await self.pipeline.run(
                    LISTS,
                    about,
                    lambda s: risk_domain.apply_lift(
                        _lists(s).version, _lists(s).live, edit, decision_id
                    ),
                    ctx,
                    tx=tx,
                    reload=False,
                )
        return await self.decision(decision_id)

    # -- reads ----------------------------------------------------------------------------
    async def rules(
        self,
    ) -> tuple[int, risk.RuleSet, datetime | None, list[risk_domain.RiskChange]]:
        """The rule set in force (as stored), when it was activated, and pending changes."""
        rs = tables.rule_sets.c
        async with self.store.engine.connect() as conn:
            version = (await versions(conn))[0]
            row = (
                await conn.execute(
                    select(rs.document, rs.activated_at).where(rs.version == version)
                )
            ).first()
            pending = (
                await conn.execute(
                    select(risk_changes)
                    .where(risk_changes.c.status == risk_domain.PROPOSED)
                    .order_by(risk_changes.c.proposed_at)
                    .limit(100)
                )
            ).all()
        rules = (
            risk.parse_rule_set(json.loads(row.document), version) if row else risk.RuleSet(version)
        )
        return version, rules, row.activated_at if row else None, [change_of(p) for p in pending]

    async def lists(
        self, name: str, kind: str, limit: int
    ) -> tuple[int, list[tuple[risk.ListEntry, str]]]:
        """The live entries (optionally of one list and kind), newest first."""
        e = tables.list_entries.c
        query = select(tables.list_entries).where(e.status == ACTIVE, e.expires_at > self.clock())
        if name:
            query = query.where(e.list == name)
        if kind:
            query = query.where(e.kind == kind)
        async with self.store.engine.connect() as conn:
            version = (await versions(conn))[1]
            rows = (await conn.execute(query.order_by(e.version.desc()).limit(limit))).all()
        return version, [
            (
                risk.ListEntry(
                    r.entry_id,
                    risk.ListName(r.list),
                    risk.Kind(r.kind),
                    r.subject_index,
                    r.subject_masked,
                    r.expires_at,
                ),
                r.reason,
            )
            for r in rows
        ]

    async def decisions(self, outcome: str, status: str, limit: int) -> list[dict[str, Any]]:
        """Blocks and flags of claims and reservations, newest first."""
        d = risk_decisions.c
        query = select(risk_decisions)
        if outcome:
            query = query.where(d.outcome == outcome)
        if status:
            query = query.where(d.status == status)
        async with self.store.engine.connect() as conn:
            rows = (await conn.execute(query.order_by(d.decided_at.desc()).limit(limit))).all()
        return [dict(r._mapping) for r in rows]

    async def decision(self, decision_id: str) -> dict[str, Any]:
        async with self.store.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(risk_decisions).where(risk_decisions.c.decision_id == decision_id)
                )
            ).first()
        if row is None:
            raise risk_domain.unknown_decision()
        return dict(row._mapping)

    # -- the ledger's decisions -----------------------------------------------------------
    async def on_ledger_decision(self, tx: Tx, env: Envelope) -> None:
        """Consumer of the ledger's RiskDecisionRecorded: one list of decisions to review."""
        if isinstance(payload_of(env), ev.RiskDecisionRecorded):
            await apply_event(tx.conn, env)


def _lists(state: ListsState | None) -> ListsState:
    assert state is not None  # _load_lists always answers
    return state
