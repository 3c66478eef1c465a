"""Benchmark: the 10:00 claim rush. N consumers claim one category whose daily quota is Q.

The stack `make run` starts (each service its own process; real PostgreSQL, NATS and OpenBao;
mutual TLS everywhere), on free ports. The benchmark

1. publishes a policy version through the catalog's maker-checker (the demo operator drafts,
   the demo approver approves) that opens the claim window all day and sets the daily quota of
   the rush category to Q, and waits until eligibility has it and it is in force;
2. registers N made-up consumers (valid ID-number checksums, generated at run time, never
   printed) through ``RegisterConsumer`` over gRPC, many at once: the preparation, not timed as
   part of the rush, shown with a progress bar;
3. measures the same-run baseline: gRPC health checks against eligibility over the platform's
   own mutual-TLS channel, N of them at the same concurrency;
4. has all N claim the category (``ClaimQualification`` as the demo platform), C at a time;
5. checks that exactly ``min(N, Q)`` were issued and every other claim was refused with
   ``DAILY_QUOTA_EXHAUSTED``, that the database agrees (the qualifications of the day, the
   quota counter), and runs eligibility's own invariant check (``check_limits``) on its
   database. Any mismatch exits non-zero;
6. with ``--rates R1,R2,...``, after that closed-loop rush (the headline), offers each rate
   open loop: R claims a second for ``--rate-seconds`` S, each started at its intended time
   (i/R apart) as its own task whether or not earlier ones have answered, its latency counted
   from that intended time (a backlog in the client counts too: no coordinated omission). Each
   rate claims a category of its own (a copy of the rush category) with fresh consumers, and
   its quota is the same share of its claims as Q is of N, so every rate issues and refuses in
   the same proportion; it is checked as exactly as the rush (step 5).

The per-client rate limits (``SUBSIDY_RATE_CLAIMS``, ``SUBSIDY_RATE_REGISTRATION``, 200/s by
default) are raised for the run: a rush from one platform is exactly what they would throttle,
and the benchmark measures the claim path, not the limiter.

Prints and writes ``bench/results/claim_rush.json``. Usage:
python -m bench.claim_rush [--consumers N] [--quota Q] [--concurrency C]
[--rates R1,R2,... [--rate-seconds S]]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import func, select, text

from bench import consumers as seeding
from bench.common import timed, write_result
from services.eligibility.handlers import check_limits
from services.eligibility.projections import qualifications, quota_usage
from services.invariants import InvariantViolation
from services.kernel import rpc
from services.kernel.contract.policy import Policy, default_policy, policy_from_dict, policy_to_dict
from services.kernel.eventstore import make_engine
from services.kernel.identity import Role
from subsidy.v1 import audit_pb2, catalog_pb2, common_pb2, eligibility_pb2, identity_pb2
from subsidyctl import demo
from subsidyctl.cli.progress import PhaseProgress
from subsidyctl.localstack import REPO, SERVICES, LocalStack, Ports, free_base

CATEGORY = "phone"  # one item per person; the rush is for one category
QUOTA_REFUSED = "DAILY_QUOTA_EXHAUSTED"
# High enough never to refuse a call of the run: the limiter is not what is measured here.
RATES = {"SUBSIDY_RATE_CLAIMS": "1000000/second", "SUBSIDY_RATE_REGISTRATION": "1000000/second"}
# Issue 14's target for the open loop: 2,000 claims/s with a p99 of at most 50 ms on 2 cores.
P99_TARGET_MS = 50.0
# A claim started this much after its intended time: the client itself fell behind the rate.
LATE_START_S = 0.010


class RushFailed(Exception):
    """The run broke a rule it checks (the quota not exact, an unexpected refusal)."""


@dataclass
class Tally:
    """What the claims came back with."""

    issued: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    last_issued_at: float = 0.0

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1


@dataclass(frozen=True)
class OfferedRate:
    """One open-loop step: ``per_s`` claims a second for ``seconds``, on a category of its own
    whose daily quota is ``quota``."""

    per_s: int
    seconds: float
    quota: int

    @property
    def category(self) -> str:
        return f"{CATEGORY}_at_{self.per_s}"

    @property
    def claims(self) -> int:
        return max(1, round(self.per_s * self.seconds))

    @classmethod
    def sharing(cls, per_s: int, seconds: float, quota: int, consumers: int) -> OfferedRate:
        """The rate whose quota is the share ``quota / consumers`` of its claims (the rush's)."""
        claims = max(1, round(per_s * seconds))
        return cls(per_s, seconds, round(claims * min(1.0, quota / consumers)))


def rush_policy(quota: int, now: dt.datetime, offered: Sequence[OfferedRate] = ()) -> Policy:
    """The default policy under a new version: the claim window open all day and the rush
    category's daily quota ``quota``, and for each offered rate a copy of the rush category
    with that rate's code and quota; in force two seconds from ``now``."""
    doc = policy_to_dict(default_policy())
    doc["version"] = f"bench-rush-{now:%Y%m%d%H%M%S%f}"
    doc["effective_from"] = (now + dt.timedelta(seconds=2.5)).isoformat()
    doc["claim_window"] = {**doc["claim_window"], "opens": "00:00", "closes": "23:59"}
    for rule in doc["categories"]:
        if rule["code"] == CATEGORY:
            rule["daily_quota"] = quota
            doc["categories"] += [
                {
                    **rule,
                    "code": rate.category,
                    "name_en": f"{rule['name_en']} ({rate.per_s}/s)",
                    "daily_quota": rate.quota,
                }
                for rate in offered
            ]
            break
    return policy_from_dict(doc)


async def publish(client: demo.Client, stack: LocalStack, policy: Policy) -> None:
    """Draft (operator) and approve (approver) ``policy``, then wait until eligibility holds
    it (through catalog's PolicyPublished event) and it is in force."""
    document = json.dumps(policy_to_dict(policy), ensure_ascii=False, default=str)
    await client.catalog.DraftPolicy(
        catalog_pb2.DraftPolicyRequest(
            document=document,
            actor=client.identities.caller(Role.OPERATOR).actor(),
            reason="claim rush benchmark",
        )
    )
    await client.catalog.ApprovePolicy(
        catalog_pb2.ApprovePolicyRequest(
            version=policy.version,
            actor=client.identities.caller(Role.APPROVER).actor(),
            reason="claim rush benchmark",
        )
    )
    assert stack.pg is not None
    engine = make_engine(stack.pg.url("eligibility"), pool_size=1)
    try:
        deadline = time.monotonic() + 30
        async with engine.connect() as conn:
            while not await conn.scalar(
                text("SELECT count(*) FROM policies WHERE version = :v"), {"v": policy.version}
            ):
                if time.monotonic() > deadline:
                    raise RushFailed("eligibility never received the benchmark's policy")
                await conn.rollback()
                await asyncio.sleep(0.05)
    finally:
        await engine.dispose()
    wait = (policy.effective_from - dt.datetime.now(dt.UTC)).total_seconds()
    await asyncio.sleep(max(0.0, wait) + 0.2)


def people(count: int, rng: random.Random) -> list[demo.Person]:
    """``count`` made-up residents with distinct ID numbers (two alike would be one person,
    registered once, and claim twice)."""
    seen: set[str] = set()
    out: list[demo.Person] = []
    while len(out) < count:
        person = demo.generate_person(rng)
        if person.id_number not in seen:
            seen.add(person.id_number)
            out.append(person)
    return out


async def register_all(
    client: demo.Client, persons: list[demo.Person], concurrency: int
) -> tuple[list[str], float]:
    """Every person enrolled with the simulated authority and registered through
    RegisterConsumer (the full use case: three-factor check, Vault keys, the pipeline), many
    calls at once; returns the consumer ids and the wall time."""
    ids: list[str] = [""] * len(persons)
    done = 0
    with PhaseProgress(unit="consumers") as bar:
        bar.update("register", 0, len(persons))

        async def one(i: int) -> None:
            nonlocal done
            person = persons[i]
            await client.authority.Enroll(
                identity_pb2.EnrollRequest(
                    name=person.name, id_number=person.id_number, phone=person.phone
                )
            )
            consumer = await client.eligibility.RegisterConsumer(
                eligibility_pb2.RegisterConsumerRequest(
                    name=person.name,
                    id_number=person.id_number,
                    phone=person.phone,
                    platform_id=client.platform_id,
                )
            )
            if consumer.already_registered:
                raise RushFailed("a generated person was registered twice")
            ids[i] = consumer.consumer_id
            done += 1
            if done % 100 == 0 or done == len(persons):
                bar.update("register", done, len(persons))

        _, wall = await timed(len(persons), concurrency, one)
    return ids, wall


async def seed_all(
    stack: LocalStack, client: demo.Client, persons: list[demo.Person]
) -> tuple[list[str], float]:
    """bench.consumers.seed: the same events through the same pipeline, a batch at a time."""
    t0 = time.perf_counter()
    with PhaseProgress(unit="consumers") as bar:
        bar.update("seed", 0, len(persons))
        ids = await seeding.seed(
            stack, client, persons, lambda done: bar.update("seed", done, len(persons))
        )
    wall = time.perf_counter() - t0
    await seeding.check_sample(stack, client, persons, ids)
    return ids, wall


async def settle(stack: LocalStack, client: demo.Client, within_s: float) -> float:
    """Wait until the audit log holds every event of every store (the preparation's events
    are relayed and hashed asynchronously), so that the rush does not share the machine with
    that backlog; returns the seconds waited."""
    assert stack.pg is not None
    t0 = time.perf_counter()
    while True:
        stored = 0
        for service in SERVICES:
            with psycopg.connect(stack.pg.conninfo(service)) as db:
                row = db.execute("SELECT count(*) FROM events").fetchone()
                stored += int(row[0]) if row else 0
        logged = (await client.audit.GetLogInfo(audit_pb2.GetLogInfoRequest())).size
        if logged >= stored:
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > within_s:
            raise RushFailed(f"the audit log holds {logged} of {stored} events after {within_s} s")
        await asyncio.sleep(0.5)


async def claim(client: demo.Client, consumer_id: str, category: str) -> str | None:
    """One ``ClaimQualification`` as the demo platform; the refusal's reason, or None if
    issued."""
    try:
        await client.eligibility.ClaimQualification(
            eligibility_pb2.ClaimQualificationRequest(
                consumer_id=consumer_id,
                category=category,
                channel=client.platform_id,
                # Inside the campaign area, as a platform reports it (the region rule reads it).
                circumstances=common_pb2.Circumstances(region_code="440310"),
            )
        )
    except grpc.aio.AioRpcError as err:
        info = rpc.error_info(err)
        return info.reason if info is not None else err.code().name
    return None


async def claim_all(
    clients: list[demo.Client], consumer_ids: list[str], concurrency: int
) -> tuple[Tally, list[float], float]:
    """Every consumer claims the rush category once, ``concurrency`` at a time, the claims
    dealt round-robin to the eligibility processes (one client each)."""
    tally = Tally()
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        refused = await claim(clients[i % len(clients)], consumer_ids[i], CATEGORY)
        if refused is not None:
            tally.refuse(refused)
            return
        tally.issued += 1
        tally.last_issued_at = time.perf_counter() - t0

    latencies, wall = await timed(len(consumer_ids), concurrency, one)
    return tally, latencies, wall


@dataclass
class OpenLoopRun:
    """What one offered rate came back with: the outcomes, each claim's latency from its
    intended start, how many started late, and the wall from the first intended start to the
    last answer."""

    rate: OfferedRate
    tally: Tally
    latencies_s: list[float]
    late_starts: int
    wall_s: float

    def row(self) -> dict[str, Any]:
        ms = sorted(x * 1000 for x in self.latencies_s)
        return {
            "offered_per_s": self.rate.per_s,
            "seconds": self.rate.seconds,
            "claims": self.rate.claims,
            "category": self.rate.category,
            "quota": self.rate.quota,
            "achieved_per_s": round(len(ms) / self.wall_s, 1),
            "p50_ms": round(statistics.median(ms), 2),
            "p99_ms": percentile(ms, 0.99),
            "max_ms": round(ms[-1], 2),
            "issued": self.tally.issued,
            "refused_quota": self.tally.refused.get(QUOTA_REFUSED, 0),
            "late_starts": self.late_starts,
        }


async def offer(
    clients: list[demo.Client], consumer_ids: list[str], rate: OfferedRate
) -> OpenLoopRun:
    """Open loop: claim ``rate.category`` for each of ``consumer_ids`` (``rate.claims`` of
    them), the i-th started at ``i / rate.per_s`` seconds as its own task, never waiting for
    earlier claims to answer; the claims dealt round-robin to the eligibility processes."""
    tally = Tally()
    latencies: list[float] = []
    late = 0
    last_answer = 0.0

    async def one(i: int, intended: float) -> None:
        nonlocal late, last_answer
        if time.perf_counter() - intended > LATE_START_S:
            late += 1
        refused = await claim(clients[i % len(clients)], consumer_ids[i], rate.category)
        answered = time.perf_counter()
        # From the intended start: a claim the client started late waited for it as well.
        latencies.append(answered - intended)
        last_answer = max(last_answer, answered)
        if refused is None:
            tally.issued += 1
        else:
            tally.refuse(refused)

    tasks: list[asyncio.Task[None]] = []
    t0 = time.perf_counter() + 0.01
    for i in range(rate.claims):
        intended = t0 + i / rate.per_s
        delay = intended - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        # Behind schedule (the loop was busy): start it now without yielding, and it counts
        # as a late start.
        tasks.append(asyncio.create_task(one(i, intended)))
    await asyncio.gather(*tasks)
    return OpenLoopRun(rate, tally, latencies, late, last_answer - t0)


def open_loop_table(rows: Sequence[dict[str, Any]]) -> str:
    """The open-loop rows as a small text table."""
    head = (
        f"{'offered/s':>9} {'achieved/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"
        f" {'issued':>7} {'quota':>7} {'refused':>7} {'late':>6}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['offered_per_s']:9d} {r['achieved_per_s']:10.1f} {r['p50_ms']:8.2f}"
            f" {r['p99_ms']:8.2f} {r['max_ms']:8.2f} {r['issued']:7d} {r['quota']:7d}"
            f" {r['refused_quota']:7d} {r['late_starts']:6d}"
        )
    return "\n".join(lines)


async def baseline(client: demo.Client, endpoint: str, count: int, concurrency: int) -> Any:
    """Health checks against eligibility over the platform's own mutual-TLS channel."""
    async with rpc.channel(endpoint, client.identities.by_role[Role.PLATFORM]) as ch:
        health = health_pb2_grpc.HealthStub(ch)

        async def check(i: int) -> None:
            await health.Check(health_pb2.HealthCheckRequest())

        return await timed(count, concurrency, check)


async def verify(
    stack: LocalStack, policy: Policy, tally: Tally, expected: int, category: str = CATEGORY
) -> None:
    """The quota of ``category`` was exact: the callers' view, the database's and the
    invariant check agree."""
    problems = []
    if tally.issued != expected:
        problems.append(f"issued {tally.issued}, expected exactly {expected}")
    others = {r: n for r, n in tally.refused.items() if r != QUOTA_REFUSED}
    if others:
        problems.append(f"claims refused for other reasons: {others}")
    assert stack.pg is not None
    engine = make_engine(stack.pg.url("eligibility"), pool_size=1)
    try:
        async with engine.connect() as conn:
            stored = await conn.scalar(
                select(func.count())
                .select_from(qualifications)
                .where(qualifications.c.category == category)
            )
            counter = await conn.scalar(
                select(func.sum(quota_usage.c.issued)).where(quota_usage.c.category == category)
            )
        if stored != expected or counter != expected:
            problems.append(
                f"the database holds {stored} qualifications of {category}, counter {counter}"
            )
        try:
            await check_limits(engine, policy)  # the service's own invariant check
        except InvariantViolation as exc:
            problems.append(f"invariant: {exc}")
    finally:
        await engine.dispose()
    if problems:
        raise RushFailed(f"{category}: " + "; ".join(problems))


def _group(proc: psutil.Process) -> str:
    """Which part of the stack a process is (the python services by module, the rest by name)."""
    try:
        cmdline = proc.cmdline()
    except psutil.Error:
        return "gone"
    for arg in cmdline:
        if arg.startswith("services."):
            return arg.removeprefix("services.")
    name = Path(cmdline[0]).name if cmdline else str(proc.name())
    for known in ("postgres", "nats-server", "bao"):
        if known in name or known in " ".join(cmdline[:2]):
            return known
    return name


class CpuMeter:
    """CPU seconds (user + system) per part of the stack: this process (the client) and every
    process it started, directly or not, read before and after a phase."""

    def __init__(self) -> None:
        self._me = psutil.Process()
        self._procs: dict[int, psutil.Process] = {}

    def sample(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for _ in range(5):  # a process that ends while the tree is walked: walk it again
            try:
                children = self._me.children(recursive=True)
                break
            except psutil.Error:
                continue
        else:
            children = []
        for proc in [self._me, *children]:
            proc = self._procs.setdefault(proc.pid, proc)  # keep the object: cached cmdline
        for pid, proc in list(self._procs.items()):
            try:
                cpu = proc.cpu_times()
                if pid == self._me.pid:
                    group, used = "client (bench)", cpu.user + cpu.system
                else:
                    # With the children it has reaped: PostgreSQL's backends come and go (a
                    # pool's overflow connections close when returned) and their CPU is the
                    # postmaster's from then on.
                    group = _group(proc)
                    used = cpu.user + cpu.system + cpu.children_user + cpu.children_system
            except psutil.Error:  # ended since: its CPU is its parent's now
                continue
            totals[group] = totals.get(group, 0.0) + used
        return totals

    @staticmethod
    def per_op(before: dict[str, float], after: dict[str, float], ops: int) -> dict[str, float]:
        """Milliseconds of CPU per operation, per part, largest first, with the total."""
        rows = {k: (after.get(k, 0.0) - before.get(k, 0.0)) * 1000 / ops for k in after}
        ordered = dict(sorted(((k, round(v, 3)) for k, v in rows.items()), key=lambda kv: -kv[1]))
        ordered["total"] = round(sum(rows.values()), 3)
        return ordered


class Profiler:
    """py-spy sampling the eligibility server during one phase (``--profile DIR``): collapsed
    stacks in ``DIR/<phase>.txt``, for flame graphs or a grep. py-spy is pip-installable; it is
    not needed for a run without ``--profile``."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, phase: str) -> None:
        if self.directory is None:
            return
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        self.directory.mkdir(parents=True, exist_ok=True)
        pid = next(p.pid for p in psutil.Process().children() if _group(p) == "eligibility")
        out = self.directory / f"{phase}.txt"
        # --gil: only samples holding the GIL, i.e. the CPU the process itself spends.
        command = [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "200", "--gil"]
        self._proc = subprocess.Popen(
            [*command, "-o", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)  # attached before the phase starts

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            self._proc.wait(30)
            self._proc = None


class Replica:
    """One more eligibility process beside the stack's, as a second pod would run: the stack's
    settings for eligibility (same database, NATS, Vault; its own certificate from Vault) on
    ports of the stack's block that nothing else uses. Two processes claim one category at
    once: the quota must stay exact across them."""

    def __init__(self, stack: LocalStack, index: int) -> None:
        self.stack = stack
        self.port = stack.ports.base + 90 + 2 * index
        self.metrics_port = self.port + 1
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        stack = self.stack
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SUBSIDY_")},
            # The stack's own environment for its eligibility process (private: a replica is
            # the benchmark's business, not the local stack's).
            **stack._service_env("eligibility", stack.token_file),
            "SUBSIDY_GRPC_LISTEN": self.endpoint,
            "SUBSIDY_METRICS_LISTEN": f"127.0.0.1:{self.metrics_port}",
            "SUBSIDY_TRACE_FILE": str(stack.traces / f"eligibility-{self.port}.jsonl"),
            "PYTHONPATH": str(REPO),
        }
        log = (stack.logs / f"eligibility-{self.port}.log").open("ab")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "services.eligibility"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 60
        with grpc.secure_channel(self.endpoint, stack.probe_credentials()) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            while True:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RushFailed(f"eligibility replica on {self.endpoint} did not start")
                try:
                    serving = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    if serving == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)


def batch_sizes(metrics_ports: list[int], batch: str = "claims") -> dict[str, float]:
    """Eligibility's ``batch`` batches (claims, locks: its ``subsidy_batch_size`` histogram,
    from /metrics), over every eligibility process."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    found: dict[str, float] = {"count": 0.0, "sum": 0.0}
    for port in metrics_ports:
        with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            lines = response.read().decode().splitlines()
        for line in lines:
            for part in ("count", "sum"):
                if line.startswith(f'subsidy_batch_size_{part}{{batch="{batch}"}}'):
                    found[part] += float(line.rsplit(" ", 1)[1])
    count, total = found["count"], found["sum"]
    return {"batches": count, "mean_size": round(total / count, 1) if count else 0.0}


def percentile(sorted_ms: list[float], q: float) -> float:
    return round(sorted_ms[min(len(sorted_ms) - 1, int(len(sorted_ms) * q))], 2)


async def run(
    consumers: int,
    quota: int,
    concurrency: int,
    prepare_concurrency: int,
    root: Path,
    profile: Path | None = None,
    over_grpc: bool = False,
    processes: int = 1,
    rates: Sequence[int] = (),
    rate_seconds: float = 5.0,
) -> dict[str, Any]:
    """The whole run on a throwaway stack; the result row. With ``rates``, the open-loop steps
    after the rush: ``open_loop`` (a row per rate) and ``open_loop_max_rate_within_p99_target``
    in the result."""
    t_start = time.perf_counter()
    offered = [OfferedRate.sharing(r, rate_seconds, quota, consumers) for r in rates]
    seeded = consumers + sum(rate.claims for rate in offered)
    stack = LocalStack(
        root, Ports(free_base()), durable=False, log=io.StringIO(), settings_overrides=RATES
    )
    stack.start()
    replicas = [Replica(stack, i) for i in range(processes - 1)]
    try:
        client = demo.Client(stack.endpoints(), deadline_s=120)
        try:
            policy = rush_policy(quota, dt.datetime.now(dt.UTC), offered)
            await publish(client, stack, policy)
            # The rush's consumers first (the same people as without rates), then each rate's.
            persons = people(seeded, random.Random(10))
            meter = CpuMeter()
            cpu0 = meter.sample()
            profiler = Profiler(profile)
            profiler.start("register")
            try:
                if over_grpc:
                    ids, prep_wall = await register_all(client, persons, prepare_concurrency)
                else:
                    ids, prep_wall = await seed_all(stack, client, persons)
            finally:
                profiler.stop()
            del persons
            # Every part's CPU counts, including the relay and the audit log catching up.
            settled_s = await settle(stack, client, within_s=120 + seeded / 100)
            cpu1 = meter.sample()
            rush_ids, ids = ids[:consumers], ids[consumers:]
            base_lat, base_wall = await baseline(
                client, stack.endpoint("eligibility"), consumers, concurrency
            )
            cpu2 = meter.sample()
            for replica in replicas:
                replica.start()
            clients = [client] + [
                demo.Client({**stack.endpoints(), "eligibility": r.endpoint}, deadline_s=120)
                for r in replicas
            ]
            try:
                profiler.start("claims")
                try:
                    tally, lat, wall = await claim_all(clients, rush_ids, concurrency)
                finally:
                    profiler.stop()
                await settle(stack, client, within_s=120 + consumers / 100)
                cpu3 = meter.sample()
                batches = batch_sizes(
                    [stack.ports.metrics("eligibility"), *(r.metrics_port for r in replicas)]
                )
                await verify(stack, policy, tally, min(consumers, quota))
                open_loop: list[dict[str, Any]] = []
                for rate in offered:
                    # Each rate on a machine the previous one's relaying no longer loads.
                    await settle(stack, client, within_s=120 + rate.claims / 100)
                    fresh, ids = ids[: rate.claims], ids[rate.claims :]
                    step = await offer(clients, fresh, rate)
                    try:
                        await verify(
                            stack, policy, step.tally, min(rate.claims, rate.quota), rate.category
                        )
                    except RushFailed as exc:  # still show what the rates measured
                        measured = open_loop_table([*open_loop, step.row()])
                        raise RushFailed(
                            f"{exc}\nthe open loop (the last rate failed):\n{measured}"
                        ) from None
                    open_loop.append(step.row())
            finally:
                for extra in clients[1:]:
                    await extra.close()
        finally:
            await client.close()
    finally:
        for replica in replicas:
            replica.stop()
        stack.stop()
    ms = sorted(x * 1000 for x in lat)
    base_ms = sorted(x * 1000 for x in base_lat)
    claims_per_s = round(len(ms) / wall, 1)
    base_per_s = round(len(base_ms) / base_wall, 1)
    result: dict[str, Any] = {
        "benchmark": "claim_rush",
        "consumers": consumers,
        "quota": quota,
        "category": CATEGORY,
        "concurrency": concurrency,
        "eligibility_processes": processes,
        "issued": tally.issued,
        "refused_quota": tally.refused.get(QUOTA_REFUSED, 0),
        "refused_other": {r: n for r, n in tally.refused.items() if r != QUOTA_REFUSED},
        "claims_per_s": claims_per_s,
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": percentile(ms, 0.99),
        # While the quota lasted: the claims that write (the refusals after it are cheaper).
        "issued_per_s": round(tally.issued / tally.last_issued_at, 1) if tally.issued else 0.0,
        "rush_wall_s": round(wall, 2),
        "claim_batches": batches,
        "baseline": {
            "name": "gRPC health check (eligibility), same channel credentials and concurrency",
            "count": len(base_ms),
            "throughput_per_s": base_per_s,
            "p50_ms": round(statistics.median(base_ms), 2),
            "p99_ms": percentile(base_ms, 0.99),
        },
        "claims_vs_baseline": round(claims_per_s / base_per_s, 3),
        "prepare": {
            "what": (
                f"Enroll + RegisterConsumer over gRPC, {prepare_concurrency} at a time"
                if over_grpc
                else f"bench.consumers.seed: Pipeline.run_many, {seeding.BATCH} a batch"
            ),
            "consumers": seeded,
            "wall_s": round(prep_wall, 1),
            "per_s": round(seeded / prep_wall, 1),
            "audit_caught_up_after_s": round(settled_s, 1),
        },
        # CPU per claim summed over every process of the stack (until the audit log holds
        # every event the claims appended), per health check, and per registration.
        "cpu_ms_per_claim": CpuMeter.per_op(cpu2, cpu3, consumers),
        "cpu_ms_per_health_check": CpuMeter.per_op(cpu1, cpu2, consumers),
        "cpu_ms_per_registration": CpuMeter.per_op(cpu0, cpu1, seeded),
        "total_wall_s": round(time.perf_counter() - t_start, 1),
        "exact": True,
    }
    if offered:
        result["open_loop"] = open_loop
        within = [r["offered_per_s"] for r in open_loop if r["p99_ms"] <= P99_TARGET_MS]
        result["open_loop_p99_target_ms"] = P99_TARGET_MS
        result["open_loop_max_rate_within_p99_target"] = max(within, default=None)
    return result


def offered_rates(value: str) -> tuple[int, ...]:
    """``--rates``: distinct positive integers, comma-separated (each names its category)."""
    try:
        rates = tuple(int(part) for part in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {value!r}") from None
    if min(rates) < 1 or len(set(rates)) != len(rates):
        raise argparse.ArgumentTypeError("rates must be distinct and positive")
    return rates


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.claim_rush")
    parser.add_argument("--consumers", type=int, default=50_000, help="N consumers who claim")
    parser.add_argument("--quota", type=int, default=10_000, help="Q, the category's daily quota")
    parser.add_argument("--concurrency", type=int, default=128, help="claims in flight")
    parser.add_argument(
        "--eligibility-processes",
        type=int,
        default=1,
        help="eligibility processes taking the claims (more are started beside the stack's)",
    )
    parser.add_argument(
        "--register-over-grpc",
        action="store_true",
        help="prepare with RegisterConsumer calls (about 70/s) instead of bench.consumers.seed",
    )
    parser.add_argument(
        "--prepare-concurrency", type=int, default=64, help="RegisterConsumer calls in flight"
    )
    parser.add_argument(
        "--profile", type=Path, help="py-spy the eligibility server into DIR (collapsed stacks)"
    )
    parser.add_argument(
        "--rates",
        type=offered_rates,
        default=(),
        metavar="R1,R2,...",
        help="after the rush, offer each rate open loop (claims/s), fresh consumers each",
    )
    parser.add_argument(
        "--rate-seconds", type=float, default=5.0, help="seconds each open-loop rate runs"
    )
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results")
    args = parser.parse_args(argv)
    if min(args.consumers, args.concurrency, args.eligibility_processes) < 1 or args.quota < 0:
        parser.error("--consumers, --concurrency and --eligibility-processes must be positive")
    if args.rate_seconds <= 0:
        parser.error("--rate-seconds must be positive")
    with tempfile.TemporaryDirectory(prefix="bench-rush-") as tmp:
        try:
            result = asyncio.run(
                run(
                    args.consumers,
                    args.quota,
                    args.concurrency,
                    args.prepare_concurrency,
                    Path(tmp),
                    args.profile,
                    args.register_over_grpc,
                    args.eligibility_processes,
                    args.rates,
                    args.rate_seconds,
                )
            )
        except (RushFailed, seeding.SeedMismatch) as exc:
            print(f"claim rush FAILED: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
    if "open_loop" in result:
        print(open_loop_table(result["open_loop"]))
        best = result["open_loop_max_rate_within_p99_target"]
        print(f"highest offered rate with p99 <= {P99_TARGET_MS:g} ms: {best}")
    line = json.dumps(result, ensure_ascii=False)
    print(line)
    if not args.no_write:  # in the common shape, as `python -m bench` writes it
        write_result("claim_rush", result)
    return result


if __name__ == "__main__":
    main()
