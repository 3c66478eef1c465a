"""Chaos: random fault injections over every process of the stack while checkouts run.

The separate-process stack `make run` starts, with JetStream as a three-node cluster (streams at
replicas 3) and durable commits: the four services, the identity simulator, each NATS node,
PostgreSQL's postmaster and OpenBao. A seeded plan draws injections from:
- ``kill``: SIGKILL; a service or the simulator is started again by the engine (as a Deployment's
  controller would), an infrastructure part by the local stack's supervisor (stack/supervise.py);
- ``pause``: SIGSTOP, held a moment, then SIGCONT (a frozen VM, a long GC pause, a stalled disk);
  PostgreSQL's whole process group, so its backends freeze with the postmaster;
- ``outage``: PostgreSQL stopped on purpose for a few seconds and started again.
One injection at a time: after each the engine waits until every part is back (every service
SERVING, a restarted NATS node's replicas current) before the next.

Meanwhile a platform drives checkouts (register, claim, reserve, capture) and retries what the
integration guide says to retry (UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED, RESOURCE_EXHAUSTED
RATE_LIMITED / OVERLOADED) with the same request and order id, after the RetryInfo delay.

At the end, with the functions of services/invariants.py and `subsidyctl audit verify`: no dead
letter, every store's events in the audit log exactly once and in the events stream exactly once
(none published twice, none skipped), the budget balanced and spent exactly on the acknowledged
captures, every acknowledged capture captured and its qualification used, nothing left locked or
pending, per-person limits, daily quotas and one subsidy per serial.

`make chaos` runs the long version (``python -m tests.chaos``); tests/chaos/test_chaos_short.py
a short one in CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import nats.errors
import psycopg
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.eligibility.handlers import check_limits
from services.invariants import InvariantViolation, check_budget_balanced, check_serial_once
from services.kernel import bus, rpc
from services.kernel.contract.policy import default_policy
from services.kernel.eventstore import make_engine
from subsidy.v1 import eligibility_pb2, ledger_pb2
from subsidyctl import demo
from subsidyctl.cli.audit import verify
from subsidyctl.demo import IN_REGION
from subsidyctl.localstack import (
    SERVICES,
    SIMULATOR,
    LocalStack,
    Ports,
    free_base,
    store_event_ids,
    wait_until_audited,
)

T = TypeVar("T")

KILL, PAUSE, OUTAGE = "kill", "pause", "outage"
KINDS = (KILL, PAUSE, OUTAGE)
POSTGRES, OPENBAO = "PostgreSQL", "OpenBao"
POOL, SKU, PRICE_FEN, SUBSIDY_FEN = "pingshan-2025", "demo-phone", 300_000, 45_000
# What the integration guide says a platform retries (docs/platform-integration.md).
TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
}
RETRIED_EXHAUSTION = {"RATE_LIMITED", "OVERLOADED"}


def targets(nats_nodes: int) -> tuple[str, ...]:
    """Every process a plan may hit: the services, the simulator and the infrastructure (by
    the names the supervisor's log lines use)."""
    nodes = ["NATS"] if nats_nodes == 1 else [f"NATS node {i}" for i in range(1, nats_nodes + 1)]
    return (*SERVICES, SIMULATOR, *nodes, POSTGRES, OPENBAO)


def pairs(nats_nodes: int) -> list[tuple[str, str]]:
    """Every (kind, target) an injection can be: kill and pause of every process, an outage of
    PostgreSQL."""
    every = targets(nats_nodes)
    return [(KILL, t) for t in every] + [(PAUSE, t) for t in every] + [(OUTAGE, POSTGRES)]


def plan(seed: int, count: int, nats_nodes: int = 3) -> list[tuple[str, str]]:
    """``count`` injections drawn at random with ``seed``: every process is hit once first (in
    a random order, the kinds spread over them, the outage among them), the rest drawn from
    every (kind, target) alike. The same seed gives the same plan."""
    rng = random.Random(seed)
    every = list(targets(nats_nodes))
    rng.shuffle(every)
    kinds = [KILL, PAUSE]
    rng.shuffle(kinds)
    first = [(kinds[i % 2], t) for i, t in enumerate(every)]
    first.insert(rng.randrange(len(first) + 1), (OUTAGE, POSTGRES))
    chosen = first[:count]
    choices = pairs(nats_nodes)
    chosen += [rng.choice(choices) for _ in range(count - len(chosen))]
    return chosen


def short_plan(seed: int, nats_nodes: int = 3) -> list[tuple[str, str]]:
    """CI's plan: every process hit once and every kind used, cheaply. The infrastructure's
    supervisor restarts are what a kill tests, so PostgreSQL, OpenBao and one NATS node are
    killed; one of the service processes (the simulator among them) is killed and started
    again (tests/e2e/test_chaos.py kills the others), the rest are paused; and one outage."""
    rng = random.Random(seed)
    every = targets(nats_nodes)
    nodes = [t for t in every if t.startswith("NATS")]
    processes = [*SERVICES, SIMULATOR]
    killed = {rng.choice(processes), rng.choice(nodes), POSTGRES, OPENBAO}
    chosen = [(KILL if t in killed else PAUSE, t) for t in every] + [(OUTAGE, POSTGRES)]
    rng.shuffle(chosen)
    return chosen


@dataclass
class Timing:
    """How long faults last and how far apart they are (seconds, each drawn uniformly)."""

    pause_s: tuple[float, float] = (0.5, 3.0)
    outage_s: tuple[float, float] = (2.0, 6.0)
    gap_s: tuple[float, float] = (0.3, 2.0)
    recover_within_s: float = 120.0


@dataclass
class Injection:
    """One fault as it happened."""

    number: int
    kind: str
    target: str
    at_s: float  # since the chaos began
    held_s: float  # how long the process was down or paused (until its restart was started)
    recovered_s: float  # from the fault until every part was serving again
    orders_meanwhile: int  # checkouts acknowledged between this fault and the next


@dataclass
class ChaosReport:
    """What a run did and found; ``ok`` when every invariant held and nothing failed."""

    seed: int
    planned: int
    nats_nodes: int
    injections: list[Injection] = field(default_factory=list)
    orders_started: int = 0
    orders_completed: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # by reason: expected refusals
    retries: Counter[str] = field(default_factory=Counter)  # by code (and reason)
    failures: list[str] = field(default_factory=list)  # anything a platform could not absorb
    invariants: dict[str, str] = field(default_factory=dict)  # name → "ok" or what broke
    events: dict[str, int] = field(default_factory=dict)  # per service store
    audit_entries: int = 0
    dead_letters: int = -1
    supervisor_restarts: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0
    load_average: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def ok(self) -> bool:
        return (
            not self.failures
            and bool(self.invariants)
            and all(v == "ok" for v in self.invariants.values())
            and len(self.injections) == self.planned
        )

    def by_kind_and_target(self) -> dict[str, dict[str, int]]:
        """Injections counted per target and kind."""
        table: dict[str, dict[str, int]] = {}
        for i in self.injections:
            table.setdefault(i.target, dict.fromkeys(KINDS, 0))[i.kind] += 1
        return table

    def as_json(self) -> dict[str, Any]:
        """The report as JSON values (``asdict`` would rebuild each Counter from its items)."""
        out = asdict(self)
        out["refused"], out["retries"] = dict(self.refused), dict(self.retries)
        out["ok"] = self.ok
        out["by_target"] = self.by_kind_and_target()
        out["by_kind"] = dict(Counter(i.kind for i in self.injections))
        out["replay"] = f"make chaos SUBSIDY_CHAOS_SEED={self.seed}"
        return out

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_json(), indent=2, sort_keys=True) + "\n")

    def table(self) -> str:
        """The report as plain text: injections per target and kind, then the outcome."""
        lines = [f"chaos seed {self.seed}: {len(self.injections)} of {self.planned} injections"]
        lines.append(f"  {'target':<14}" + "".join(f"{k:>8}" for k in KINDS) + "  recovery s")
        for target, counts in sorted(self.by_kind_and_target().items()):
            times = [i.recovered_s for i in self.injections if i.target == target]
            lines.append(
                f"  {target:<14}"
                + "".join(f"{counts[k]:>8}" for k in KINDS)
                + f"  {sum(times) / len(times):5.1f} avg, {max(times):5.1f} max"
            )
        lines.append(
            f"orders: {self.orders_started} started, {self.orders_completed} captured, "
            f"refused {dict(self.refused) or 'none'}"
        )
        lines.append(f"retries: {sum(self.retries.values())} {dict(self.retries)}")
        lines.append(
            f"events: {self.events} in the stores, {self.audit_entries} audit entries, "
            f"{self.dead_letters} dead letters; supervisor restarts {self.supervisor_restarts}"
        )
        for name, verdict in self.invariants.items():
            lines.append(f"  {name:<40} {verdict}")
        lines += [f"FAILURE: {f}" for f in self.failures]
        lines.append(
            f"{'OK' if self.ok else 'BROKEN'} in {self.duration_s:.0f} s "
            f"(load average {', '.join(f'{x:.1f}' for x in self.load_average)})"
        )
        return "\n".join(lines)


def retry_delay(err: grpc.aio.AioRpcError) -> float | None:
    """The ``google.rpc.RetryInfo`` delay a refusal carries, in seconds."""
    for key, value in err.trailing_metadata() or ():
        if key == rpc.STATUS_DETAILS_KEY and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return None


class Platform:
    """What a platform does (docs/platform-integration.md): retry a transient failure of an
    idempotent call with the same request, after the RetryInfo delay, with jitter."""

    def __init__(self, rng: random.Random, retries: Counter[str]) -> None:
        self._rng = rng
        self.retries = retries

    async def call(self, call: Callable[[], Awaitable[T]], within: float = 300.0) -> T:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        backoff = 0.2
        while True:
            try:
                return await call()
            except grpc.aio.AioRpcError as err:
                info = rpc.error_info(err)
                reason = info.reason if info is not None else ""
                exhausted = (
                    err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    and reason in RETRIED_EXHAUSTION
                )
                if not (err.code() in TRANSIENT or exhausted) or loop.time() > deadline:
                    raise
                self.retries[f"{err.code().name} {reason}".strip()] += 1
                delay = retry_delay(err)
                wait = delay if delay is not None else backoff
                backoff = min(backoff * 2, 2.0)
                await asyncio.sleep(wait * self._rng.uniform(0.5, 1.5))


def _health(stack: LocalStack, service: str) -> int:
    with grpc.secure_channel(stack.endpoint(service), stack.probe_credentials()) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return -1
        return int(reply.status)


def all_serving(stack: LocalStack) -> bool:
    """Every service and the simulator answer health SERVING."""
    serving = health_pb2.HealthCheckResponse.SERVING
    return all(_health(stack, s) == serving for s in (*SERVICES, SIMULATOR))


class Chaos:
    """Runs a plan of injections against ``stack`` under a checkout load; :meth:`run` returns
    the report (the caller starts and stops the stack)."""

    def __init__(
        self,
        stack: LocalStack,
        seed: int,
        injections: int,
        *,
        timing: Timing | None = None,
        workers: int = 3,
        say: Callable[[str], None] = print,
        chosen: list[tuple[str, str]] | None = None,
    ) -> None:
        self.stack = stack
        self.seed = seed
        self.timing = timing or Timing()
        self.workers = workers
        self.say = say
        self.plan = chosen if chosen is not None else plan(seed, injections, stack.nats_nodes)
        self.rng = random.Random(seed ^ 0x5EED)  # fault timings; the plan has its own
        self.report = ChaosReport(seed=seed, planned=len(self.plan), nats_nodes=stack.nats_nodes)
        self.completed: list[tuple[str, str]] = []  # (order id, qualification id)
        self._t0 = 0.0

    # -- the fault side ----------------------------------------------------------------------
    def _infra(self) -> dict[str, Any]:
        return self.stack.infrastructure()

    def _pid(self, target: str) -> int:
        if target in (*SERVICES, SIMULATOR):
            return self.stack.pid(target)
        pid = self._infra()[target].pid
        assert pid is not None, f"{target} has no process"
        return int(pid)

    async def _until(self, check: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.timing.recover_within_s
        while not await asyncio.to_thread(check):
            if time.monotonic() > deadline:
                raise AssertionError(f"not {what} within {self.timing.recover_within_s:.0f} s")
            await asyncio.sleep(0.2)

    async def inject(self, kind: str, target: str) -> float:
        """One fault, and the wait until it has healed; returns how long the process was held."""
        supervisor = self.stack.supervisor
        assert supervisor is not None
        started = time.monotonic()
        if kind == KILL and target in (*SERVICES, SIMULATOR):
            await asyncio.to_thread(self.stack.kill, target)
            held = time.monotonic() - started
            await asyncio.to_thread(self.stack.respawn, target)
        elif kind == KILL:
            before = supervisor.restarts[target]
            os.kill(self._pid(target), signal.SIGKILL)
            await self._until(lambda: supervisor.restarts[target] > before, f"{target} restarted")
            held = time.monotonic() - started
        elif kind == PAUSE:
            pid = self._pid(target)
            hold = self.rng.uniform(*self.timing.pause_s)
            # PostgreSQL's backends are the postmaster's children in its process group.
            send = os.killpg if target == POSTGRES else os.kill
            send(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(hold)
            finally:
                send(pid, signal.SIGCONT)
            held = hold
        else:
            assert (kind, target) == (OUTAGE, POSTGRES), (kind, target)
            pg = self.stack.pg
            assert pg is not None
            hold = self.rng.uniform(*self.timing.outage_s)
            await asyncio.to_thread(pg.stop)  # on purpose: the supervisor leaves it stopped
            await asyncio.sleep(hold)
            await asyncio.to_thread(pg.start)
            held = time.monotonic() - started
        await self._until(lambda: all_serving(self.stack), "serving again")
        if target.startswith("NATS node"):
            await self._replicas_current()
        return held

    async def _replicas_current(self) -> None:
        """A NATS node back: wait until every stream's replicas are current again, so the next
        fault never meets a cluster still catching up (one node lost at a time is the promise)."""
        server = self.stack.nats
        assert server is not None
        deadline = time.monotonic() + self.timing.recover_within_s
        while True:
            with contextlib.suppress(Exception):
                nc, js = await bus.connect(server.url, "chaos", server.operator)
                try:
                    infos = [await js.stream_info(s) for s in (bus.EVENTS_STREAM, bus.DLQ_STREAM)]
                finally:
                    await nc.close()
                want = self.stack.nats_nodes - 1
                if all(
                    i.cluster is not None
                    and len(i.cluster.replicas or []) == want
                    and all(r.current for r in i.cluster.replicas or [])
                    for i in infos
                ):
                    return
            if time.monotonic() > deadline:
                raise AssertionError("the NATS cluster's replicas did not catch up")
            await asyncio.sleep(0.5)

    async def faults(self, traffic_alive: Callable[[], bool]) -> None:
        await asyncio.sleep(self.rng.uniform(*self.timing.gap_s) + 1.0)  # traffic first
        for number, (kind, target) in enumerate(self.plan, 1):
            if not traffic_alive():
                self.report.failures.append(f"traffic stopped before injection {number}")
                return
            at = time.monotonic()
            done_before = len(self.completed)
            held = await self.inject(kind, target)
            recovered = time.monotonic() - at
            self.say(
                f"chaos {number}/{len(self.plan)}: {kind} {target}: held {held:.1f} s, "
                f"serving after {recovered:.1f} s ({len(self.completed)} captured)"
            )
            await asyncio.sleep(self.rng.uniform(*self.timing.gap_s))
            self.report.injections.append(
                Injection(
                    number=number,
                    kind=kind,
                    target=target,
                    at_s=round(at - self._t0, 2),
                    held_s=round(held, 2),
                    recovered_s=round(recovered, 2),
                    orders_meanwhile=len(self.completed) - done_before,
                )
            )

    # -- the platform side -------------------------------------------------------------------
    async def checkout(self, client: demo.Client, platform: Platform, i: int) -> None:
        """One checkout as a platform drives it; an expected refusal is counted, anything
        else a platform could not absorb is a failure."""
        report = self.report
        person = demo.generate_person(self.rng)
        for attempt in range(3):
            try:
                # The simulator keeps its enrolments in memory: a kill forgets them, so the
                # platform's stand-in enrols again (a real authority forgets nobody).
                consumer = await platform.call(lambda: demo.register(client, person))
                break
            except grpc.aio.AioRpcError as err:
                info = rpc.error_info(err)
                if info is None or info.reason != "IDENTITY_MISMATCH" or attempt == 2:
                    raise
                report.refused["IDENTITY_MISMATCH (enrolled again)"] += 1
        try:
            qual = await platform.call(
                lambda: client.eligibility.ClaimQualification(
                    eligibility_pb2.ClaimQualificationRequest(
                        circumstances=IN_REGION,
                        consumer_id=consumer.consumer_id,
                        category="phone",
                        channel=client.platform_id,
                    )
                )
            )
        except grpc.aio.AioRpcError as err:
            info = rpc.error_info(err)
            if info is None or info.reason != "PERSON_LIMIT_REACHED":
                raise
            report.refused["claim: PERSON_LIMIT_REACHED (a retry whose first try landed)"] += 1
            return
        order = f"chaos-{self.seed}-{i}"
        request = ledger_pb2.ReserveSubsidyRequest(
            order_id=order,
            platform_id=client.platform_id,
            pool_id=POOL,
            consumer_id=consumer.consumer_id,
            qualification_id=qual.qualification_id,
            sku=SKU,
            unit_price_fen=PRICE_FEN,
        )
        try:
            await platform.call(lambda: client.ledger.ReserveSubsidy(request))
        except grpc.aio.AioRpcError as err:
            info = rpc.error_info(err)
            if err.code() != grpc.StatusCode.FAILED_PRECONDITION or info is None:
                raise
            report.refused[f"reserve: {info.reason}"] += 1  # e.g. its attempt was swept
            return
        await platform.call(
            lambda: client.ledger.CaptureSubsidy(
                ledger_pb2.CaptureSubsidyRequest(order_id=order, payment_ref=f"pay-{order}")
            )
        )
        self.completed.append((order, qual.qualification_id))

    async def traffic(self, client: demo.Client, chaos_over: Callable[[], bool]) -> None:
        platform = Platform(random.Random(self.seed + 1), self.report.retries)

        async def worker() -> None:
            while not chaos_over():
                self.report.orders_started += 1
                i = self.report.orders_started
                try:
                    await self.checkout(client, platform, i)
                except grpc.aio.AioRpcError as err:
                    info = rpc.error_info(err)
                    self.report.failures.append(
                        f"checkout {i}: {err.code().name} {info.reason if info else ''} "
                        f"{err.details()}"
                    )

        await asyncio.gather(*(worker() for _ in range(self.workers)))

    # -- the run -----------------------------------------------------------------------------
    async def run(self) -> ChaosReport:
        """Seed the demo campaign, run traffic and the plan together, then check everything."""
        self._t0 = time.monotonic()
        client = demo.Client(self.stack.endpoints())
        try:
            await demo.seed(client, random.Random(self.seed), {**demo.load_demo(), "consumers": 0})
            over = False
            traffic = asyncio.create_task(self.traffic(client, lambda: over))
            try:
                await self.faults(lambda: not traffic.done())
            finally:
                over = True
                await traffic
            self.report.orders_completed = len(self.completed)
            await self.check(client)
        finally:
            await client.close()
            self.report.duration_s = round(time.monotonic() - self._t0, 1)
            self.report.load_average = os.getloadavg()
        return self.report

    async def check(self, client: demo.Client) -> None:
        """Every invariant, recorded by name in the report (a broken one does not hide the
        others)."""
        stack, report = self.stack, self.report
        assert stack.pg is not None and stack.nats is not None and stack.supervisor is not None
        report.supervisor_restarts = dict(stack.supervisor.restarts)

        async def holds(name: str, check: Callable[[], Awaitable[None]]) -> None:
            try:
                await check()
            except (AssertionError, InvariantViolation, grpc.aio.AioRpcError) as exc:
                report.invariants[name] = f"BROKEN: {str(exc).splitlines()[0][:300]}"
            else:
                report.invariants[name] = "ok"

        async def processes() -> None:
            dead = stack.dead()
            assert dead == [], f"processes exited: {dead}"

        async def no_dead_letters() -> None:
            server = stack.nats
            assert server is not None
            nc, js = await bus.connect(server.url, "chaos", server.operator)
            try:
                report.dead_letters = (await js.stream_info(bus.DLQ_STREAM)).state.messages
            finally:
                await nc.close()
            assert report.dead_letters == 0, f"{report.dead_letters} events dead-lettered"

        async def audited_once() -> None:
            report.audit_entries = await wait_until_audited(stack, client, within=180)

        async def published_once() -> None:
            stores = await asyncio.to_thread(store_event_ids, stack)
            report.events = {s: len(ids) for s, ids in stores.items()}
            check_published_once(stores, await stream_event_ids(stack))

        async def audit_verify() -> None:
            found = await verify(client.audit, client.ledger, client.event_logs)
            assert found["ok"], found
            spent = found["pools"][POOL]["spent_fen"]
            assert spent == SUBSIDY_FEN * len(self.completed), (
                f"spent {spent} fen, {len(self.completed)} acknowledged captures"
            )

        async def budget_balanced() -> None:
            pool = await client.ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=POOL))
            check_budget_balanced(
                POOL,
                funded=pool.funded_fen,
                available=pool.available_fen,
                reserved=pool.reserved_fen,
                spent=pool.spent_fen,
            )
            assert pool.reserved_fen == 0, f"{pool.reserved_fen} fen still reserved"

        async def captures_kept() -> None:
            await _eventually(lambda: asyncio.to_thread(self._settled), within=90)

        async def limits_and_quotas() -> None:
            assert stack.pg is not None
            engine = make_engine(stack.pg.url("eligibility"), pool_size=1)
            try:
                await check_limits(engine, default_policy())
            finally:
                await engine.dispose()

        async def serials_once() -> None:
            assert stack.pg is not None
            with psycopg.connect(stack.pg.conninfo("catalog")) as db:
                rows = db.execute(
                    "SELECT serial, order_id FROM sales_orders"
                    " WHERE serial <> '' AND status = 'CAPTURED'"
                ).fetchall()
            check_serial_once([(r[0], r[1]) for r in rows])

        await holds("no process died (all restarts done)", processes)
        await holds("every acknowledged capture captured", captures_kept)
        await holds("every event in the audit log once", audited_once)
        await holds("every event published once, none skipped", published_once)
        await holds("subsidyctl audit verify", audit_verify)
        await holds("no dead letter", no_dead_letters)
        await holds("budget balanced, nothing reserved", budget_balanced)
        await holds("per-person limits and daily quotas", limits_and_quotas)
        await holds("one subsidy per serial", serials_once)
        if not report.retries:
            report.failures.append("no call ever met a fault: the chaos did not hit the traffic")

    def _settled(self) -> None:
        """Every acknowledged capture captured and its qualification used; no hold pending and
        no qualification locked without one (swept attempts settle within seconds)."""
        pg = self.stack.pg
        assert pg is not None
        with (
            psycopg.connect(pg.conninfo("eligibility")) as e_db,
            psycopg.connect(pg.conninfo("ledger")) as l_db,
        ):
            pending = l_db.execute(
                "SELECT order_id FROM reservations WHERE status = 'PENDING'"
            ).fetchall()
            assert pending == [], f"holds still pending: {pending[:5]}"
            captured = {
                r[0]
                for r in l_db.execute("SELECT order_id FROM reservations WHERE status = 'CAPTURED'")
            }
            lost = {o for o, _ in self.completed} - captured
            assert not lost, f"acknowledged captures not captured: {sorted(lost)[:5]}"
            locked = e_db.execute(
                "SELECT order_id FROM qualifications WHERE status = 'LOCKED'"
            ).fetchall()
            assert locked == [], f"locked without a hold: {locked[:5]}"
            used: dict[str, str] = dict(
                e_db.execute(
                    "SELECT order_id, qualification_id FROM qualifications WHERE status = 'USED'"
                ).fetchall()
            )
            assert used == dict(self.completed), "used qualifications differ from the captures"


def check_published_once(stores: dict[str, list[str]], published: Iterable[str]) -> None:
    """Every event of every store is in the events stream exactly once, and the stream holds
    nothing else: none published twice (past JetStream's duplicate window), none skipped."""
    counts = Counter(published)
    twice = [e for e, n in counts.items() if n > 1]
    if twice:
        raise InvariantViolation(f"{len(twice)} events published more than once, e.g. {twice[0]}")
    for service, ids in stores.items():
        skipped = set(ids) - counts.keys()
        if skipped:
            raise InvariantViolation(f"{len(skipped)} events of {service} never published")
    stored = {e for ids in stores.values() for e in ids}
    unknown = counts.keys() - stored
    if unknown:
        raise InvariantViolation(f"{len(unknown)} published events are in no store")


async def stream_event_ids(stack: LocalStack) -> list[str]:
    """The ``Nats-Msg-Id`` (the event id) of every message in the events stream, read by an
    ephemeral consumer from the first message."""
    server = stack.nats
    assert server is not None
    nc, js = await bus.connect(server.url, "chaos", server.operator)
    ids: list[str] = []
    try:
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=60.0
        )
        sub = await js.pull_subscribe("", stream=bus.EVENTS_STREAM, config=config)
        try:
            while True:
                try:
                    msgs = await sub.fetch(batch=500, timeout=1.0)
                except (TimeoutError, nats.errors.TimeoutError):
                    msgs = []
                ids += [(m.headers or {}).get("Nats-Msg-Id", "") for m in msgs]
                if not msgs and (await sub.consumer_info()).num_pending == 0:
                    return ids
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
    finally:
        await nc.close()


async def _eventually(check: Callable[[], Awaitable[None]], within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            await check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


def chaos_stack(run_dir: Path, *, nats_nodes: int = 3, log: Any = None) -> LocalStack:
    """The stack a chaos run hits: `make run`'s (durable commits: an acknowledged commit must
    survive a kill -9 of the postmaster), JetStream as a cluster, a short abandon timeout so
    swept attempts settle within the run."""
    return LocalStack(
        run_dir,
        Ports(free_base()),
        durable=True,
        nats_nodes=nats_nodes,
        settings_overrides={"SUBSIDY_ABANDON_AFTER_S": "3"},
        **({"log": log} if log is not None else {}),
    )


def run(
    run_dir: Path,
    seed: int,
    injections: int,
    *,
    timing: Timing | None = None,
    nats_nodes: int = 3,
    log: Any = None,
    say: Callable[[str], None] = print,
    chosen: list[tuple[str, str]] | None = None,
) -> ChaosReport:
    """Start a chaos stack in ``run_dir``, run ``injections`` faults under load (the seed's
    :func:`plan`, or ``chosen``), stop it."""
    stack = chaos_stack(run_dir, nats_nodes=nats_nodes, log=log)
    stack.start()
    try:
        chaos = Chaos(stack, seed, injections, timing=timing, say=say, chosen=chosen)
        return asyncio.run(chaos.run())
    finally:
        stack.stop()
