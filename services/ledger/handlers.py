"""Ledger use cases: load, decide, append (with the read models updated in the same commit)."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from services.contract import budget
from services.contract.budget import pool_stream
from services.kernel import validate
from services.kernel.errors import AlreadyExists, DomainError, FailedPrecondition, NotFound
from services.kernel.events import Context, service_actor
from services.kernel.eventstore import EventStore, Tx, streams_table
from services.kernel.rpc import as_domain_error
from subsidy.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    common_pb2,
    eligibility_pb2,
    eligibility_pb2_grpc,
)
from subsidy.v1 import events_pb2 as ev

from . import domain
from .projections import (
    SERIAL_CONSTRAINT,
    apply_event,
    budget_pools,
    funding_keys,
    load_pool,
    refusal_stream,
)
from .projections import reservation_attempts as attempts_t
from .projections import reservations as reservations_t

SERVICE = "ledger"
# Answers after which eligibility certainly locked nothing.
DEFINITIVE = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.ALREADY_EXISTS,
}
log = logging.getLogger(__name__)


class Ledger:
    """Budget pools and the checkout's reserve / capture / release."""

    def __init__(
        self,
        store: EventStore,
        catalog: catalog_pb2_grpc.CatalogServiceAsyncStub,
        eligibility: eligibility_pb2_grpc.EligibilityServiceAsyncStub,
        *,
        reservation_timeout_s: int = 900,
        abandon_after_s: float = 60.0,
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.eligibility = eligibility
        self.timeout = timedelta(seconds=reservation_timeout_s)
        # Far longer than an attempt can take (two deadlines and a pool-lock wait).
        self.abandon_after_s = abandon_after_s

    async def _commit(
        self, tx: Tx, stream: str, version: int, events: list[Message], ctx: Context
    ) -> None:
        await tx.emit(SERVICE, stream, version, events, ctx, apply_event)

    # -- budget ---------------------------------------------------------------------------
    async def fund(
        self, pool_id: str, amount_fen: int, source: str, key: str, actor: common_pb2.Actor
    ) -> budget.Pool:
        validate.identifier("pool_id", pool_id)
        source = validate.text_field("source", source, max_len=64)
        if key:
            validate.identifier("idempotency_key", key, max_len=128)
        domain.fund(budget.Pool(pool_id), amount_fen, source)  # validate before any I/O
        stream = pool_stream(pool_id)
        async with self.store.transaction() as tx:
            version = await tx.lock_stream(stream)
            if key:
                prior = (
                    await tx.conn.execute(
                        select(funding_keys).where(funding_keys.c.idempotency_key == key)
                    )
                ).first()
                if prior is not None:
                    if prior.pool_id != pool_id or prior.amount_fen != amount_fen:
                        raise AlreadyExists(
                            "IDEMPOTENCY_KEY_REUSED",
                            "idempotency_key: used before for a different funding",
                            field="idempotency_key",
                        )
                    pool = await load_pool(tx.conn, pool_id)
                    assert pool is not None
                    return pool
            pool = await load_pool(tx.conn, pool_id) or budget.Pool(pool_id)
            events = domain.fund(pool, amount_fen, source)
            events[0].idempotency_key = key  # type: ignore[attr-defined]
            await self._commit(tx, stream, version, events, Context(actor, correlation_id=key))
            after = await load_pool(tx.conn, pool_id)
            assert after is not None
            return after

    async def get_pool(self, pool_id: str) -> budget.Pool:
        validate.identifier("pool_id", pool_id)
        async with self.store.engine.connect() as conn:
            pool = await load_pool(conn, pool_id)
        if pool is None:
            raise NotFound("UNKNOWN_POOL", f"pool_id: no budget pool {pool_id!r}", field="pool_id")
        return pool

    # -- checkout -------------------------------------------------------------------------
    async def get_reservation(self, order_id: str) -> dict[str, object] | None:
        async with self.store.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(reservations_t).where(reservations_t.c.order_id == order_id)
                )
            ).first()
        return dict(row._mapping) if row else None

    async def reserve(
        self, req: ev.SubsidyReserved, serial: str, actor: common_pb2.Actor
    ) -> dict[str, object]:
        """Verify the item, lock the qualification, reserve budget; idempotent on order id."""
        validate.identifier("order_id", req.order_id)
        validate.identifier("platform_id", req.platform_id)
        validate.identifier("pool_id", req.pool_id)
        validate.identifier("consumer_id", req.consumer_id)
        validate.identifier("qualification_id", req.qualification_id)
        validate.identifier("sku", req.sku)
        validate.price_fen("unit_price_fen", req.unit_price_fen)
        if serial:
            serial = validate.serial("serial", serial)
        async with self.store.engine.connect() as conn:  # one connection for both reads
            prior = (
                await conn.execute(
                    select(reservations_t).where(reservations_t.c.order_id == req.order_id)
                )
            ).first()
            if prior is not None:
                return self._same_order(dict(prior._mapping), req)
            if await self._was_refused(conn, req.order_id):
                raise self._order_refused()
            pool_now = await load_pool(conn, req.pool_id)
        try:
            item = await self.catalog.VerifyItem(
                catalog_pb2.VerifyItemRequest(
                    sku=req.sku, unit_price_fen=req.unit_price_fen, serial=serial
                )
            )
        except grpc.aio.AioRpcError as err:
            raise as_domain_error(err, "catalog") from err
        if not item.eligible:
            raise FailedPrecondition(
                "ITEM_NOT_ELIGIBLE",
                f"sku: not eligible ({', '.join(item.reasons)})",
                field="sku",
                reasons=",".join(item.reasons),
            )
        # Refuse what the budget already refuses before locking the qualification, so that
        # rejection changes nothing; the check in the transaction below still decides races.
        probe = ev.SubsidyReserved(pool_id=req.pool_id, subsidy_fen=item.subsidy_fen)
        domain.reserve(pool_now, probe)
        # Durable before the lock: if this process dies before the hold commits, the sweeper
        # finds the attempt and refuses the order, which undoes the lock.
        async with self.store.transaction() as tx:
            await tx.conn.execute(
                pg_insert(attempts_t)
                .values(
                    order_id=req.order_id,
                    pool_id=req.pool_id,
                    qualification_id=req.qualification_id,
                    started_at=datetime.now(UTC),
                )
                .on_conflict_do_nothing()
            )
        try:
            await self.eligibility.LockQualification(
                eligibility_pb2.LockQualificationRequest(
                    qualification_id=req.qualification_id,
                    order_id=req.order_id,
                    category=item.category,
                    consumer_id=req.consumer_id,
                    platform_id=req.platform_id,
                    actor=actor,
                )
            )
        except grpc.aio.AioRpcError as err:
            if err.code() in DEFINITIVE:
                # Eligibility refused: nothing was locked, nothing to undo.
                async with self.store.transaction() as tx:
                    await tx.conn.execute(
                        attempts_t.delete().where(attempts_t.c.order_id == req.order_id)
                    )
            # Otherwise (a deadline, a dropped connection) the lock may have committed: the
            # attempt stays, and a retry completes it or the sweeper refuses it.
            raise as_domain_error(err, "eligibility") from err
        expires = Timestamp()
        expires.FromDatetime(datetime.now(UTC) + self.timeout)
        reserved = ev.SubsidyReserved()
        reserved.CopyFrom(req)
        reserved.merchant_id = item.merchant_id
        reserved.category = item.category
        reserved.subsidy_fen = item.subsidy_fen
        reserved.serial = serial
        reserved.expires_at.CopyFrom(expires)
        ctx = Context(actor, correlation_id=req.order_id, policy_version=item.policy_version)
        stream = pool_stream(req.pool_id)
        try:
            async with self.store.transaction() as tx:
                version = await tx.lock_stream(stream)
                # Refusals of an order are written under this same lock: if one committed while
                # this attempt was locking (the sweeper, or a concurrent attempt of the order),
                # the order is refused for good, and this attempt's lock must be undone too.
                if not await self._was_refused(tx.conn, req.order_id):
                    pool = await load_pool(tx.conn, req.pool_id)
                    await self._commit(tx, stream, version, domain.reserve(pool, reserved), ctx)
                    await tx.conn.execute(
                        attempts_t.delete().where(attempts_t.c.order_id == req.order_id)
                    )
                    return await self._row(tx, req.order_id)
        except IntegrityError as exc:
            if SERIAL_CONSTRAINT in str(exc.orig):
                refusal = FailedPrecondition(
                    "SERIAL_ALREADY_SUBSIDISED",
                    "serial: this unit is already held or subsidised by another order",
                    field="serial",
                )
                await self._refused(req, refusal.reason, ctx)
                raise refusal from None
            # The same order id reserved concurrently (the reservations key refused the second
            # insert, and its whole transaction rolled back): answer with the first one.
            existing = await self.get_reservation(req.order_id)
            if existing is None:
                raise
            return self._same_order(existing, req)
        except DomainError as refusal:
            await self._refused(req, refusal.reason, ctx)
            raise
        # Refused while this attempt was locking: the order stays refused, and this attempt's
        # lock is undone by a refusal of its own.
        await self._refused(req, "ORDER_REFUSED", ctx)
        raise self._order_refused()

    @staticmethod
    async def _row(tx: Tx, order_id: str) -> dict[str, object]:
        row = (
            await tx.conn.execute(
                select(reservations_t).where(reservations_t.c.order_id == order_id)
            )
        ).one()
        return dict(row._mapping)

    @staticmethod
    def _same_order(existing: dict[str, object], req: ev.SubsidyReserved) -> dict[str, object]:
        same = (
            existing["sku"] == req.sku
            and existing["unit_price_fen"] == req.unit_price_fen
            and existing["qualification_id"] == req.qualification_id
            and existing["consumer_id"] == req.consumer_id
            and existing["pool_id"] == req.pool_id
        )
        if not same:
            raise AlreadyExists(
                "ORDER_ID_REUSED",
                "order_id: already reserved with a different item, price or qualification",
                field="order_id",
            )
        return existing

    @staticmethod
    async def _was_refused(conn: AsyncConnection, order_id: str) -> bool:
        found = await conn.scalar(
            select(streams_table.c.version).where(
                streams_table.c.stream_id == refusal_stream(order_id)
            )
        )
        return found is not None

    @staticmethod
    def _order_refused() -> FailedPrecondition:
        return FailedPrecondition(
            "ORDER_REFUSED",
            "order_id: this order was refused after its qualification was locked;"
            " a refused order stays refused: check out again with a new order id",
            field="order_id",
        )

    async def _refused(self, req: ev.SubsidyReserved, reason: str, ctx: Context) -> None:
        """Refuse the order for good after its qualification was locked: eligibility unlocks the
        qualification when the event reaches it. Written under the pool's stream lock, like
        every hold, so an order is either reserved or refused, never both."""
        event = ev.ReservationRefused(
            order_id=req.order_id,
            pool_id=req.pool_id,
            qualification_id=req.qualification_id,
            reason=reason,
        )
        async with self.store.transaction() as tx:
            await tx.lock_stream(pool_stream(req.pool_id))
            await tx.conn.execute(attempts_t.delete().where(attempts_t.c.order_id == req.order_id))
            held = await tx.conn.scalar(
                select(reservations_t.c.order_id).where(reservations_t.c.order_id == req.order_id)
            )
            if held is not None:
                return  # a concurrent attempt of the same order won: the lock is its lock
            stream = refusal_stream(req.order_id)
            version = await tx.lock_stream(stream)
            await tx.emit(SERVICE, stream, version, [event], ctx, apply_event)

    async def sweep_abandoned(self, older_than_s: float) -> int:
        """Refuse every order whose attempt outlived ``older_than_s`` without a hold (the ledger
        died between locking the qualification and the hold): its qualification is freed."""
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
        async with self.store.engine.connect() as conn:
            stale = (
                await conn.execute(
                    select(attempts_t).where(attempts_t.c.started_at < cutoff).limit(500)
                )
            ).all()
        ctx = Context(service_actor(SERVICE))
        for row in stale:
            req = ev.SubsidyReserved(
                order_id=row.order_id, pool_id=row.pool_id, qualification_id=row.qualification_id
            )
            await self._refused(req, "ABANDONED", Context(ctx.actor, correlation_id=row.order_id))
        return len(stale)

    async def _transition(
        self, order_id: str, actor: common_pb2.Actor, decide: object
    ) -> dict[str, object]:
        validate.identifier("order_id", order_id)
        existing = await self.get_reservation(order_id)
        if existing is None:
            raise NotFound(
                "UNKNOWN_ORDER", f"order_id: no reservation for {order_id!r}", field="order_id"
            )
        stream = pool_stream(str(existing["pool_id"]))
        async with self.store.transaction() as tx:
            version = await tx.lock_stream(stream)
            row = (
                await tx.conn.execute(
                    select(reservations_t).where(reservations_t.c.order_id == order_id)
                )
            ).first()
            assert row is not None
            res = domain.Reservation(
                order_id, row.pool_id, row.subsidy_fen, row.status, row.qualification_id
            )
            events = decide(res)  # type: ignore[operator]
            ctx = Context(actor, correlation_id=order_id, policy_version=row.policy_version)
            await self._commit(tx, stream, version, events, ctx)
            return await self._row(tx, order_id)

    async def capture(
        self, order_id: str, payment_ref: str, actor: common_pb2.Actor
    ) -> dict[str, object]:
        payment_ref = validate.text_field("payment_ref", payment_ref, max_len=128, required=False)
        return await self._transition(order_id, actor, lambda r: domain.capture(r, payment_ref))

    async def release(
        self, order_id: str, reason: str, actor: common_pb2.Actor
    ) -> dict[str, object]:
        validate.choice("reason", reason, ("CANCELLED", "REFUNDED"))
        return await self._transition(order_id, actor, lambda r: domain.release(r, reason))

    async def expire_due(self) -> int:
        """Release every pending reservation past its timeout; returns how many."""
        async with self.store.engine.connect() as conn:
            due = (
                (
                    await conn.execute(
                        select(reservations_t.c.order_id)
                        .where(reservations_t.c.status == domain.PENDING)
                        .where(reservations_t.c.expires_at < datetime.now(UTC))
                        .limit(500)
                    )
                )
                .scalars()
                .all()
            )
        actor = service_actor(SERVICE)
        for order_id in due:
            try:
                await self._transition(order_id, actor, lambda r: domain.release(r, "EXPIRED"))
            except FailedPrecondition:
                pass  # captured meanwhile: nothing to expire
        return len(due)

    async def expiry_loop(self, stop: asyncio.Event, every_s: float = 1.0) -> None:
        while not stop.is_set():
            try:
                await self.expire_due()
                await self.sweep_abandoned(self.abandon_after_s)
            except Exception:
                log.exception("expiry sweep failed", extra={"alert": "expiry"})
            try:
                await asyncio.wait_for(stop.wait(), every_s)
            except TimeoutError:
                pass


__all__ = ["Ledger", "budget_pools"]
