"""Benchmark: the checkout's hot path (ReserveSubsidy, then CaptureSubsidy) over gRPC.

Real PostgreSQL, NATS and OpenBao, and each service in its own process as in production (the
stack `make run` starts, on free ports); the client runs in this process. Every order of one
run draws on ONE budget pool: the worst case, since reservations on a pool serialise on its
stream lock.

Reports throughput and p50/p99 latency, and the same-run baseline (a gRPC health check against the
ledger at the same concurrency) as a ratio, so a slower or busier machine shows as a baseline
change, not as a regression. Also the CPU each part of the stack spends per checkout (psutil,
user + system, read before and after each phase; PostgreSQL's backends included) and, with
``--profile DIR``, py-spy flame graphs (``DIR/<process>.svg``) and collapsed stacks
(``DIR/<process>.txt``) of every service and of the client during reserve + capture.
``--count-statements`` has PostgreSQL log every statement (which costs CPU: its figures are not
comparable) and reports SQL statements per RPC per database; ``--trace-ratio R`` runs the
services with ``OTEL_TRACES_SAMPLER=parentbased_traceidratio`` at ratio R, as production would.
``--shards K`` (K > 1): the same run also reserves as many orders again on one pool split
into K shards (PoolSharded) and reports its throughput and CPU per reservation per process
against the one-shard pool's.
The peak resident memory of every service process under the load is reported too, and
``--workers N`` runs N worker processes per service on each port (SUBSIDY_WORKERS;
services/kernel/workers.py); its result is checkout-<N>workers.json. ``--pools N`` spreads the
orders over N pools (order i on pool i mod N: a campaign of many districts or categories, each
its own pool) and ``--pool-shards K`` splits each pool into K shards (the hot pool, scaled past
one lock); their results are checkout-<N>pools.json, checkout-<K>shards.json.
Usage: python -m bench.checkout [--orders N] [--concurrency C] [--workers N] [--profile DIR]
[--shards K]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.claim_rush import CpuMeter, batch_sizes
from bench.common import RssMeter, against_baseline, report, summarise, timed
from services.kernel import rpc
from services.kernel.identity import Role
from subsidy.v1 import catalog_pb2, eligibility_pb2, ledger_pb2
from subsidyctl import demo
from subsidyctl.demo import IN_REGION
from subsidyctl.localstack import LocalStack, Ports, free_base


class Profiler:
    """py-spy on every service and on this process (the platform client) during reserve +
    capture: a flame graph (``<who>.svg``) and collapsed stacks (``<who>.txt``, for a grep or
    a diff) per process. Two samplers a process, since py-spy writes one format a run; they
    run beside the stack, never inside it (``--nonblocking``: the sampled process is never
    paused). py-spy is pip-installable; a run without ``--profile`` does not need it."""

    def __init__(self, directory: Path | None, pids: dict[str, int], suffix: str = "") -> None:
        self.directory = directory
        self.pids = pids
        self.suffix = suffix
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        for who, pid in self.pids.items():
            for fmt, ext in (("flamegraph", "svg"), ("raw", "txt")):
                out = self.directory / f"{who}{self.suffix}.{ext}"
                # --gil: only samples holding the GIL, i.e. the CPU the process itself spends
                command = [spy, "record", "--pid", str(pid), "--rate", "100", "--gil"]
                self._procs.append(
                    subprocess.Popen(
                        [*command, "--nonblocking", "--format", fmt, "-o", str(out)],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
        time.sleep(1.0)  # attached before the phase starts

    def stop(self) -> None:
        for proc in self._procs:
            proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for proc in self._procs:
            proc.wait(60)
        self._procs = []


class StatementLog:
    """SQL statements per database, from PostgreSQL's own log (``log_statement = all``, set
    for the measured phases only): what each RPC costs the database in round trips."""

    def __init__(self, stack: LocalStack) -> None:
        assert stack.pg is not None
        self.pg = stack.pg
        self.offset = 0

    def _set(self, on: bool) -> None:
        import psycopg

        with psycopg.connect(self.pg.conninfo("postgres"), autocommit=True) as db:
            if on:
                db.execute("ALTER SYSTEM SET log_statement = 'all'")
                db.execute("ALTER SYSTEM SET log_line_prefix = '@%d@ '")
            else:
                db.execute("ALTER SYSTEM RESET log_statement")
                db.execute("ALTER SYSTEM RESET log_line_prefix")
            db.execute("SELECT pg_reload_conf()")
        time.sleep(0.5)  # every backend has read the new setting

    def start(self) -> None:
        self._set(True)
        self.offset = self.pg.log_path.stat().st_size

    def count(self) -> dict[str, int]:
        """Statements logged per database since :meth:`start` or the last count."""
        with self.pg.log_path.open("rb") as fh:
            fh.seek(self.offset)
            text = fh.read().decode(errors="replace")
            self.offset = fh.tell()
        counts: dict[str, int] = {}
        for line in text.splitlines():
            if line.startswith("@") and ("statement: " in line or "execute " in line):
                db = line[1:].split("@", 1)[0]
                counts[db] = counts.get(db, 0) + 1
        return counts

    def stop(self) -> None:
        self._set(False)


async def run(
    orders: int,
    concurrency: int,
    root: Path,
    profile: Path | None = None,
    suffix: str = "",
    deadline_s: float = 10,
    count_statements: bool = False,
    trace_ratio: float | None = None,
    shards: int = 1,
    workers: int = 1,
    pools: int = 1,
    pool_shards: int = 1,
) -> dict[str, Any]:
    """The services as separate processes (as in production), on free ports; ``workers``
    processes per service, each port shared by them."""
    stack = LocalStack(root, Ports(free_base()), durable=False, log=io.StringIO(), workers=workers)
    # The benchmark's one client stands for every platform at once: the per-client rate limits
    # (a platform's share, 200 checkout calls a second by default) would measure the limit.
    stack.settings_overrides = {
        "SUBSIDY_RATE_CHECKOUT": "1000000/second",
        "SUBSIDY_RATE_CLAIMS": "1000000/second",
        "SUBSIDY_RATE_REGISTRATION": "1000000/second",
    }
    if trace_ratio is not None:
        stack.settings_overrides |= {
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": str(trace_ratio),
        }
    stack.start()
    try:
        client = demo.Client(stack.endpoints(), deadline_s=deadline_s)
        try:
            pids = {s: stack.pid(s) for s in ("ledger", "eligibility", "catalog", "audit")}
            profiler = Profiler(profile, {**pids, "client": os.getpid()}, suffix)
            statements = StatementLog(stack) if count_statements else None
            async with RssMeter() as rss:
                result = await measure(
                    client,
                    stack.endpoints(),
                    orders,
                    concurrency,
                    profiler,
                    statements,
                    pools,
                    pool_shards,
                )
            result["workers_per_service"] = workers
            # How LockQualification calls were batched (services/kernel/command_batch.py).
            result["lock_batches"] = batch_sizes([stack.ports.metrics("eligibility")], "locks")
            # Peak resident memory of each service process (MB) over the whole run.
            result["rss_mb"] = dict(sorted(rss.peak_mb.items()))
            result["trace_ratio"] = trace_ratio
            result["load_average"] = [round(x, 2) for x in os.getloadavg()]
            if shards > 1:
                result["shards"] = await shard_comparison(client, orders, concurrency, shards)
            return result
        finally:
            await client.close()
    finally:
        stack.stop()


async def shard_comparison(
    client: demo.Client, orders: int, concurrency: int, shards: int
) -> dict[str, Any]:
    """ReserveSubsidy on ONE pool, first of 1 shard then of ``shards``, same orders and
    concurrency in the same run: throughput, p50/p99, and CPU ms per reservation per process
    (the machine is shared: the ratios are the figure to read, with the load average)."""
    rng = random.Random(11)
    meter = CpuMeter()
    for pool_id, k in (("bench-one-shard", 1), ("bench-sharded", shards)):
        proposal = await client.ledger.ProposeFunding(
            ledger_pb2.ProposeFundingRequest(
                pool_id=pool_id,
                amount_fen=10**12,
                source="district",
                reason="bench",
                platform_ids=[client.platform_id],
                shards=k,
            )
        )
        await client.ledger.ApproveFunding(
            ledger_pb2.ApproveFundingRequest(proposal_id=proposal.proposal_id, reason="bench")
        )
    people: list[tuple[str, str]] = []

    async def prepare(i: int) -> None:
        people.append(await person(client, rng))

    await timed(2 * orders, concurrency, prepare)
    out: dict[str, Any] = {"shards": shards, "load_average_before": os.getloadavg()}
    rows = []
    for label, pool_id, offset in (
        ("1 shard", "bench-one-shard", 0),
        (f"{shards} shards", "bench-sharded", orders),
    ):

        async def reserve(i: int, pool_id: str = pool_id, offset: int = offset) -> None:
            request = reserve_request(client, f"{pool_id}-{i}", people[offset + i])
            request.pool_id = pool_id
            await client.ledger.ReserveSubsidy(request)

        before = meter.sample()
        lat, wall = await timed(orders, concurrency, reserve)
        row = summarise(f"ReserveSubsidy, one pool of {label}", lat, wall)
        row["cpu_ms_per_reserve"] = CpuMeter.per_op(before, meter.sample(), orders)
        row["cpu_ms_per_reserve_total"] = row["cpu_ms_per_reserve"]["total"]
        rows.append(row)
        figures = await client.ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=pool_id))
        assert figures.reserved_fen == orders * 45_000, "every order must have been held"
        assert figures.shards == (shards if offset else 1)
    out["rows"] = rows
    out["throughput_ratio"] = round(rows[1]["throughput_per_s"] / rows[0]["throughput_per_s"], 3)
    out["load_average_after"] = os.getloadavg()
    return out


def pool_of(order: int, pools: int) -> str:
    """The pool order ``order`` draws on: ``bench-pool`` alone, or one of ``pools``."""
    return "bench-pool" if pools == 1 else f"bench-pool-{order % pools}"


async def campaign(client: demo.Client, pools: int = 1, pool_shards: int = 1) -> None:
    """The merchant, its phone (subsidy 45,000 fen) and the funded pools the orders draw on
    (``pools`` of them, each of ``pool_shards`` shards)."""
    await client.catalog.ApplyMerchant(
        catalog_pb2.ApplyMerchantRequest(
            merchant_id="bench-m",
            name="bench",
            licence_number="91440300MA5DC6QX4Y",
            contact_phone="13800000000",
        )
    )
    await client.catalog.ReviewMerchant(
        catalog_pb2.ReviewMerchantRequest(merchant_id="bench-m", approve=True)
    )
    await client.catalog.RegisterProduct(
        catalog_pb2.RegisterProductRequest(
            sku="bench-phone",
            merchant_id="bench-m",
            category="phone",
            brand="b",
            model="m",
            list_price_fen=300_000,
        )
    )
    for pool_id in sorted({pool_of(i, pools) for i in range(pools)}):
        proposal = await client.ledger.ProposeFunding(
            ledger_pb2.ProposeFundingRequest(
                pool_id=pool_id,
                amount_fen=10**12,
                source="district",
                reason="bench",
                platform_ids=[client.platform_id],
                shards=pool_shards,
            )
        )
        await client.ledger.ApproveFunding(
            ledger_pb2.ApproveFundingRequest(proposal_id=proposal.proposal_id, reason="bench")
        )


async def person(client: demo.Client, rng: random.Random) -> tuple[str, str]:
    """A registered consumer and the phone qualification they claimed: (consumer, qualification)."""
    consumer = await demo.register(client, demo.generate_person(rng))
    q = await client.eligibility.ClaimQualification(
        eligibility_pb2.ClaimQualificationRequest(
            circumstances=IN_REGION,
            consumer_id=consumer.consumer_id,
            category="phone",
            channel=client.platform_id,
        )
    )
    return consumer.consumer_id, q.qualification_id


def reserve_request(
    client: demo.Client, order_id: str, who: tuple[str, str], pool_id: str = "bench-pool"
) -> ledger_pb2.ReserveSubsidyRequest:
    """The checkout's reservation of the bench phone for ``who`` (consumer, qualification)."""
    return ledger_pb2.ReserveSubsidyRequest(
        order_id=order_id,
        platform_id=client.platform_id,
        pool_id=pool_id,
        consumer_id=who[0],
        qualification_id=who[1],
        sku="bench-phone",
        unit_price_fen=300_000,
    )


async def measure(
    client: demo.Client,
    endpoints: dict[str, str],
    orders: int,
    concurrency: int,
    profiler: Profiler | None = None,
    statements: StatementLog | None = None,
    pools: int = 1,
    pool_shards: int = 1,
) -> dict[str, Any]:
    """Prepare the people, then the baseline, reservations and captures, each timed, with the
    CPU every part of the stack spends in each phase (ms per operation)."""
    rng = random.Random(7)
    await campaign(client, pools, pool_shards)
    # Preparation (not the hot path): register consumers and claim their qualifications.
    people: list[tuple[str, str]] = []

    async def prepare(i: int) -> None:
        people.append(await person(client, rng))

    prep_lat, prep_wall = await timed(orders, concurrency, prepare)

    # The baseline pays the same mutual TLS as the checkout: the platform's own channel.
    async with rpc.channel(endpoints["ledger"], client.identities.by_role[Role.PLATFORM]) as ch:
        health = health_pb2_grpc.HealthStub(ch)

        async def check(i: int) -> None:
            await health.Check(health_pb2.HealthCheckRequest())

        meter = CpuMeter()
        base_cpu0 = meter.sample()
        base_lat, base_wall = await timed(orders, concurrency, check)
        base_cpu1 = meter.sample()

    async def reserve(i: int) -> None:
        request = reserve_request(client, f"bench-{i}", people[i], pool_of(i, pools))
        await client.ledger.ReserveSubsidy(request)

    async def capture(i: int) -> None:
        await client.ledger.CaptureSubsidy(ledger_pb2.CaptureSubsidyRequest(order_id=f"bench-{i}"))

    if profiler is not None:
        profiler.start()
    if statements is not None:
        statements.start()
    cpu0 = meter.sample()
    res_lat, res_wall = await timed(orders, concurrency, reserve)
    cpu1 = meter.sample()
    reserve_sql = statements.count() if statements is not None else {}
    cap_lat, cap_wall = await timed(orders, concurrency, capture)
    cpu2 = meter.sample()
    capture_sql = statements.count() if statements is not None else {}
    if profiler is not None:
        profiler.stop()
    if statements is not None:
        statements.stop()
    spent = 0
    for pool_id in sorted({pool_of(i, pools) for i in range(pools)}):
        budget = await client.ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=pool_id))
        assert budget.shards == pool_shards
        spent += budget.spent_fen
    assert spent == orders * 45_000, "every benchmark order must have been captured"
    baseline = summarise("baseline: gRPC health check (ledger)", base_lat, base_wall)
    rows = [
        summarise("prepare: RegisterConsumer + ClaimQualification", prep_lat, prep_wall),
        baseline,
        summarise(
            "ReserveSubsidy (verify item, lock qualification, hold budget)", res_lat, res_wall
        ),
        summarise("CaptureSubsidy", cap_lat, cap_wall),
    ]
    against_baseline(rows, baseline)
    return {
        "benchmark": "checkout",
        "orders": orders,
        "concurrency": concurrency,
        "pools": pools,
        "shards_per_pool": pool_shards,
        "rows": rows,
        # CPU ms per checkout by part of the stack: reserve, capture, and both (one checkout)
        "cpu_ms_per_reserve": CpuMeter.per_op(cpu0, cpu1, orders),
        "cpu_ms_per_capture": CpuMeter.per_op(cpu1, cpu2, orders),
        "cpu_ms_per_checkout": CpuMeter.per_op(cpu0, cpu2, orders),
        # The same-run CPU baseline: a busy machine makes every call cost more CPU (caches,
        # shared cores), so compare runs by CPU per checkout over CPU per health check too
        "cpu_ms_per_health_check": CpuMeter.per_op(base_cpu0, base_cpu1, orders),
        # SQL statements per call by database (--count-statements), the asynchronous
        # consumers' and relays' included: everything the phase made the databases do
        "sql_per_reserve": {db: round(n / orders, 2) for db, n in sorted(reserve_sql.items())},
        "sql_per_capture": {db: round(n / orders, 2) for db, n in sorted(capture_sql.items())},
    }


def result_name(workers: int, pools: int, pool_shards: int) -> str:
    """The result's name (bench/results/<name>.json): ``checkout`` for one pool of one shard
    and one worker, the other shapes named by what differs."""
    name = "checkout"
    if pools > 1:
        name += f"-{pools}pools"
    if pool_shards > 1:
        name += f"-{pool_shards}shards"
    if workers > 1:
        name += f"-{workers}workers"
    return name


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.checkout")
    parser.add_argument("--orders", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--profile", type=Path, help="py-spy flame graphs of every process during the checkout"
    )
    parser.add_argument(
        "--profile-suffix", default="", help="appended to each profile's name (e.g. -before)"
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=10,
        help="the client's deadline a call, s (raise it on a machine shared with other load)",
    )
    parser.add_argument(
        "--count-statements",
        action="store_true",
        help="count SQL statements per RPC from PostgreSQL's log (its CPU figures then differ)",
    )
    parser.add_argument(
        "--trace-ratio",
        type=float,
        help="run the services with parentbased_traceidratio trace sampling at this ratio",
    )
    # Every order on one pool is what this benchmark does (the hot pool); the flag says so.
    parser.add_argument("--one-pool", action="store_true", help="all orders on one pool")
    parser.add_argument(
        "--shards", type=int, default=1, help="also reserve on one pool of K shards (K > 1)"
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes per service")
    parser.add_argument("--pools", type=int, default=1, help="spread the orders over N pools")
    parser.add_argument("--pool-shards", type=int, default=1, help="each pool of K shards")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if not 1 <= args.pools <= args.orders:
        parser.error("--pools must be between 1 and --orders")
    if not 1 <= args.pool_shards <= 64:
        parser.error("--pool-shards must be between 1 and 64 (a funding proposal's bound)")
    with tempfile.TemporaryDirectory(prefix="bench-checkout-") as tmp:
        result = asyncio.run(
            run(
                args.orders,
                args.concurrency,
                Path(tmp),
                args.profile,
                args.profile_suffix,
                args.deadline,
                args.count_statements,
                args.trace_ratio,
                args.shards,
                args.workers,
                args.pools,
                args.pool_shards,
            )
        )
    where = "one budget pool" if args.pools == 1 else f"{args.pools} budget pools"
    print(
        f"checkout: {args.orders} orders, concurrency {args.concurrency}, {where} of"
        f" {args.pool_shards} shard(s), {args.workers} worker process(es) per service"
    )
    report(result_name(args.workers, args.pools, args.pool_shards), result)
    print("peak RSS MB:", result["rss_mb"])
    print("LockQualification batches (eligibility):", result["lock_batches"])
    print(f"CPU ms per checkout (reserve + capture), load average {result['load_average']}:")
    base = result["cpu_ms_per_health_check"]
    for part, ms in result["cpu_ms_per_checkout"].items():
        print(f"  {part:24} {ms:8.2f}")
    ratio = result["cpu_ms_per_checkout"]["total"] / max(base["total"], 1e-9)
    print(f"  (a health check: {base['total']:.2f} ms in all; a checkout is {ratio:.1f} of them)")
    for phase in ("reserve", "capture"):
        if result[f"sql_per_{phase}"]:
            print(f"SQL statements per {phase}: {result[f'sql_per_{phase}']}")
    if "shards" in result:
        compared = result["shards"]
        for row in compared["rows"]:
            print(
                f"{row['name']}: {row['throughput_per_s']:.1f}/s, p50 {row['p50_ms']:.1f} ms,"
                f" p99 {row['p99_ms']:.1f} ms, CPU {row['cpu_ms_per_reserve_total']:.1f} ms"
                f" per reserve {row['cpu_ms_per_reserve']}"
            )
        print(
            f"{compared['shards']} shards vs 1: {compared['throughput_ratio']:.3f}x throughput"
            f" (load average {compared['load_average_before']} -> "
            f"{compared['load_average_after']})"
        )
    return result


if __name__ == "__main__":
    main()
