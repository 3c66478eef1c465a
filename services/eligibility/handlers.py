"""Eligibility use cases: register a consumer, claim, lock, and settle qualifications.
(Same user, linking and erasure, are in persons.py; this file is a little over 450 lines
because registration records the platform's identifiers in the same transaction.)

Each use case builds a command from already-validated input (``api.py`` validates at the
edge), runs it through the kernel's pipeline with a decision from ``domain.py``, and returns
the state it left. The clock is injected, so tests decide what "now" is.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from google.protobuf.message import Message
from sqlalchemy import String, any_, bindparam, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.invariants import check_person_limits, check_quota, check_quota_counted
from services.kernel import vault
from services.kernel.background import every
from services.kernel.command_batch import CommandBatcher
from services.kernel.contract.personal_data import mask_id_number, mask_phone
from services.kernel.contract.policy import Policy
from services.kernel.errors import FailedPrecondition, NotFound, Unavailable
from services.kernel.events import Context, Envelope, payload_of, service_actor
from services.kernel.eventstore import EventStore, Tx
from services.kernel.pipeline import Aggregate, Decision, Outcome, Pipeline
from services.kernel.riskscreen import Circumstances
from services.kernel.sql import Statement
from subsidy.v1 import common_pb2
from subsidy.v1 import events_pb2 as ev

from . import domain, linking
from .authority import IdentityAuthority
from .claim_batch import QUOTA_ROW, ClaimBatcher, claimed
from .persons import Persons, consumer_erased, lock_person, persons_and_allowances
from .policies import PolicyCopy
from .projections import (
    ONE_QUALIFICATION_PER_ORDER,
    apply_event,
    apply_events,
    as_qualification,
    consumer_platforms,
    consumer_stream,
    consumers,
    identity_failures,
    load_qualification,
    load_qualifications,
    person_keys,
    qualifications,
    quota_usage,
)
from .risk import RiskControl

SERVICE = "eligibility"
log = logging.getLogger(__name__)
IDS = ARRAY(String())


@dataclass(frozen=True)
class ClaimKey:
    consumer_id: str
    platform_id: str  # the platform the claim comes through
    category: str
    day: str
    now: datetime


@dataclass(frozen=True)
class QualificationKey:
    consumer_id: str
    qualification_id: str


async def _load_consumer(conn: AsyncConnection, consumer_id: str) -> dict[str, object] | None:
    row = (
        await conn.execute(select(consumers).where(consumers.c.consumer_id == consumer_id))
    ).first()
    return dict(row._mapping) if row else None


# A claim's statements (the single claim's load; the quota row's is claim_batch.py's),
# compiled once and run prepared.
_ENROLLED = Statement(
    select(consumer_platforms.c.consumer_id).where(
        consumer_platforms.c.consumer_id == bindparam("consumer_id"),
        consumer_platforms.c.platform_id == bindparam("platform_id"),
    ),
    name="enrolled",
)
_OWNED = Statement(
    select(qualifications).where(
        qualifications.c.consumer_id == any_(bindparam("ids", type_=IDS)),
        qualifications.c.category == bindparam("category"),
    ),
    name="owned_qualifications",
)


async def _load_claim(conn: AsyncConnection, key: ClaimKey) -> domain.ClaimState:
    """Under the consumer's lock and their person's: the qualifications of the category of
    every consumer of the person, and the day's quota row, locked too, so that the per-person
    limit and the quota are exact under any concurrency."""
    registered = await _ENROLLED.scalar(
        conn, consumer_id=key.consumer_id, platform_id=key.platform_id
    )
    # Same user: every consumer of the person counts, and the person is locked (persons.py).
    person = await lock_person(conn, key.consumer_id)
    rows = await _OWNED.all(conn, ids=sorted(person), category=key.category)
    # The day's row, created if missing, locked and read in one statement (an upsert that
    # changes nothing takes the row lock and returns the count, as claim_batch's does).
    issued = await QUOTA_ROW.scalar(conn, category=key.category, day=key.day)
    return domain.ClaimState(
        registered is not None, tuple(as_qualification(r) for r in rows), int(issued or 0), person
    )


async def _load_qualification(
    conn: AsyncConnection, key: QualificationKey
) -> domain.Qualification | None:
    return await load_qualification(conn, key.qualification_id)


async def _load_qualifications(
    conn: AsyncConnection, keys: Sequence[QualificationKey]
) -> dict[QualificationKey, domain.Qualification]:
    found = await load_qualifications(conn, [k.qualification_id for k in keys])
    return {k: found[k.qualification_id] for k in keys if k.qualification_id in found}


class _QualificationScope:
    """What one transaction's qualification commands share (services/kernel/command_batch.py):
    each qualification read once. Its projection is handed the state the decision was made on
    (read under the stream's lock, nothing written to it since), and the state after is the
    one the projection wrote, not read back: one read and one write a command."""

    def __init__(self, store: EventStore) -> None:
        self.known: dict[str, domain.Qualification] = {}

        async def project(conn: AsyncConnection, env: Envelope) -> None:
            await apply_event(conn, env, self.known)

        self.pipeline = Pipeline(store, SERVICE, project)

    def decision(
        self, key: QualificationKey, decide: Decision[domain.Qualification]
    ) -> Decision[domain.Qualification]:
        def deciding(q: domain.Qualification | None) -> Sequence[Message]:
            if q is not None:
                self.known[q.qualification_id] = q
            return decide(q)

        return deciding

    def answer(
        self, key: QualificationKey, outcome: Outcome[domain.Qualification]
    ) -> Outcome[domain.Qualification]:
        return replace(outcome, state=self.known.get(key.qualification_id, outcome.state))


async def _load_enrolment(conn: AsyncConnection, consumer_id: str) -> frozenset[str]:
    rows = await conn.execute(
        select(consumer_platforms.c.platform_id).where(
            consumer_platforms.c.consumer_id == consumer_id
        )
    )
    return frozenset(rows.scalars())


@dataclass(frozen=True)
class IdentityKey:
    id_number_index: str
    day: str


async def _load_failures(conn: AsyncConnection, key: IdentityKey) -> int:
    failures = await conn.scalar(
        select(identity_failures.c.failures).where(
            identity_failures.c.id_number_index == key.id_number_index,
            identity_failures.c.day == key.day,
        )
    )
    return int(failures or 0)


IDENTITY_CHECKS: Aggregate[IdentityKey, int] = Aggregate(
    "identity-check", lambda k: f"identity-check/{k.id_number_index}", _load_failures
)
CONSUMER: Aggregate[str, dict[str, object]] = Aggregate("consumer", consumer_stream, _load_consumer)
ENROLMENT: Aggregate[str, frozenset[str]] = Aggregate("consumer", consumer_stream, _load_enrolment)
CLAIM: Aggregate[ClaimKey, domain.ClaimState] = Aggregate(
    "claim", lambda k: consumer_stream(k.consumer_id), _load_claim
)
QUALIFICATION: Aggregate[QualificationKey, domain.Qualification] = Aggregate(
    "qualification",
    lambda k: consumer_stream(k.consumer_id),
    _load_qualification,
    _load_qualifications,
)

# Which qualification a ledger outcome settles (Eligibility._holder), compiled once.
_HOLDER = select(qualifications.c.consumer_id, qualifications.c.qualification_id)
_HOLDER_BY_ID = Statement(
    _HOLDER.where(qualifications.c.qualification_id == bindparam("qid")), name="holder_by_id"
)
_HOLDER_BY_ORDER = Statement(
    _HOLDER.where(
        qualifications.c.order_id == bindparam("order_id"),
        qualifications.c.status == any_(bindparam("held", list(domain.HELD), type_=IDS)),
    ),
    name="holder_by_order",
)


class Eligibility:
    """Consumers and their qualifications."""

    def __init__(
        self,
        store: EventStore,
        keys: vault.Vault,
        authority: IdentityAuthority,
        *,
        clock: Callable[[], datetime] | None = None,
        identity_attempts_per_day: int = 5,
        sweep_every_s: float = 5.0,
        risk: RiskControl | None = None,
    ) -> None:
        self.store = store
        self.sweep_every_s = sweep_every_s
        self.identity_attempts_per_day = identity_attempts_per_day
        self.vault = keys
        self.authority = authority
        self.clock = clock or (lambda: datetime.now(UTC))
        self.policies = PolicyCopy(store, lambda: self.clock())  # the clock as injected now
        self.pipeline = Pipeline(store, SERVICE, apply_event, project_many=apply_events)
        self.persons = Persons(store, keys, self.pipeline, lambda: self.clock())
        # RISK: the screen claims go through, and the rules and lists it owns (risk.py).
        self.risk = risk or RiskControl(store, keys, self.clock)
        # Claims of one category and day, decided a batch at a time under the rush.
        self.claims = ClaimBatcher(store, self.pipeline, CLAIM)
        # The ledger's locks (LockQualification, one a reservation): the concurrent ones, on
        # different consumers' streams, in one transaction and one commit.
        self.locks: CommandBatcher[QualificationKey, domain.Qualification] = CommandBatcher(
            store, QUALIFICATION, lambda: _QualificationScope(store), name="locks"
        )

    # -- consumers ------------------------------------------------------------------------
    async def register(
        self,
        name: str,
        id_number: str,
        phone: str,
        platform_id: str,
        actor: common_pb2.Actor,
        identifiers: Sequence[tuple[linking.Kind, str]] = (),
    ) -> tuple[dict[str, object], bool]:
        """Three-factor check, then store the person encrypted under their own key, with the
        platform's further identifiers (blind indexed; linked to any consumer sharing one, the
        phone included). Everything arrives validated and canonical (api.py)."""
        try:
            id_index = await self.vault.blind_index("id_number", id_number)
        except vault.VaultUnavailable as exc:
            raise Unavailable("VAULT_UNAVAILABLE", str(exc)) from None
        day = self.clock().astimezone(UTC).date().isoformat()
        async with self.store.engine.connect() as conn:
            failures = await _load_failures(conn, IdentityKey(id_index, day))
        domain.check_attempts(failures, self.identity_attempts_per_day)
        verdict = await self.authority.verify(name, id_number, phone)
        if not verdict.match:
            await self.pipeline.run(
                IDENTITY_CHECKS,
                IdentityKey(id_index, day),
                lambda _: domain.record_mismatch(id_index, verdict.reason, platform_id, day),
                Context(actor),
            )
            raise domain.identity_mismatch()
        try:
            phone_index = await self.vault.blind_index("phone", phone)
        except vault.VaultUnavailable as exc:
            raise Unavailable("VAULT_UNAVAILABLE", str(exc)) from None
        given = (
            linking.Identifier(linking.Kind.ID_NUMBER, id_index, mask_id_number(id_number)),
            linking.Identifier(linking.Kind.PHONE, phone_index, mask_phone(phone)),
            *await self.persons.index(identifiers, platform_id),
        )
        existing = await self._consumer_by_index(id_index)
        if existing is not None:
            return await self._again(existing, platform_id, given, actor), True
        try:
            key, wrapped = await self.vault.new_data_key()
        except vault.VaultUnavailable as exc:
            raise Unavailable("VAULT_UNAVAILABLE", str(exc)) from None
        consumer_id = f"c-{uuid.uuid4().hex}"
        aad = consumer_id.encode()
        command = domain.Register(
            consumer_id=consumer_id,
            platform_id=platform_id,
            name_sealed=vault.seal(key, name, aad),
            id_number_sealed=vault.seal(key, id_number, aad),
            phone_sealed=vault.seal(key, phone, aad),
            id_number_index=id_index,
            phone_index=phone_index,
            id_number_masked=mask_id_number(id_number),
            phone_masked=mask_phone(phone),
        )
        try:
            async with self.store.transaction() as tx:
                await tx.conn.execute(
                    person_keys.insert().values(
                        consumer_id=consumer_id, wrapped_key=wrapped.ciphertext
                    )
                )
                outcome = await self.pipeline.run(
                    CONSUMER,
                    consumer_id,
                    lambda existing: domain.register(existing, command),
                    Context(actor),
                    tx=tx,
                )
                await self.persons.identify(consumer_id, platform_id, given, actor, tx=tx)
        except IntegrityError:
            # The same person registered concurrently: theirs won, ours rolled back whole.
            raced = await self._consumer_by_index(id_index)
            if raced is None:
                raise
            return await self._again(raced, platform_id, given, actor), True
        assert outcome.state is not None
        return outcome.state, False

    async def _again(
        self,
        existing: dict[str, object],
        platform_id: str,
        given: Sequence[linking.Identifier],
        actor: common_pb2.Actor,
    ) -> dict[str, object]:
        """A registered person registering again: refused once erased; else enrolled with the
        platform, and what it knows of them recorded and linked."""
        consumer_id = str(existing["consumer_id"])
        async with self.store.engine.connect() as conn:
            if await consumer_erased(conn, consumer_id):
                raise linking.consumer_erased()
        await self._enrol(consumer_id, platform_id, actor)
        await self.persons.identify(consumer_id, platform_id, given, actor)
        return existing

    async def _enrol(self, consumer_id: str, platform_id: str, actor: common_pb2.Actor) -> None:
        """The same person through another platform: that platform may serve them too."""
        await self.pipeline.run(
            ENROLMENT,
            consumer_id,
            lambda enrolled: domain.enrol(enrolled or frozenset(), consumer_id, platform_id),
            Context(actor),
        )

    async def _consumer_by_index(self, id_index: str) -> dict[str, object] | None:
        async with self.store.engine.connect() as conn:
            row = (
                await conn.execute(select(consumers).where(consumers.c.id_number_index == id_index))
            ).first()
        return dict(row._mapping) if row else None

    async def reveal(self, consumer_id: str) -> dict[str, str]:
        """Decrypt a consumer's personal data (operators with a reason only; not on an API yet)."""
        async with self.store.engine.connect() as conn:
            wrapped = (
                await conn.execute(
                    select(person_keys.c.wrapped_key).where(
                        person_keys.c.consumer_id == consumer_id
                    )
                )
            ).scalar()
        if wrapped is None:
            raise NotFound("PERSON_SHREDDED", "consumer_id: no key: shredded or unknown")
        key = await self.vault.unwrap(vault.WrappedKey(wrapped))
        first = (await self.store.read_stream(consumer_stream(consumer_id), 1))[0]
        reg = ev.ConsumerRegistered.FromString(first.payload)
        aad = consumer_id.encode()
        return {
            "name": vault.unseal(key, reg.name_sealed, aad),
            "id_number": vault.unseal(key, reg.id_number_sealed, aad),
            "phone": vault.unseal(key, reg.phone_sealed, aad),
        }

    # -- qualifications -------------------------------------------------------------------
    async def claim(
        self,
        consumer_id: str,
        category: str,
        channel: str,
        actor: common_pb2.Actor,
        circumstances: Circumstances | None = None,
    ) -> domain.Qualification:
        policy = await self.policies.in_force()
        now = self.clock()
        command = domain.Claim(
            consumer_id,
            category,
            channel,
            f"q-{uuid.uuid4().hex}",
            now,
            circumstances.region_code if circumstances else "",
        )
        # Category, window and region first: a claim refused on them takes no lock.
        domain.check_claimable(policy, command)
        key = ClaimKey(consumer_id, channel, category, domain.quota_day(policy, now), now)
        ctx = Context(actor, correlation_id=command.qualification_id, policy_version=policy.version)
        decide = lambda state: domain.claim(_claim_state(state), command, policy)  # noqa: E731
        if self.risk.idle():
            # No rule and no list entry could block or flag it: decided in a batch with the
            # concurrent claims of its category and day (claim_batch.py), unobserved.
            outcome = await self.claims.run(key, decide, ctx)
            # Answered from the event it appended, as the projection recorded it.
            return claimed(outcome) or await self.qualification(command.qualification_id)
        # RISK: screened in-process (services/eligibility/risk.py): a block raises RISK_BLOCKED
        # before the claim writes anything; the claim runs in the screen's transaction, where
        # its risk observation commits with it.
        async with self.risk.screened_claim(
            consumer_id, circumstances, command.qualification_id, now
        ) as tx:
            outcome = await self.pipeline.run(CLAIM, key, decide, ctx, tx=tx, reload=False)
        # Answered from the event it appended, as the projection recorded it (not read back).
        return claimed(outcome) or await self.qualification(command.qualification_id)

    async def qualification(self, qid: str, platform: str | None = None) -> domain.Qualification:
        """One qualification; a platform sees only those claimed through it."""
        # begin, not connect: a read committed keeps the connection's prepared statements,
        # which the ROLLBACK ending a connect() makes psycopg drop (DEALLOCATE ALL).
        async with self.store.engine.begin() as conn:
            found = domain.visible(await load_qualification(conn, qid), platform)
        if found is None:
            raise domain.unknown_qualification()
        return found

    async def lock(
        self,
        qid: str,
        order_id: str,
        category: str,
        consumer_id: str,
        actor: common_pb2.Actor,
        platform_id: str = "",
    ) -> domain.Qualification:
        """The ledger locks a qualification to an order (LockQualification)."""
        command = domain.Lock(qid, order_id, category, consumer_id, platform_id, self.clock())
        try:
            # In a batch with the concurrent locks (one transaction); a batch that breaks the
            # one-qualification-per-order constraint is run again lock by lock, so this is
            # raised to the lock that breaks it alone, and only to it.
            outcome = await self.locks.run(
                QualificationKey(consumer_id, qid),
                lambda q: domain.lock(q, command),
                Context(actor, correlation_id=order_id),
            )
        except IntegrityError as exc:
            if ONE_QUALIFICATION_PER_ORDER not in str(exc.orig):
                raise
            raise FailedPrecondition(
                "ORDER_HAS_QUALIFICATION",
                "order_id: another qualification is already locked to or used by this order",
                field="order_id",
            ) from None
        assert outcome.state is not None
        return outcome.state

    async def consumed(
        self, qid: str, order_id: str, platform: str | None = None
    ) -> domain.Qualification:
        """The qualification as the payment of ``order_id`` left it (ConsumeQualification)."""
        async with self.store.engine.begin() as conn:  # committed: see qualification()
            found = domain.visible(await load_qualification(conn, qid), platform)
        return domain.consumed(found, order_id)

    # -- outcomes of supervision cases (the audit service's cases) -------------------------
    async def restore_by_case(
        self, qid: str, case_id: str, actor: common_pb2.Actor
    ) -> domain.Qualification:
        """RestoreQualification: a forfeited qualification available again, naming the case."""
        command = domain.CaseRestore(qid, case_id, actor.reason, self.clock())
        policy = await self.policies.in_force()
        return await self._by_case(
            qid, case_id, actor, lambda q: domain.restore_by_case(q, command, policy)
        )

    async def forfeit_by_case(
        self, qid: str, case_id: str, actor: common_pb2.Actor
    ) -> domain.Qualification:
        """ForfeitQualification: an available qualification forfeited, naming the case."""
        command = domain.CaseForfeit(qid, case_id, actor.reason)
        return await self._by_case(
            qid, case_id, actor, lambda q: domain.forfeit_by_case(q, command)
        )

    async def _by_case(
        self,
        qid: str,
        case_id: str,
        actor: common_pb2.Actor,
        decide: Callable[[domain.Qualification | None], list[Message]],
    ) -> domain.Qualification:
        owner = (await self.qualification(qid)).consumer_id  # UNKNOWN_QUALIFICATION if none
        outcome = await self._on_qualification(
            QualificationKey(owner, qid), decide, Context(actor, correlation_id=case_id)
        )
        assert outcome.state is not None
        return outcome.state

    # -- reactions to the ledger's events -------------------------------------------------
    async def on_ledger_event(self, tx: Tx, env: Envelope) -> None:
        """Payment, cancellation, expiry, refusal or refund of an order, settled on the
        qualification that order holds (domain.settle): the only ways a lock is freed."""
        outcome = payload_of(env)
        if not isinstance(outcome, domain.LedgerOutcome):
            return
        owner = await self._holder(tx.conn, outcome)
        if owner is None:
            return  # never locked here
        order_policy = None
        if domain.is_refund(outcome):
            order_policy = await self.policies.version(env.policy_version)
        at = env.occurred_at.ToDatetime(tzinfo=UTC)
        await self._on_qualification(
            owner,
            lambda q: domain.settle(q, outcome, order_policy, at),
            Context(service_actor(SERVICE), correlation_id=outcome.order_id),
            tx=tx,
        )

    async def _on_qualification(
        self,
        key: QualificationKey,
        decide: Callable[[domain.Qualification | None], Sequence[Message]],
        ctx: Context,
        *,
        tx: Tx | None = None,
    ) -> Outcome[domain.Qualification]:
        """``pipeline.run(QUALIFICATION, key, decide, ctx)``, reading the qualification once
        (:class:`_QualificationScope`), as the hot path needs."""
        scope = _QualificationScope(self.store)
        outcome = await scope.pipeline.run(
            QUALIFICATION, key, scope.decision(key, decide), ctx, tx=tx, reload=False
        )
        return scope.answer(key, outcome)

    # -- the expiry sweeper -----------------------------------------------------------------
    async def expire_due(self, batch: int = 500) -> int:
        """Record QualificationExpired for up to ``batch`` available qualifications past their
        expiry; returns how many. Each is decided under its consumer's lock (domain.expire), so
        one locked meanwhile is left alone."""
        now = self.clock()
        async with self.store.engine.connect() as conn:
            due = (
                await conn.execute(
                    select(qualifications.c.consumer_id, qualifications.c.qualification_id)
                    .where(
                        qualifications.c.status == domain.AVAILABLE,
                        qualifications.c.expires_at <= now,
                    )
                    .order_by(qualifications.c.expires_at)
                    .limit(batch)
                )
            ).all()
        ctx = Context(service_actor(SERVICE), correlation_id="expiry-sweep")
        expired = 0
        for row in due:
            outcome = await self._on_qualification(
                QualificationKey(row.consumer_id, row.qualification_id),
                lambda q: domain.expire(q, now),
                ctx,
            )
            expired += len(outcome.appended)
        return expired

    async def expiry_loop(self, stop: asyncio.Event) -> None:
        """Sweep expired qualifications every ``sweep_every_s`` until ``stop``; a backlog (the
        service was down) is swept batch after batch."""

        async def sweep() -> None:
            while await self.expire_due() > 0:
                pass

        await every(
            stop,
            self.sweep_every_s,
            sweep,
            log=log,
            failure="qualification expiry sweep failed",
            alert="qualification-expiry",
        )

    @staticmethod
    async def _holder(
        conn: AsyncConnection, outcome: domain.LedgerOutcome
    ) -> QualificationKey | None:
        """The qualification an outcome names (older events name only the order) and its owner."""
        if outcome.qualification_id:
            row = await _HOLDER_BY_ID.first(conn, qid=outcome.qualification_id)
        else:
            row = await _HOLDER_BY_ORDER.first(conn, order_id=outcome.order_id)
        return QualificationKey(row.consumer_id, row.qualification_id) if row else None

    async def check_limits(self) -> None:
        """Check the per-person and quota invariants under the policy in force."""
        await check_limits(self.store.engine, await self.policies.in_force(), self.clock())


def _claim_state(state: domain.ClaimState | None) -> domain.ClaimState:
    assert state is not None  # _load_claim always answers
    return state


async def check_limits(engine: AsyncEngine, policy: Policy, now: datetime | None = None) -> None:
    """Over an eligibility database (the service, the tests and the chaos test all call this):
    per person (linked consumers together) and category, the qualifications that count against
    the limit, counted by the claim rule itself, are within it (or within what the person held
    when last linked); every day's quota counter equals the qualifications claimed that day and
    is within the quota."""
    now = now or datetime.now(UTC)
    async with engine.connect() as conn:
        # One snapshot for every read: a claim or a link committing in between would otherwise
        # make counters, qualifications and persons disagree for a moment.
        await conn.execution_options(isolation_level="REPEATABLE READ")
        rows = (await conn.execute(select(qualifications))).all()
        quotas = (await conn.execute(select(quota_usage))).all()
        person_of, held_when_linked = await persons_and_allowances(conn)
    by_consumer: dict[tuple[str, str], list[domain.Qualification]] = {}
    claimed: dict[tuple[str, str], int] = {}
    for row in rows:
        q = as_qualification(row)
        by_consumer.setdefault((q.consumer_id, q.category), []).append(q)
        claimed[(q.category, q.quota_day)] = claimed.get((q.category, q.quota_day), 0) + 1
    check_person_limits(
        {k: domain.held(qs, now) for k, qs in by_consumer.items()},
        person_of,
        lambda category: domain.category_rule(policy, category).per_person_limit,
        held_when_linked,
    )
    counters = {(q.category, q.day): int(q.issued) for q in quotas}
    for category, day in sorted(counters.keys() | claimed.keys()):
        rule = domain.category_rule(policy, category)
        issued = counters.get((category, day), 0)
        check_quota_counted(category, day, counter=issued, claimed=claimed.get((category, day), 0))
        check_quota(category, day, issued=issued, quota=rule.daily_quota)
