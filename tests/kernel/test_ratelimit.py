"""Rate limits per authenticated client, on a real mutual-TLS server and a real event store.

The server is the one every service builds (rpc.build_server, or app.start from settings); its
servicer answers the real limited method names and appends one event per call it handles to a
real PostgreSQL store, so "a refused call changes nothing" is counted in the store.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf import empty_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import MetaData

from services.kernel import app, authz, natsauth, rpc
from services.kernel.events import Context, new_envelope
from services.kernel.eventstore import EventStore
from services.kernel.identity import Caller, Role, caller
from services.kernel.ratelimit import BUCKETS, RateLimits, parse_rate
from services.kernel.settings import Settings, SettingsError
from subsidy.v1 import events_pb2 as ev
from tests.conftest import Infra

JD = Caller(Role.PLATFORM, "jd")
TAOBAO = Caller(Role.PLATFORM, "taobao")
REGISTER = "/subsidy.v1.EligibilityService/RegisterConsumer"
CLAIM = "/subsidy.v1.EligibilityService/ClaimQualification"
RESERVE = "/subsidy.v1.LedgerService/ReserveSubsidy"
CAPTURE = "/subsidy.v1.LedgerService/CaptureSubsidy"
RELEASE = "/subsidy.v1.LedgerService/ReleaseSubsidy"


def registrar(store: EventStore) -> rpc.Registration:
    """Handlers for every limited method: each handled call appends one event."""

    def handler(method: str) -> grpc.RpcMethodHandler[empty_pb2.Empty, empty_pb2.Empty]:
        async def handle(request: empty_pb2.Empty, context: rpc.ServicerContext) -> empty_pb2.Empty:
            who = caller()
            payload = ev.BudgetFunded(pool_id=method.rsplit("/", 1)[-1], amount_fen=1)
            stream = f"call/{uuid.uuid4()}"
            await store.append(
                stream, 0, [new_envelope("test", stream, payload, Context(who.actor()))]
            )
            return empty_pb2.Empty()

        return grpc.unary_unary_rpc_method_handler(
            handle,
            request_deserializer=empty_pb2.Empty.FromString,
            response_serializer=empty_pb2.Empty.SerializeToString,
        )

    def register(servicer: object, server: grpc.aio.Server) -> None:
        by_service: dict[str, dict[str, grpc.RpcMethodHandler[empty_pb2.Empty, empty_pb2.Empty]]]
        by_service = {}
        for method in BUCKETS:
            service, name = method.strip("/").split("/")
            by_service.setdefault(service, {})[name] = handler(method)
        server.add_generic_rpc_handlers(
            tuple(grpc.method_handlers_generic_handler(s, h) for s, h in by_service.items())
        )

    return (register, None)


@dataclass
class Clients:
    """One mutual-TLS channel per caller to the server under test."""

    target: str
    infra: Infra
    channels: dict[Caller, grpc.aio.Channel]

    async def call(self, who: Caller, method: str) -> grpc.aio.AioRpcError | None:
        """Call ``method`` as ``who``; the error it was refused with, or None."""
        if who not in self.channels:
            ch = rpc.channel(self.target, self.infra.identities(who))
            # The handshake first (a health check is never limited), so the limited calls
            # below run back to back.
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            self.channels[who] = ch
        call = self.channels[who].unary_unary(
            method,
            request_serializer=empty_pb2.Empty.SerializeToString,
            response_deserializer=empty_pb2.Empty.FromString,
        )
        try:
            await call(empty_pb2.Empty())
        except grpc.aio.AioRpcError as err:
            return err
        return None

    async def calls(self, who: Caller, methods: Sequence[str]) -> list[grpc.aio.AioRpcError | None]:
        return [await self.call(who, m) for m in methods]

    async def close(self) -> None:
        for ch in self.channels.values():
            await ch.close()


def limits(registration: str, claims: str, checkout: str) -> RateLimits:
    return RateLimits(
        registration=parse_rate("R", registration),
        claims=parse_rate("C", claims),
        checkout=parse_rate("K", checkout),
    )


async def serve(infra: Infra, store: EventStore, rates: RateLimits) -> tuple[grpc.aio.Server, int]:
    server, _ = rpc.build_server([registrar(store)], [], rate_limits=rates)
    port = rpc.listen(server, "127.0.0.1:0", infra.identities(Caller(Role.SERVICE, "test")))
    await server.start()
    return server, port


@pytest.fixture
async def per_minute(infra: Infra, store: EventStore) -> AsyncIterator[Clients]:
    """A server whose buckets hold 3 registrations, 2 claims and 3 checkout calls a minute:
    nothing in a test refills them."""
    server, port = await serve(infra, store, limits("3/minute", "2/minute", "3/minute"))
    clients = Clients(f"127.0.0.1:{port}", infra, {})
    yield clients
    await clients.close()
    await server.stop(grace=None)


def refusal(err: grpc.aio.AioRpcError | None) -> tuple[grpc.StatusCode, str, dict[str, str], float]:
    """(code, ErrorInfo reason, its metadata, RetryInfo delay in seconds) of a refused call."""
    assert err is not None, "the call passed"
    reason, metadata, delay = "", {}, -1.0
    for key, value in err.trailing_metadata() or ():
        if key == rpc.STATUS_DETAILS_KEY and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    reason, metadata = info.reason, dict(info.metadata)
                elif detail.Unpack(retry):
                    delay = retry.retry_delay.ToTimedelta().total_seconds()
    return err.code(), reason, metadata, delay


async def test_the_call_after_the_bucket_is_refused_with_a_retry_delay_and_changes_nothing(
    per_minute: Clients, store: EventStore
) -> None:
    assert await per_minute.calls(JD, [REGISTER] * 3) == [None] * 3
    before = await store.count()
    assert before == 3
    for _ in range(2):  # and again: a refused call does not use up a token either
        code, reason, metadata, delay = refusal(await per_minute.call(JD, REGISTER))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reason == "RATE_LIMITED"
        assert metadata["bucket"] == "registration"
        assert 0 < delay <= 60
    assert await store.count() == before  # the handler never ran


async def test_checkout_calls_share_one_bucket_and_each_class_has_its_own(
    per_minute: Clients, store: EventStore
) -> None:
    assert await per_minute.calls(JD, [RESERVE, CAPTURE, RELEASE]) == [None] * 3
    for method in (RESERVE, CAPTURE, RELEASE):
        code, reason, metadata, _ = refusal(await per_minute.call(JD, method))
        assert (code, reason, metadata["bucket"]) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RATE_LIMITED",
            "checkout",
        )
    # A spent checkout bucket leaves the client's claims and registrations alone.
    assert await per_minute.calls(JD, [CLAIM, CLAIM, REGISTER]) == [None] * 3
    assert refusal(await per_minute.call(JD, CLAIM))[1] == "RATE_LIMITED"
    assert await store.count() == 6


async def test_another_client_has_its_own_buckets(per_minute: Clients, store: EventStore) -> None:
    assert await per_minute.calls(JD, [RESERVE] * 3) == [None] * 3
    assert refusal(await per_minute.call(JD, RESERVE))[1] == "RATE_LIMITED"
    assert await per_minute.calls(TAOBAO, [RESERVE] * 3) == [None] * 3
    assert refusal(await per_minute.call(TAOBAO, RESERVE))[1] == "RATE_LIMITED"
    assert await store.count() == 6


async def test_after_the_retry_delay_calls_pass_again(infra: Infra, store: EventStore) -> None:
    server, port = await serve(infra, store, limits("2/second", "2/second", "2/second"))
    clients = Clients(f"127.0.0.1:{port}", infra, {})
    try:
        results = await clients.calls(JD, [RESERVE] * 3)
        # Back to back the third is refused (on a machine so slow that the first left the
        # one-second window already it would pass; the delay must then be waited for below).
        first_refused = next(i for i, r in enumerate(results) if r is not None)
        assert first_refused == 2, results
        code, reason, _, delay = refusal(results[2])
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
        assert 0 < delay <= 1
        await asyncio.sleep(delay)
        assert await clients.call(JD, RESERVE) is None
        assert await store.count() == 3
    finally:
        await clients.close()
        await server.stop(grace=None)


async def test_a_refused_caller_is_refused_for_its_role_before_any_bucket(
    per_minute: Clients, store: EventStore
) -> None:
    """The authorisation table runs first: an operator's checkout is not allowed at all, and
    does not use up anybody's bucket."""
    operator = Caller(Role.OPERATOR, "ops")
    for _ in range(5):
        err = await per_minute.call(operator, RESERVE)
        assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert refusal(err)[1] == "ROLE_NOT_ALLOWED"
    assert authz.allowed(RESERVE, JD)
    assert await per_minute.calls(JD, [RESERVE] * 3) == [None] * 3
    assert await store.count() == 3


def test_rates_are_read_from_the_environment_and_a_malformed_one_is_named() -> None:
    env = {
        "SUBSIDY_GRPC_LISTEN": "127.0.0.1:0",
        "SUBSIDY_DATABASE_URL": "postgresql+psycopg://svc@db:5432/ledger",
        "SUBSIDY_NATS_URL": "nats://nats:4222",
        "SUBSIDY_VAULT_ADDR": "http://vault:8200",
        "SUBSIDY_VAULT_K8S_ROLE": "subsidy-ledger",
        "SUBSIDY_TLS_SOURCE": "files",
    }
    defaults = RateLimits.from_settings(Settings.from_env("audit", peers=(), env=env))
    assert (defaults.registration.amount, defaults.registration.get_expiry()) == (200, 1)
    assert defaults.checkout == defaults.claims == defaults.registration
    custom = {**env, "SUBSIDY_RATE_CLAIMS": "30/minute", "SUBSIDY_RATE_CHECKOUT": "5/hour"}
    rates = RateLimits.from_settings(Settings.from_env("audit", peers=(), env=custom))
    assert (rates.claims.amount, rates.claims.get_expiry()) == (30, 60)
    assert (rates.checkout.amount, rates.checkout.get_expiry()) == (5, 3600)
    for bad in ("200", "0/second", "-1/second", "fast", "10/fortnight", "5 per 2 hours"):
        settings = Settings.from_env(
            "audit", peers=(), env={**env, "SUBSIDY_RATE_REGISTRATION": bad}
        )
        with pytest.raises(SettingsError, match="SUBSIDY_RATE_REGISTRATION"):
            RateLimits.from_settings(settings)


def spec_serving(store_of: dict[str, EventStore]) -> app.ServiceSpec:
    async def build(rt: app.Runtime) -> app.Wiring:
        store_of["store"] = rt.store
        return app.Wiring(registrations=[registrar(rt.store)], service_names=[])

    return app.ServiceSpec(name="limited", metadata=MetaData(), build=build)


def service_settings(infra: Infra, *, rate_checkout: str) -> Settings:
    return Settings(
        service="limited",
        grpc_listen="127.0.0.1:0",
        database_url=infra.create_kernel_database("limited"),
        nats_url=infra.nats.url,
        nats_nkey_path=natsauth.kv_path(natsauth.OPERATOR),  # not a platform service
        vault_addr=infra.bao.addr,
        vault_token=infra.bao.token,
        vault_k8s_role=None,
        tls_source="vault",
        rate_checkout=rate_checkout,
    )


async def test_a_service_started_from_settings_enforces_its_rates(infra: Infra) -> None:
    stores: dict[str, EventStore] = {}
    running = await app.start(
        spec_serving(stores), service_settings(infra, rate_checkout="2/minute")
    )
    clients = Clients(f"127.0.0.1:{running.port}", infra, {})
    try:
        assert await clients.calls(JD, [RESERVE, RELEASE]) == [None, None]
        code, reason, _, delay = refusal(await clients.call(JD, CAPTURE))
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
        assert 0 < delay <= 60
        assert await clients.call(JD, REGISTER) is None  # the default 200/second
        assert await stores["store"].count() == 3
    finally:
        await clients.close()
        await asyncio.wait_for(running.stop(), 30)


async def test_a_malformed_rate_stops_the_service_before_it_starts(infra: Infra) -> None:
    with pytest.raises(SettingsError, match="SUBSIDY_RATE_CHECKOUT"):
        await app.start(spec_serving({}), service_settings(infra, rate_checkout="lots"))
