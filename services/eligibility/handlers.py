"""Eligibility use cases: register a consumer, claim, lock, use and release qualifications."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo

import grpc
from google.protobuf.message import Message
from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.contract import personal_data as identity
from services.contract.policy import Policy
from services.invariants import check_person_limit, check_quota
from services.kernel import validate, vault
from services.kernel.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from services.kernel.events import Context, Envelope, payload_of, service_actor
from services.kernel.eventstore import EventStore, Tx
from services.kernel.rpc import as_domain_error
from subsidy.v1 import common_pb2, identity_pb2, identity_pb2_grpc
from subsidy.v1 import events_pb2 as ev

from .policies import PolicyCopy
from .projections import (
    AVAILABLE,
    FORFEITED,
    LOCKED,
    ONE_QUALIFICATION_PER_ORDER,
    USED,
    apply_event,
    consumers,
    person_keys,
    qualifications,
    quota_usage,
)

SERVICE = "eligibility"
log = logging.getLogger(__name__)
# What counts against the per-person limit: a forfeited qualification counts as used (a refund
# under the "forfeit" rule does not give the consumer another one).
ACTIVE = (AVAILABLE, LOCKED, USED, FORFEITED)
# Why a lock is given back: the API's three, and the ledger's compensation of a lock whose
# reservation the budget refused.


@dataclass(frozen=True)
class Verdict:
    match: bool
    reason: str


class IdentityAuthority(Protocol):
    """The provincial real-name platform: does this name + ID number + phone belong together?"""

    async def verify(self, name: str, id_number: str, phone: str) -> Verdict: ...


class GrpcIdentityAuthority:
    """The adapter over gRPC; the shipped simulator and a real platform's gateway both fit."""

    def __init__(self, stub: identity_pb2_grpc.IdentityAuthorityAsyncStub) -> None:
        self._stub = stub

    async def verify(self, name: str, id_number: str, phone: str) -> Verdict:
        try:
            res = await self._stub.VerifyThreeFactors(
                identity_pb2.VerifyThreeFactorsRequest(name=name, id_number=id_number, phone=phone)
            )
        except grpc.aio.AioRpcError as err:
            raise as_domain_error(err, "identity_authority") from err
        return Verdict(res.match, res.reason)


def consumer_stream(consumer_id: str) -> str:
    return f"consumer/{consumer_id}"


class Eligibility:
    def __init__(
        self,
        store: EventStore,
        keys: vault.Vault,
        authority: IdentityAuthority,
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.store = store
        self.vault = keys
        self.authority = authority
        self.clock = clock or (lambda: datetime.now(UTC))
        self.policies = PolicyCopy(store, self.clock)

    # -- consumers ------------------------------------------------------------------------
    async def register(
        self, name: str, id_number: str, phone: str, platform_id: str, actor: common_pb2.Actor
    ) -> tuple[dict[str, object], bool]:
        """Three-factor check, then store the person encrypted under their own key."""
        try:
            name = identity.validate_name(name)
        except identity.InvalidIdentity as exc:
            raise InvalidArgument(exc.reason, f"name: {exc}", field="name") from None
        try:
            id_number = identity.validate_id_number(id_number)
        except identity.InvalidIdentity as exc:
            raise InvalidArgument(exc.reason, f"id_number: {exc}", field="id_number") from None
        try:
            phone = identity.validate_phone(phone)
        except identity.InvalidIdentity as exc:
            raise InvalidArgument(exc.reason, f"phone: {exc}", field="phone") from None
        validate.identifier("platform_id", platform_id)
        verdict = await self.authority.verify(name, id_number, phone)
        if not verdict.match:
            raise FailedPrecondition(
                "IDENTITY_MISMATCH",
                "the identity authority did not confirm name, ID number and phone"
                f" ({verdict.reason})",
                authority_reason=verdict.reason,
            )
        try:
            id_index = await self.vault.blind_index("id_number", id_number)
            phone_index = await self.vault.blind_index("phone", phone)
        except vault.VaultUnavailable as exc:
            raise Unavailable("VAULT_UNAVAILABLE", str(exc)) from None
        existing = await self._consumer_by_index(id_index)
        if existing is not None:
            return existing, True
        consumer_id = f"c-{uuid.uuid4().hex}"
        try:
            key, wrapped = await self.vault.new_data_key()
        except vault.VaultUnavailable as exc:
            raise Unavailable("VAULT_UNAVAILABLE", str(exc)) from None
        aad = consumer_id.encode()
        event = ev.ConsumerRegistered(
            consumer_id=consumer_id,
            name_sealed=vault.seal(key, name, aad),
            id_number_sealed=vault.seal(key, id_number, aad),
            phone_sealed=vault.seal(key, phone, aad),
            id_number_index=id_index,
            phone_index=phone_index,
            id_number_masked=identity.mask_id_number(id_number),
            phone_masked=identity.mask_phone(phone),
            platform_id=platform_id,
        )
        try:
            async with self.store.transaction() as tx:
                await tx.conn.execute(
                    person_keys.insert().values(
                        consumer_id=consumer_id, wrapped_key=wrapped.ciphertext
                    )
                )
                await tx.emit(
                    SERVICE, consumer_stream(consumer_id), 0, [event], Context(actor), apply_event
                )
        except IntegrityError:
            # The same person registered concurrently: theirs won, ours rolled back whole.
            raced = await self._consumer_by_index(id_index)
            if raced is None:
                raise
            return raced, True
        registered = await self._consumer_by_index(id_index)
        assert registered is not None
        return registered, False

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
        self, consumer_id: str, category: str, channel: str, actor: common_pb2.Actor
    ) -> dict[str, object]:
        validate.identifier("consumer_id", consumer_id)
        validate.identifier("category", category)
        validate.identifier("channel", channel)
        policy = await self.policies.in_force()
        rule = policy.category(category)
        if rule is None:
            raise InvalidArgument(
                "UNKNOWN_CATEGORY",
                "category: not a category of the policy in force",
                field="category",
            )
        now = datetime.now(UTC)
        tz = ZoneInfo(policy.claim_window.timezone)
        day = now.astimezone(tz).date().isoformat()
        stream = consumer_stream(consumer_id)
        qid = f"q-{uuid.uuid4().hex}"
        async with self.store.transaction() as tx:
            version = await tx.lock_stream(stream)
            if version == 0:
                raise NotFound(
                    "UNKNOWN_CONSUMER", "consumer_id: not registered", field="consumer_id"
                )
            held = await tx.conn.scalar(
                select(func.count())
                .select_from(qualifications)
                .where(qualifications.c.consumer_id == consumer_id)
                .where(qualifications.c.category == category)
                .where(qualifications.c.status.in_(ACTIVE))
                .where((qualifications.c.status != AVAILABLE) | (qualifications.c.expires_at > now))
            )
            if int(held or 0) >= rule.per_person_limit:
                raise ResourceExhausted(
                    "PERSON_LIMIT_REACHED",
                    f"category: the limit of {rule.per_person_limit} per person is reached",
                    field="category",
                )
            await tx.conn.execute(
                pg_insert(quota_usage)
                .values(category=category, day=day, issued=0)
                .on_conflict_do_nothing()
            )
            issued = await tx.conn.scalar(
                select(quota_usage.c.issued)
                .where(quota_usage.c.category == category, quota_usage.c.day == day)
                .with_for_update()
            )
            if int(issued or 0) >= rule.daily_quota:
                raise ResourceExhausted(
                    "DAILY_QUOTA_EXHAUSTED",
                    f"category: today's quota of {rule.daily_quota} is used up",
                    field="category",
                )
            event = ev.QualificationClaimed(
                qualification_id=qid,
                consumer_id=consumer_id,
                category=category,
                channel=channel,
                quota_day=day,
            )
            event.expires_at.FromDatetime(now + timedelta(days=policy.qualification_validity_days))
            ctx = Context(actor, correlation_id=qid, policy_version=policy.version)
            await tx.emit(SERVICE, stream, version, [event], ctx, apply_event)
            check_quota(category, day, issued=int(issued or 0) + 1, quota=rule.daily_quota)
        return await self.qualification(qid)

    async def qualification(self, qid: str) -> dict[str, object]:
        validate.identifier("qualification_id", qid)
        async with self.store.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(qualifications).where(qualifications.c.qualification_id == qid)
                )
            ).first()
        if row is None:
            raise NotFound(
                "UNKNOWN_QUALIFICATION",
                "qualification_id: no such qualification",
                field="qualification_id",
            )
        return dict(row._mapping)

    async def _change(
        self,
        qid: str,
        actor: common_pb2.Actor,
        decide: object,
        tx: Tx | None = None,
        correlation: str = "",
    ) -> dict[str, object]:
        """Lock the owner's stream, decide on the current row, emit; one transaction (joins
        ``tx`` if given). Returns the qualification as it is after the change."""

        async def run(t: Tx) -> dict[str, object]:
            # Find the owner and lock their stream in one statement.
            locked = (
                await t.conn.execute(
                    text(
                        "SELECT s.stream_id, s.version FROM qualifications q JOIN streams s"
                        " ON s.stream_id = 'consumer/' || q.consumer_id"
                        " WHERE q.qualification_id = :q FOR UPDATE OF s"
                    ),
                    {"q": qid},
                )
            ).first()
            if locked is None:
                raise NotFound(
                    "UNKNOWN_QUALIFICATION",
                    "qualification_id: no such qualification",
                    field="qualification_id",
                )
            stream, version = str(locked[0]), int(locked[1])
            select_row = select(qualifications).where(qualifications.c.qualification_id == qid)
            current = dict((await t.conn.execute(select_row)).one()._mapping)
            events: list[Message] = decide(current)  # type: ignore[operator]
            if not events:
                return current
            await t.emit(SERVICE, stream, version, events, Context(actor, correlation), apply_event)
            return dict((await t.conn.execute(select_row)).one()._mapping)

        validate.identifier("qualification_id", qid)
        if tx is not None:
            return await run(tx)
        async with self.store.transaction() as t:
            return await run(t)

    async def lock(
        self,
        qid: str,
        order_id: str,
        category: str,
        consumer_id: str,
        actor: common_pb2.Actor,
        platform_id: str = "",
    ) -> dict[str, object]:
        validate.identifier("order_id", order_id)
        validate.identifier("consumer_id", consumer_id)
        validate.identifier("category", category)
        validate.identifier("platform_id", platform_id)

        def decide(q: dict[str, object]) -> list[Message]:
            if q["consumer_id"] != consumer_id:
                raise FailedPrecondition(
                    "QUALIFICATION_NOT_OWNED",
                    "qualification_id: belongs to another consumer",
                    field="qualification_id",
                )
            if q["status"] == LOCKED and q["order_id"] == order_id:
                return []  # idempotent
            if q["channel"] != platform_id:
                # A qualification is claimed through one channel and redeemed there only.
                raise FailedPrecondition(
                    "CHANNEL_MISMATCH",
                    f"qualification_id: claimed through {q['channel']}, not {platform_id}",
                    field="qualification_id",
                )
            if q["category"] != category:
                raise FailedPrecondition(
                    "CATEGORY_MISMATCH",
                    f"qualification_id: for {q['category']}, the item is {category}",
                    field="qualification_id",
                )
            if q["status"] != AVAILABLE:
                raise FailedPrecondition(
                    f"QUALIFICATION_{q['status']}",
                    f"qualification_id: is {q['status']}",
                    field="qualification_id",
                )
            expires = q["expires_at"]
            assert isinstance(expires, datetime)
            if expires <= datetime.now(UTC):
                raise FailedPrecondition(
                    "QUALIFICATION_EXPIRED",
                    "qualification_id: has expired",
                    field="qualification_id",
                )
            return [ev.QualificationLocked(qualification_id=qid, order_id=order_id)]

        try:
            return await self._change(qid, actor, decide, correlation=order_id)
        except IntegrityError as exc:
            if ONE_QUALIFICATION_PER_ORDER not in str(exc.orig):
                raise
            raise FailedPrecondition(
                "ORDER_HAS_QUALIFICATION",
                "order_id: another qualification is already locked to or used by this order",
                field="order_id",
            ) from None

    async def consumed(self, qid: str, order_id: str) -> dict[str, object]:
        """The qualification as the payment of ``order_id`` left it: locked to that order, or
        used by it once the ledger's SubsidyCaptured has arrived. Any other order is refused."""
        validate.identifier("order_id", order_id)
        row = await self.qualification(qid)
        if row["order_id"] != order_id or row["status"] not in (LOCKED, USED):
            raise FailedPrecondition(
                "QUALIFICATION_NOT_LOCKED_TO_ORDER",
                f"qualification_id: is {row['status']}, not locked to this order",
                field="order_id",
            )
        return row

    # -- reactions to the ledger's events -------------------------------------------------
    async def on_ledger_event(self, tx: Tx, env: Envelope) -> None:
        """Payment posts -> used; cancel, expiry or a refused reservation -> unlocked; a refund ->
        restored or forfeited under the order's policy. The only ways a locked qualification is
        freed. Each acts only on the qualification held by that very order, and a refund is
        judged by the event (was the order paid?), not by which event arrived first."""
        event = payload_of(env)
        if not isinstance(event, ev.SubsidyCaptured | ev.SubsidyReleased | ev.ReservationRefused):
            return
        qid = (
            event.qualification_id
            or (
                await tx.conn.execute(
                    select(qualifications.c.qualification_id).where(
                        qualifications.c.order_id == event.order_id,
                        qualifications.c.status.in_((LOCKED, USED)),
                    )
                )
            ).scalar()
        )
        if not qid:
            return  # never locked here
        actor = service_actor(SERVICE)
        refunded = isinstance(event, ev.SubsidyReleased) and event.was_captured
        refund_rule = (
            (await self.policies.version(env.policy_version)).refund_rule.value if refunded else ""
        )

        def decide(q: dict[str, object]) -> list[Message]:
            order = event.order_id
            if q["order_id"] != order or q["status"] not in (LOCKED, USED):
                return []  # unlocked already, or since given to another order: not ours
            if isinstance(event, ev.SubsidyCaptured):
                if q["status"] == LOCKED:
                    return [ev.QualificationUsed(qualification_id=qid, order_id=order)]
                return []
            if refunded:
                cls = (
                    ev.QualificationRestored
                    if refund_rule == "restore"
                    else ev.QualificationForfeited
                )
                return [cls(qualification_id=qid, order_id=order, reason=event.reason)]
            if q["status"] == LOCKED:
                return [
                    ev.QualificationUnlocked(
                        qualification_id=qid, order_id=order, reason=event.reason
                    )
                ]
            return []

        try:
            await self._change(qid, actor, decide, tx=tx, correlation=event.order_id)
        except NotFound:
            return  # a qualification this service never had

    async def check_limits(self) -> None:
        """Check the per-person and quota invariants under the policy in force."""
        await check_limits(self.store.engine, await self.policies.in_force())


async def check_limits(engine: AsyncEngine, policy: Policy) -> None:
    """Per consumer and category used + locked ≤ the limit, and every daily quota held, over an
    eligibility database (the service, the tests and the chaos test all call this)."""
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                select(
                    qualifications.c.consumer_id,
                    qualifications.c.category,
                    func.count().filter(qualifications.c.status.in_((USED, FORFEITED))),
                    func.count().filter(qualifications.c.status == LOCKED),
                ).group_by(qualifications.c.consumer_id, qualifications.c.category)
            )
        ).all()
        quotas = (await conn.execute(select(quota_usage))).all()
    for consumer_id, category, used, locked in rows:
        rule = policy.category(category)
        assert rule is not None
        check_person_limit(
            consumer_id, category, used=used, locked=locked, limit=rule.per_person_limit
        )
    for q in quotas:
        rule = policy.category(q.category)
        assert rule is not None
        check_quota(q.category, q.day, issued=q.issued, quota=rule.daily_quota)
