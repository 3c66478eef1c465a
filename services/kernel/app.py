"""The one way a service process starts, serves and stops.

``python -m services.<name>`` → :func:`main`: read settings (fail fast), configure logs and
traces, check that the database is at this release's schema revision (refuse to start
otherwise), connect Vault and NATS, start the outbox relay, the durable consumers and background
tasks, serve gRPC until SIGTERM/SIGINT, then drain gracefully.
``python -m services.<name> migrate`` upgrades the schema to head and exits (the Helm hook Job,
the local stack and the tests run it first; services/kernel/schema.py).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import uvloop
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from sqlalchemy import MetaData
from sqlalchemy.engine import make_url

from . import (
    bus,
    eventlog,
    faults,
    metrics,
    natsauth,
    outbox,
    ratelimit,
    rpc,
    schema,
    tls,
    topology,
    vault,
)
from . import health as health_watch
from . import workers as worker_processes
from .admission import AdmissionLimits
from .consumer import EventConsumer, keep_lag_metrics
from .eventstore import EventStore, make_engine
from .identity import service_caller
from .settings import Settings, SettingsError, environment_with
from .telemetry import configure_logging, configure_tracing

log = logging.getLogger(__name__)

T = TypeVar("T")


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop's event loop: the checkout's profile showed a tenth of every
    service's CPU in the stdlib loop itself (callback dispatch, selector, scheduling)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


# The cyclic collector's first threshold for a serving process (CPython's default is 700): a
# young collection once this many more container objects are alive than at the last one. The
# calls in flight hold thousands of objects across their awaits (a checkout's span, messages,
# rows, futures), so at 700 nearly every young collection found them alive and promoted them,
# and the older generations' collections, the full one included, followed from those
# promotions. In a 300-order checkout run the ledger's collector took 0.147 s of CPU, the
# full collections ~100 ms each, and after this (and the freeze below) 0.004 s
# (docs/perf/session23-ledger/README.md). Only garbage in reference cycles waits longer for
# its collection; reference counting still frees everything else at once.
GC_YOUNG_THRESHOLD = 20_000


def settle_heap() -> None:
    """Once a service is serving: collect what starting left behind, move every object that
    survives (modules, the schema, compiled statements, descriptors: about 150,000) out of
    the collector's sight for good (``gc.freeze``), so no later full collection walks them
    again, and raise the young threshold (GC_YOUNG_THRESHOLD)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


@dataclass
class Runtime:
    """What a running service has to work with; handed to the service's builder."""

    settings: Settings
    store: EventStore
    vault: vault.Vault
    nc: NatsClient
    js: JetStreamContext
    # This process's certificate: served to its callers, presented to the peers it calls.
    identity: tls.CertificateSource
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def channel(self, peer: str) -> tls.RenewingChannel:
        """A mutual-TLS channel to ``peer`` (one of the topology's peers of this service)."""
        return rpc.channel(
            self.settings.peers[peer],
            self.identity,
            deadline_s=self.settings.rpc_deadline_s,
            retry=rpc.IDEMPOTENT_INTERNAL_CALLS,
        )


@dataclass
class Wiring:
    """What a service contributes: servicers, consumers and background loops."""

    registrations: Sequence[rpc.Registration]
    service_names: Sequence[str]
    consumers: Sequence[EventConsumer] = ()
    background: Sequence[Callable[[asyncio.Event], Coroutine[Any, Any, None]]] = ()
    on_close: Sequence[Callable[[], Awaitable[None]]] = ()
    # Loops that must run in one process of the service at a time (sweepers, detection): with
    # several workers (SUBSIDY_WORKERS) only the leader runs them (services/kernel/workers.py).
    singular: Sequence[Callable[[asyncio.Event], Coroutine[Any, Any, None]]] = ()
    # Awaited before health turns SERVING: what the service needs before it can answer
    # (eligibility needs the policy that reaches it from catalog's events).
    ready: Callable[[], Awaitable[None]] | None = None


@dataclass(frozen=True)
class ServiceSpec:
    """A service: its name, its tables, and how to wire it; whom it calls is the topology's."""

    name: str
    metadata: MetaData
    build: Callable[[Runtime], Awaitable[Wiring]]

    @property
    def peers(self) -> tuple[str, ...]:
        """The peers it calls, as services/kernel/topology.py declares them (none for a
        service the topology does not know, such as a test's)."""
        return topology.peers(self.name) if self.name in topology.SERVICE_NAMES else ()

    @property
    def schema(self) -> schema.Schema | None:
        """Its schema revisions (``services.<name>.migrations``); None for a service that
        ships none (a test's, whose tables the test makes)."""
        return schema.Schema.of(self.name, self.metadata)


@dataclass
class Running:
    """A started service: its bound port and how to stop it (used by tests and main)."""

    port: int
    runtime: Runtime
    wiring: Wiring
    done: asyncio.Task[None]

    async def stop(self) -> None:
        self.runtime.stop.set()
        await self.done


def certificate_source(settings: Settings, v: vault.Vault) -> tls.CertificateSource:
    """The service's certificate: issued by Vault's PKI for its own SPIFFE id and renewed by
    the service itself, or kept in files by Vault Agent or cert-manager."""
    if settings.tls_source == "files":
        if settings.tls_dir is None:
            raise SettingsError(
                "missing required environment variable SUBSIDY_TLS_DIR"
                " (SUBSIDY_TLS_SOURCE is files)"
            )
        return tls.FileCertificates(settings.tls_dir)
    if settings.tls_source != "vault":
        raise SettingsError(
            f"SUBSIDY_TLS_SOURCE must be vault or files, got {settings.tls_source!r}"
        )
    names = [n.strip() for n in settings.tls_server_names.split(",") if n.strip()]
    me = service_caller(settings.service)
    return tls.VaultCertificates(
        lambda: v.issue_certificate(me, ttl=settings.cert_ttl, names=names)
    )


async def start(spec: ServiceSpec, settings: Settings) -> Running:
    """Start ``spec`` in this event loop; returns once it is serving."""
    rate_limits = ratelimit.RateLimits.from_settings(settings)  # malformed: stop before anything
    admission_limits = AdmissionLimits.from_settings(settings)
    store = EventStore(make_engine(settings.database_url))
    if spec.schema is not None:
        try:
            await schema.require_current(store.engine, spec.schema)
        except BaseException:
            await store.engine.dispose()
            raise
    v = vault.connect(
        settings.vault_addr,
        token=settings.vault_token,
        k8s_role=settings.vault_k8s_role,
        transit_mount=settings.vault_transit_mount,
    )
    identity = certificate_source(settings, v)
    nats_ca = (
        settings.nats_ca_file.read_bytes() if settings.nats_ca_file else identity.current().ca_pem
    )
    nats_credentials = await asyncio.to_thread(
        natsauth.service_credentials,
        spec.name,
        settings.nats_nkey_path,
        v.read_secret_sync,
        nats_ca,
    )
    nc, js = await bus.connect(settings.nats_url, spec.name, nats_credentials)
    await bus.ensure_streams(js, replicas=None)  # a check: replication is the operator's
    runtime = Runtime(settings, store, v, nc, js, identity)
    wiring = await spec.build(runtime)
    # Every service lists its own store to the auditor, who compares it with the audit log
    # (services/kernel/eventlog.py): added here so no service can leave it out.
    wiring = dataclasses.replace(
        wiring,
        registrations=[*wiring.registrations, eventlog.registration(spec.name, store)],
        service_names=[*wiring.service_names, eventlog.SERVICE_NAME],
    )
    if spec.name in topology.SERVICE_NAMES:
        # A consumer of events the topology does not declare (or a declared flow nobody
        # consumes) is a wiring mistake: refuse to start rather than drift from the chart.
        topology.check_consumers(spec.name, [s for c in wiring.consumers for s in c.subjects])
    relay = bus.OutboxRelay(store, js)
    # Health means every part the service needs answers and nothing essential has stopped
    # (services/kernel/health.py); calls, consumers and the relay that meet an outage say so.
    watch = health_watch.HealthWatch(
        {
            faults.DATABASE: health_watch.database_probe(store.engine),
            faults.NATS: health_watch.nats_probe(nc),
        },
        on_demand={faults.VAULT: health_watch.vault_probe(v)},
    )
    outage = watch.poke_for
    server, health = rpc.build_server(
        [*wiring.registrations, outbox.registration(store, spec.name, relay, wiring.consumers, js)],
        wiring.service_names,
        reflection_on=settings.grpc_reflection == "on",
        rate_limits=rate_limits,
        on_outage=outage,
        admission_limits=admission_limits,
        reuse_port=settings.workers > 1,  # the workers share the port
    )
    port = rpc.listen(server, settings.grpc_listen, identity)
    if port == 0:
        raise SettingsError(f"SUBSIDY_GRPC_LISTEN: cannot listen on {settings.grpc_listen}")
    await server.start()
    # The relay and the consumers must run as long as the service does: one that ends early
    # (a consumer that cannot subscribe, a bug) leaves events unpublished or unhandled while
    # the service still answers. It then reports NOT_SERVING, so Kubernetes restarts the pod.
    reports: set[asyncio.Task[None]] = set()

    def essential_ended(task: asyncio.Task[None]) -> None:
        if runtime.stop.is_set():
            return
        exc = None if task.cancelled() else task.exception()
        log.error(
            "%s ended while %s is running; reporting NOT_SERVING",
            task.get_name(),
            spec.name,
            exc_info=exc,
            extra={"alert": "task"},
        )
        report = asyncio.create_task(watch.hold(f"{task.get_name()} ended"))
        reports.add(report)
        report.add_done_callback(reports.discard)

    relay.on_outage = outage
    for consumer in wiring.consumers:
        consumer.on_outage = outage
    singular = [relay.run, *wiring.singular]
    leadership: worker_processes.Leadership | None = None
    if settings.workers > 1:
        # Every worker announces its commits, so they wake the relay in whichever one leads.
        relay.wake_across_processes()
        # One relay and one of each sweeper per service database, whichever worker leads;
        # it publishes what was committed while draining before it lets go.
        leadership = worker_processes.Leadership(
            store.engine, f"{spec.name}-singular", singular, on_step_down=relay.publish_pending
        )
        singular = [leadership.run]
    role = "relay" if leadership is None else "leadership"
    essential = [asyncio.create_task(singular[0](runtime.stop), name=f"{spec.name}-{role}")]
    essential += [
        asyncio.create_task(c.run(store, js, runtime.stop), name=f"{spec.name}-{c.name}")
        for c in wiring.consumers
    ]
    for task in essential:
        task.add_done_callback(essential_ended)

    async def relay_stuck(stuck: bool) -> None:
        # Stuck on an event the bus refuses: not serving until an operator skips it.
        await watch.hold("relay stuck", stuck)

    relay.on_stuck = relay_stuck
    background = [*wiring.background, *singular[1:]]
    tasks = [*essential, *(asyncio.create_task(b(runtime.stop)) for b in background)]
    tasks.append(
        asyncio.create_task(
            keep_lag_metrics(runtime.stop, relay, wiring.consumers, js), name="lag-metrics"
        )
    )
    tasks.append(asyncio.create_task(v.keep_token_fresh(runtime.stop), name="vault-token"))
    tasks.append(asyncio.create_task(identity.keep_fresh(runtime.stop), name="certificate"))
    if wiring.ready is not None:
        await wiring.ready()
    watch.bind(health, wiring.service_names)
    await watch.check()  # SERVING unless a part is down or a task ended meanwhile
    tasks.append(asyncio.create_task(watch.run(runtime.stop), name="health"))
    log.info("%s serving gRPC on port %d", spec.name, port)

    async def lifecycle() -> None:
        await runtime.stop.wait()
        log.info("%s stopping: draining calls", spec.name)
        await health.enter_graceful_shutdown()
        await server.stop(grace=5.0)
        # Every step runs even if an earlier one fails: a task that died must not keep the
        # final relay flush, the NATS drain or the pool's disposal from happening.
        for task in tasks:
            try:
                await asyncio.wait_for(task, timeout=5.0)
            except (TimeoutError, asyncio.CancelledError):
                pass
            except Exception:
                log.exception("%s had failed", task.get_name())
        for close in wiring.on_close:
            try:
                await close()
            except Exception:
                log.exception("%s: a close hook failed", spec.name)
        try:
            if leadership is None:  # (the leader of several workers did it before letting go)
                await relay.publish_pending()  # what was committed while draining
        except Exception:
            log.exception("%s: final relay flush failed; the next start publishes it", spec.name)
        try:
            await nc.drain()
        except Exception:
            log.exception("%s: NATS drain failed", spec.name)
        await store.engine.dispose()
        log.info("%s stopped", spec.name)

    return Running(port, runtime, wiring, asyncio.create_task(lifecycle()))


async def migrate_schema(spec: ServiceSpec, settings: Settings) -> list[str]:
    """Upgrade the service's database to head (services/kernel/schema.py); the revisions
    applied. As the migration role when SUBSIDY_MIGRATION_DATABASE_URL says which (it owns
    the tables and grants the service's own role, SUBSIDY_DATABASE_URL's, only what each table
    allows: the events table append-only); else as the service's own role (a dev setup)."""
    target = spec.schema
    if target is None:
        raise SettingsError(
            f"{spec.name} ships no schema revisions (services.{spec.name}.migrations)"
        )
    runtime_role: str | None = None
    url = settings.database_url
    if settings.migration_database_url is not None:
        runtime_role = make_url(settings.database_url).username
        if runtime_role is None:
            raise SettingsError("SUBSIDY_DATABASE_URL names no user to grant the schema to")
        url = settings.migration_database_url
    owner = make_engine(url, pool_size=1)
    try:
        return await schema.upgrade(owner, target, runtime_role=runtime_role)
    finally:
        await owner.dispose()


async def migrate_only(spec: ServiceSpec, settings: Settings) -> None:
    """``python -m services.<name> migrate`` (the chart's migration Job): migrate and exit."""
    await migrate_schema(spec, settings)


def main(spec: ServiceSpec, argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m services.<name> [serve|migrate]``."""
    parser = argparse.ArgumentParser(prog=f"python -m services.{spec.name}")
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "migrate"])
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # set by the supervisor
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(spec.name, peers=spec.peers)
    except SettingsError as exc:
        print(f"{spec.name}: {exc}", file=sys.stderr)
        return 2
    configure_logging(spec.name, settings.log_level, settings.log_file)
    if settings.workers < 1:
        print(f"{spec.name}: SUBSIDY_WORKERS must be at least 1", file=sys.stderr)
        return 2
    if args.command == "serve" and settings.workers > 1 and args.worker is None:
        with metrics.across_workers(settings.metrics_listen) as extra:  # their sum
            env = environment_with(extra)
            return worker_processes.supervise(spec.name, settings.workers, env=env)
    configure_tracing(
        spec.name,
        trace_file=settings.trace_file,
        service_name=settings.otel_service_name,
        traces_exporter=settings.otel_traces_exporter,
        traces_sampler=settings.otel_traces_sampler,
        traces_sampler_arg=settings.otel_traces_sampler_arg,
    )
    if settings.metrics_listen and args.worker is None:  # a worker's are its supervisor's
        metrics.serve(settings.metrics_listen)
    if args.command == "migrate":
        applied = asyncio.run(migrate_schema(spec, settings))
        log.info("%s schema at head (applied: %s)", spec.name, ", ".join(applied) or "none")
        return 0

    supervisor = os.getppid()

    async def serve() -> None:
        running = await start(spec, settings)
        settle_heap()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, running.runtime.stop.set)
        watching = None
        if args.worker is not None:  # one of several: it ends with its supervisor
            watch = worker_processes.orphan_watch(running.runtime.stop, supervisor)
            watching = asyncio.create_task(watch, name="supervisor")
        await running.done
        if watching is not None:
            await watching

    try:
        run_loop(serve())
    except schema.SchemaNotCurrent as exc:
        print(exc, file=sys.stderr)
        log.error("%s", exc)
        return 2
    return 0
