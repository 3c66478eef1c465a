"""NATS authenticates every connection and authorises every subject, over TLS (the session's
real nats-server, configured by services/kernel/natsauth.py from the topology).

The review's forgery was an ``events.ledger.ReservationRefused`` published by someone who merely
reached NATS; here it is refused without credentials, without TLS, and with another service's.
"""

from __future__ import annotations

import ast
import asyncio
import json
import socket
import ssl
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from services.kernel import bus, natsauth, topology
from services.kernel.consumer import EventConsumer
from services.kernel.events import Context, new_envelope, service_actor
from subsidy.v1 import events_pb2 as ev
from tests.conftest import Infra

# A denied request is never answered; the server reports the violation at once, out of band,
# and the request times out after this (allowed requests get the usual 10 s).
DENIED_WAIT_S = 0.75
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Session:
    nc: NatsClient
    js: JetStreamContext
    denied: JetStreamContext  # for requests expected to be refused: a short timeout
    errors: list[Exception] = field(default_factory=list)

    def violations(self) -> list[str]:
        return [str(e) for e in self.errors if "permissions violation" in str(e).lower()]


async def connect_as(infra: Infra, user: str) -> Session:
    """Connect as ``user`` exactly as services.kernel.bus.connect does, and keep the errors the
    server reports out of band (a permissions violation is one)."""
    creds = infra.nats_credentials(user)
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    nc = await nats.connect(
        infra.nats.url,
        name=f"test-{user}",
        tls=creds.ssl_context(),
        nkeys_seed_str=creds.seed,
        inbox_prefix=creds.inbox_prefix,
        error_cb=on_error,
        allow_reconnect=False,
    )
    return Session(nc, nc.jetstream(timeout=10), nc.jetstream(timeout=DENIED_WAIT_S), errors)


@pytest.fixture
async def operator(infra: Infra) -> AsyncIterator[JetStreamContext]:
    nc, js = await bus.connect(infra.nats.url, "test-operator", infra.nats_credentials())
    yield js
    await nc.close()


def probe(service: str) -> bytes:
    env = new_envelope(
        service,
        f"probe/{uuid.uuid4()}",
        ev.BudgetFunded(pool_id="probe", amount_fen=1),
        Context(service_actor(service)),
    )
    return env.SerializeToString()


async def count(js: JetStreamContext, subject: str) -> int:
    info = await js.stream_info(bus.EVENTS_STREAM, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


async def refused_connect(infra: Infra, **options: object) -> str:
    with pytest.raises(Exception) as err:  # nats-py raises several kinds
        nc = await nats.connect(infra.nats.url, allow_reconnect=False, connect_timeout=5, **options)
        await nc.close()
    return f"{type(err.value).__name__}: {err.value}"


async def test_a_connection_without_credentials_is_refused(infra: Infra) -> None:
    ca = infra.nats_credentials().ssl_context()
    refused = await refused_connect(infra, tls=ca)
    assert "authorization violation" in refused.lower(), refused
    # A well-formed nkey the server does not know is refused alike.
    unknown = await refused_connect(infra, tls=ca, nkeys_seed_str=natsauth.new_seed())
    assert "authorization violation" in unknown.lower(), unknown


def test_a_plaintext_connection_is_refused(infra: Infra) -> None:
    port = int(infra.nats.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        info = raw.recv(4096)
        assert info.startswith(b"INFO ")
        assert json.loads(info[5:].decode())["tls_required"] is True
        raw.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
        answer = b""
        while chunk := raw.recv(4096):  # until the server hangs up
            answer += chunk
    # The server expected a TLS handshake, got plaintext and closed the connection: no PONG,
    # so nothing sent in the clear was ever taken as a command.
    assert b"PONG" not in answer and b"+OK" not in answer, answer


async def test_the_client_verifies_the_servers_certificate(infra: Infra) -> None:
    # The system trust store does not know the campaign CA: the handshake fails, no secret sent.
    creds = infra.nats_credentials()
    refused = await refused_connect(
        infra, tls=ssl.create_default_context(), nkeys_seed_str=creds.seed
    )
    assert "certificate verify failed" in refused.lower(), refused


async def test_a_service_cannot_publish_another_services_event(
    infra: Infra, operator: JetStreamContext
) -> None:
    """The review's forgery, with eligibility's own credential: refused, and nothing lands."""
    subject = "events.ledger.ReservationRefused"
    before = await count(operator, subject)
    eligibility = await connect_as(infra, topology.ELIGIBILITY)
    try:
        with pytest.raises(nats.errors.TimeoutError):
            await eligibility.denied.publish(subject, probe(topology.LEDGER))
        assert eligibility.violations(), eligibility.errors
        assert subject.lower() in eligibility.violations()[0].lower()
    finally:
        await eligibility.nc.close()
    assert await count(operator, subject) == before
    # The owner's credential publishes the same subject (the refusal is about who, not what).
    ledger = await connect_as(infra, topology.LEDGER)
    try:
        ack = await ledger.js.publish(subject, probe(topology.LEDGER))
        assert ack.stream == bus.EVENTS_STREAM
    finally:
        await ledger.nc.close()
    assert await count(operator, subject) == before + 1


@pytest.mark.parametrize("service", topology.SERVICE_NAMES)
async def test_no_service_may_delete_or_purge_a_stream(
    infra: Infra, operator: JetStreamContext, service: str
) -> None:
    await operator.publish(f"events.{service}.Probe", probe(service))
    before = (await operator.stream_info(bus.EVENTS_STREAM)).state.messages
    s = await connect_as(infra, service)
    try:
        for stream in (bus.EVENTS_STREAM, bus.DLQ_STREAM):
            with pytest.raises(nats.errors.TimeoutError):
                await s.denied.purge_stream(stream)
            with pytest.raises(nats.errors.TimeoutError):
                await s.denied.delete_stream(stream)
        denied = " ".join(s.violations()).lower()
        assert "$js.api.stream.purge.subsidy_events" in denied, s.errors
        assert "$js.api.stream.delete.subsidy_events" in denied, s.errors
        # Nor change it (a tiny max_msgs would purge it by another name).
        with pytest.raises(bus.StreamsNotReady):
            await bus.ensure_streams(s.denied, replicas=3)
        assert "$js.api.stream.update.subsidy_events" in " ".join(s.violations()).lower()
    finally:
        await s.nc.close()
    info = await operator.stream_info(bus.EVENTS_STREAM)
    assert info.config.num_replicas == 1
    assert info.state.messages >= before


@pytest.mark.parametrize(("producer", "consumer"), sorted(topology.event_flows()))
async def test_a_service_publishes_its_own_events_and_consumes_what_the_topology_says(
    infra: Infra, operator: JetStreamContext, producer: str, consumer: str
) -> None:
    durable = natsauth.DURABLES[consumer][0]
    subject = f"events.{producer}.Probe{uuid.uuid4().hex[:8]}"
    payload = probe(producer)
    pub = await connect_as(infra, producer)
    sub = await connect_as(infra, consumer)
    try:
        assert (await pub.js.publish(subject, payload)).stream == bus.EVENTS_STREAM
        # The consumer's own durable, created and bound with its own credential (the way
        # EventConsumer.subscribe does), filtered on exactly the probe.
        events = EventConsumer(f"{durable}", [subject], handler=_never)
        # A fresh durable of the consumer's name each run: the session's stream is shared.
        await _delete_consumer(operator, durable)
        pulled = await events.subscribe(sub.js)
        msgs = await pulled.fetch(1, timeout=10)
        assert [m.data for m in msgs] == [payload]
        await msgs[0].ack_sync()
        # Its dead letters go out under its own name too.
        ack = await sub.js.publish(f"dlq.{durable}", payload, headers={"Nats-Msg-Id": subject})
        assert ack.stream == bus.DLQ_STREAM
        assert not sub.violations() and not pub.violations(), (sub.errors, pub.errors)
    finally:
        await pub.nc.close()
        await sub.nc.close()
        await _delete_consumer(operator, durable)


async def test_consumers_may_not_reach_beyond_the_topology(
    infra: Infra, operator: JetStreamContext
) -> None:
    # Ledger consumes only eligibility's events: no subscription on anyone else's, and no
    # consumer of them (its durables each name their one subject, which binds them).
    ledger = await connect_as(infra, topology.LEDGER)
    # Catalog may not drain another service's durable (acking audit's messages would hide
    # them from the audit log).
    catalog = await connect_as(infra, topology.CATALOG)
    try:
        await ledger.nc.subscribe("events.catalog.>")
        await ledger.nc.flush()
        await asyncio.sleep(0.2)
        assert any("subscription" in v.lower() for v in ledger.violations()), ledger.errors
        with pytest.raises(nats.errors.TimeoutError):
            await EventConsumer("ledger-spy", ["events.catalog.>"], _never).subscribe(ledger.denied)
        with pytest.raises(nats.errors.TimeoutError):
            await EventConsumer("audit-log", ["events.>"], _never).subscribe(catalog.denied)
        assert catalog.violations(), catalog.errors
    finally:
        await ledger.nc.close()
        await catalog.nc.close()
    for name in ("ledger-spy", "audit-log"):
        with pytest.raises(nats.js.errors.NotFoundError):
            await operator.consumer_info(bus.EVENTS_STREAM, name)


def test_the_permissions_follow_the_topology() -> None:
    assert (natsauth.EVENTS_STREAM, natsauth.DLQ_STREAM) == (bus.EVENTS_STREAM, bus.DLQ_STREAM)
    for s in topology.SERVICES:
        perms = natsauth.permissions(s.name)
        events = [p for p in perms["publish"]["allow"] if p.startswith("events.")]
        assert events == [f"events.{s.name}.>"]
        assert sorted(perms["subscribe"]["allow"]) == sorted(
            [f"_INBOX_{s.name}.>", *(f"events.{p}.>" for p in s.consumes)]
        )
        assert set(natsauth.STREAM_ADMIN_DENIED) <= set(perms["publish"]["deny"])
        # Only a service that consumes has durables, and then one at least.
        assert bool(natsauth.DURABLES.get(s.name)) == bool(s.consumes)


def test_the_durables_are_the_services_own_consumers() -> None:
    """natsauth.DURABLES (what other services are denied) names exactly the EventConsumers
    each service's wiring declares (read from the source: building the wiring needs a runtime)."""
    found: dict[str, set[str]] = {}
    for s in topology.SERVICES:
        tree = ast.parse((REPO / "services" / s.name / "service.py").read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", getattr(node.func, "attr", "")) == "EventConsumer"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                found.setdefault(s.name, set()).add(str(node.args[0].value))
    assert found == {k: set(v) for k, v in natsauth.DURABLES.items()}


async def _never(tx: object, env: object) -> None:
    raise AssertionError("not run: the test fetches by hand")


async def _delete_consumer(js: JetStreamContext, name: str) -> None:
    try:
        await js.delete_consumer(bus.EVENTS_STREAM, name)
    except nats.js.errors.NotFoundError:
        pass
