"""The admission bound on a real mutual-TLS server and a real event store: a server at its
bound refuses the excess at once with OVERLOADED and a retry delay, serves the calls it
admitted, answers health and reads meanwhile, and a refused call changes nothing; a client
with the internal retry policy gets an idempotent call through once a slot frees."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf import empty_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import func, select

from services.kernel import admission, authz, errors, metrics, rpc
from services.kernel.events import Context, new_envelope
from services.kernel.eventstore import EventStore, events_table
from services.kernel.identity import Caller, Role
from services.kernel.settings import Settings, SettingsError
from subsidy.v1 import events_pb2 as ev
from tests.conftest import Infra
from tests.kernel.test_settings import BASE
from tests.support.callers import OPERATOR

SERVICE = "test.v1.Work"
WRITE = f"/{SERVICE}/Write"
READ = f"/{SERVICE}/GetThing"
DOWN = f"/{SERVICE}/Down"
RULES = {**authz.RULES, **{m: frozenset({authz.OPERATOR}) for m in (WRITE, READ, DOWN)}}


@dataclass
class Work:
    """The servicer: a write appends one event, then holds until released."""

    store: EventStore
    release: asyncio.Event = field(default_factory=asyncio.Event)
    entered: int = 0
    down_calls: int = 0

    async def write(self, request: empty_pb2.Empty, context: object) -> empty_pb2.Empty:
        stream = f"call/{uuid.uuid4()}"
        payload = ev.BudgetFunded(pool_id="p", amount_fen=1)
        await self.store.append(
            stream, 0, [new_envelope("test", stream, payload, Context(OPERATOR.actor()))]
        )
        self.entered += 1  # counted once its event is written
        await self.release.wait()
        return empty_pb2.Empty()

    async def read(self, request: empty_pb2.Empty, context: object) -> empty_pb2.Empty:
        return empty_pb2.Empty()

    async def down(self, request: empty_pb2.Empty, context: object) -> empty_pb2.Empty:
        """A peer this method needs does not answer (a domain UNAVAILABLE), every time."""
        self.down_calls += 1
        raise errors.Unavailable("CATALOG_UNAVAILABLE", "catalog did not answer in time")

    def register(self, servicer: object, server: grpc.aio.Server) -> None:
        def unary(fn: object) -> grpc.RpcMethodHandler[empty_pb2.Empty, empty_pb2.Empty]:
            return grpc.unary_unary_rpc_method_handler(
                fn,  # type: ignore[arg-type]
                request_deserializer=empty_pb2.Empty.FromString,
                response_serializer=empty_pb2.Empty.SerializeToString,
            )

        handlers = {
            "Write": unary(self.write),
            "GetThing": unary(self.read),
            "Down": unary(self.down),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    async def wait_entered(self, n: int) -> None:
        async with asyncio.timeout(10):
            while self.entered < n:  # noqa: ASYNC110 - a count, not one event
                await asyncio.sleep(0.005)


@dataclass
class Served:
    work: Work
    target: str
    infra: Infra

    def channel(self, retry: bool = False) -> grpc.aio.Channel:
        return rpc.channel(
            self.target,
            self.infra.identities(OPERATOR),
            retry=[(SERVICE, "Write"), (SERVICE, "Down")] if retry else (),
        )


async def serve(infra: Infra, store: EventStore, writes: int) -> tuple[grpc.aio.Server, Served]:
    work = Work(store)
    server, health = rpc.build_server(
        [(work.register, None)],
        [SERVICE],
        rules=RULES,
        admission_limits=admission.AdmissionLimits(writes=writes, reads=2),
    )
    port = rpc.listen(server, "127.0.0.1:0", infra.identities(Caller(Role.SERVICE, "test")))
    await server.start()
    await rpc.set_serving(health, [SERVICE])
    return server, Served(work, f"127.0.0.1:{port}", infra)


@pytest.fixture
async def three(infra: Infra, store: EventStore) -> AsyncIterator[Served]:
    """A server that works on at most 3 writes at once."""
    server, served = await serve(infra, store, writes=3)
    yield served
    served.work.release.set()
    await server.stop(grace=None)


@pytest.fixture
async def one(infra: Infra, store: EventStore) -> AsyncIterator[Served]:
    """A server that works on one write at a time."""
    server, served = await serve(infra, store, writes=1)
    yield served
    served.work.release.set()
    await server.stop(grace=None)


def unary(
    ch: grpc.aio.Channel, method: str
) -> grpc.aio.UnaryUnaryMultiCallable[empty_pb2.Empty, empty_pb2.Empty]:
    return ch.unary_unary(
        method,
        request_serializer=empty_pb2.Empty.SerializeToString,
        response_deserializer=empty_pb2.Empty.FromString,
    )


async def events(store: EventStore) -> int:
    async with store.engine.connect() as conn:
        return int(
            (await conn.execute(select(func.count()).select_from(events_table))).scalar_one()
        )


def overload_of(err: grpc.aio.AioRpcError) -> tuple[str, float, int]:
    """(ErrorInfo reason, RetryInfo delay in s, grpc-retry-pushback-ms) of a refusal."""
    reason, delay, pushback = "", -1.0, -1
    for key, value in err.trailing_metadata() or ():
        if key == rpc.STATUS_DETAILS_KEY and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    reason = info.reason
                elif detail.Unpack(retry):
                    delay = retry.retry_delay.ToTimedelta().total_seconds()
        elif key == admission.PUSHBACK_KEY:
            pushback = int(value)
    return reason, delay, pushback


def refused_count() -> float:
    value: float = metrics.ADMISSIONS.labels(WRITE, "refused")._value.get()
    return value


async def test_beyond_the_bound_calls_are_refused_at_once_and_the_admitted_are_served(
    three: Served, store: EventStore
) -> None:
    async with three.channel() as ch:
        write = unary(ch, WRITE)
        await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        admitted = [asyncio.ensure_future(write(empty_pb2.Empty())) for _ in range(3)]
        await three.work.wait_entered(3)
        refused_before = refused_count()

        async def excess() -> tuple[grpc.aio.AioRpcError, float]:
            started = time.perf_counter()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await write(empty_pb2.Empty())
            return caught.value, time.perf_counter() - started

        refusals = await asyncio.gather(*(excess() for _ in range(7)))
        for err, took_s in refusals:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            reason, delay, pushback = overload_of(err)
            assert reason == "OVERLOADED"
            assert 0 < delay <= admission.MAX_DELAY_S
            assert pushback == max(1, round(delay * 1000))
            # Refused at once, not queued behind the held calls (which never finish here).
            assert took_s < 1.0
        assert refused_count() - refused_before == 7
        # Health and reads are not starved by writes at their bound.
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        await unary(ch, READ)(empty_pb2.Empty())
        # The refused calls never reached the handler, so they wrote nothing.
        assert three.work.entered == 3
        assert await events(store) == 3
        three.work.release.set()
        await asyncio.gather(*admitted)  # every admitted call is answered OK
        # The slots are free again.
        await write(empty_pb2.Empty())
        assert await events(store) == 4


async def test_the_retry_policy_gets_an_idempotent_call_through_once_a_slot_frees(
    one: Served, store: EventStore
) -> None:
    async with one.channel() as plain, one.channel(retry=True) as retrying:
        # One call of about a second first: the retry delay follows the admitted calls'
        # latency, so the retries below wait about 0.1 s each, not 10 ms (a busy machine
        # could spend all four attempts before the slot frees).
        first = asyncio.ensure_future(unary(plain, WRITE)(empty_pb2.Empty()))
        await one.work.wait_entered(1)
        await asyncio.sleep(1.0)
        one.work.release.set()
        await first
        one.work.release = asyncio.Event()
        held = asyncio.ensure_future(unary(plain, WRITE)(empty_pb2.Empty()))
        await one.work.wait_entered(2)
        # Without the policy the call beyond the bound fails (so the test below can fail).
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unary(plain, WRITE)(empty_pb2.Empty())
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert overload_of(caught.value)[2] >= 50  # ms: the pushback follows the latency
        before = refused_count()
        retried = asyncio.ensure_future(unary(retrying, WRITE)(empty_pb2.Empty()))
        async with asyncio.timeout(5):
            # Until its first attempt was refused (a metric: nothing here can signal it).
            while refused_count() == before:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
        one.work.release.set()
        await held
        await retried  # a later attempt was admitted and answered OK
        assert refused_count() > before
        assert one.work.entered == 3
        assert await events(store) == 3


async def test_a_peer_unavailable_refusal_is_retried_by_the_policy_a_bounded_number_of_times(
    one: Served,
) -> None:
    async with one.channel() as plain, one.channel(retry=True) as retrying:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unary(plain, DOWN)(empty_pb2.Empty())
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert one.work.down_calls == 1
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unary(retrying, DOWN)(empty_pb2.Empty())
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        # Tried again (its answer has no headers, so the policy may), and not forever.
        assert one.work.down_calls == 1 + rpc.RETRY_POLICY["maxAttempts"]


def test_health_and_reflection_are_never_bounded_and_reads_have_their_own_bound() -> None:
    assert admission.method_class("/grpc.health.v1.Health/Check") is None
    assert admission.method_class("/grpc.reflection.v1alpha.ServerReflection/Info") is None
    assert admission.method_class("/subsidy.v1.CatalogService/VerifyItem") == admission.READS
    assert admission.method_class("/subsidy.v1.LedgerService/GetBudget") == admission.READS
    assert admission.method_class("/subsidy.v1.LedgerService/ReserveSubsidy") == admission.WRITES
    assert (
        admission.method_class("/subsidy.v1.EligibilityService/LockQualification")
        == admission.WRITES
    )


def test_the_bounds_come_from_the_settings_and_a_negative_one_is_refused() -> None:
    env = {**BASE, "SUBSIDY_MAX_CONCURRENT_WRITES": "5"}
    limits = admission.AdmissionLimits.from_settings(Settings.from_env("catalog", env=env))
    assert limits == admission.AdmissionLimits(writes=5, reads=0)  # reads: unbounded unless set
    env["SUBSIDY_MAX_CONCURRENT_READS"] = "-1"
    with pytest.raises(SettingsError, match="SUBSIDY_MAX_CONCURRENT_READS"):
        admission.AdmissionLimits.from_settings(Settings.from_env("catalog", env=env))


def test_the_internal_retry_policy_names_only_idempotent_calls_and_bounds_its_attempts() -> None:
    config = json.loads(rpc.service_config())
    (method_config,) = config["methodConfig"]
    names = {(n["service"], n["method"]) for n in method_config["name"]}
    assert names == set(rpc.IDEMPOTENT_INTERNAL_CALLS)
    # A checkout's own calls are never retried by the channel: ReserveSubsidy is the caller's.
    assert ("subsidy.v1.LedgerService", "ReserveSubsidy") not in names
    policy = method_config["retryPolicy"]
    assert policy["maxAttempts"] <= 5  # gRPC caps at 5 anyway
    assert set(policy["retryableStatusCodes"]) == {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}
