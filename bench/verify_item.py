"""Benchmark: VerifyItem, the checkout's hot path in the catalog, over gRPC on a real PostgreSQL.

The catalog runs in this process (its handlers, servicer and the shared rpc bootstrap, exactly
as served in production, without NATS: VerifyItem neither reads nor writes events). The
database holds 10,000 products (imported through the bulk import, which is timed too), a
price change on every tenth one, and 10,000 sales orders with serials, so every query is
answered from indexes of realistic size.

Reports throughput and p50/p99 latency next to a same-run baseline (a gRPC health check on the
same server at the same concurrency) as a ratio, so a slower or busier machine shows up in the
baseline, not as a regression, and the CPU milliseconds per call of this process (the catalog
server and its gRPC client together: the health check's row is what the gRPC calls alone cost)
and of PostgreSQL. No timing is asserted anywhere.

Usage: python -m bench.verify_item [--calls N] [--concurrency C] [--profile DIR]

``--profile DIR`` records py-spy (GIL-holding samples: this process's own CPU) during each row,
as collapsed stacks in ``DIR/verify-<row>.txt``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hvac
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import insert

from bench.claim_rush import CpuMeter
from bench.common import against_baseline, report, summarise, timed
from services.catalog.api import CatalogApi
from services.catalog.handlers import Catalog
from services.catalog.importer import import_products
from services.catalog.projections import metadata, sales_orders
from services.kernel import pki, rpc, tls
from services.kernel.events import Context
from services.kernel.eventstore import EventStore, make_engine
from services.kernel.identity import Caller, Role
from subsidy.v1 import catalog_pb2, catalog_pb2_grpc, common_pb2
from subsidyctl.stack import OpenBao, Postgres, free_port

PRODUCTS = 10_000
# CpuMeter's name for this process: here it serves the catalog and runs the client too.
THIS_PROCESS = "client (bench)"
OPERATOR = common_pb2.Actor(kind=common_pb2.Actor.KIND_OPERATOR, id="bench")


def product_csv(merchant_id: str) -> bytes:
    codes = ["refrigerator", "washing_machine", "tv", "air_conditioner", "phone", "tablet"]
    lines = ["sku,merchant_id,category,grade,brand,model,list_price_fen"]
    for i in range(PRODUCTS):
        code = codes[i % len(codes)]
        grade = "" if code in ("phone", "tablet") else str(1 + i % 3)
        lines.append(f"b-{i},{merchant_id},{code},{grade},brand{i % 17},model-{i},{300_000 + i}")
    return ("\n".join(lines) + "\n").encode()


async def seed(
    catalog: Catalog,
    operator: catalog_pb2_grpc.CatalogServiceAsyncStub,
    approver: catalog_pb2_grpc.CatalogServiceAsyncStub,
) -> float:
    """Merchant, 10,000 products (timed import), price changes and sales orders; the calls as
    the people who make them (an operator files and reprices, an approver approves)."""
    stub = operator
    await stub.ApplyMerchant(
        catalog_pb2.ApplyMerchantRequest(
            merchant_id="bench-m",
            name="bench",
            licence_number="91440300MA5DC6QX4Y",
            contact_phone="13800000000",
        )
    )
    await approver.ReviewMerchant(
        catalog_pb2.ReviewMerchantRequest(merchant_id="bench-m", approve=True)
    )
    t0 = time.perf_counter()
    ctx = Context(common_pb2.Actor(kind=OPERATOR.kind, id=OPERATOR.id, reason="bench"))
    async for progress in import_products(catalog, product_csv("bench-m"), ctx):
        if progress.result is not None:
            assert progress.result.applied == PRODUCTS, progress.result
    import_s = time.perf_counter() - t0
    for i in range(0, PRODUCTS, 10):
        await stub.UpdatePrice(
            catalog_pb2.UpdatePriceRequest(
                sku=f"b-{i}", list_price_fen=290_000 + i, reason="bench", actor=OPERATOR
            )
        )
    now = datetime.now(UTC)
    async with catalog.store.transaction() as tx:
        await tx.conn.execute(
            insert(sales_orders),
            [
                {
                    "order_id": f"bench-o-{i}",
                    "sku": f"b-{i}",
                    "merchant_id": "bench-m",
                    "category": "phone",
                    "serial": f"86{i:013d}",
                    "unit_price_fen": 300_000,
                    "subsidy_fen": 45_000,
                    "status": "CAPTURED",
                    "captured": True,
                    "reserved_at": now,
                    "captured_at": now,
                }
                for i in range(PRODUCTS)
            ],
        )
    return import_s


class SelfProfile:
    """py-spy on this process for one row (``--profile DIR``); nothing without a directory."""

    def __init__(self, directory: Path | None, row: str) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        if directory is None:
            return
        directory.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^a-z0-9]+", "-", row.lower()).strip("-")
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        command = [spy, "record", "--pid", str(os.getpid()), "--format", "raw", "--rate", "200"]
        self._proc = subprocess.Popen(
            [*command, "--gil", "-o", str(directory / f"verify-{slug}.txt")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def __aenter__(self) -> None:
        if self._proc is not None:
            await asyncio.sleep(0.5)  # attached before the row starts

    async def __aexit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            await asyncio.to_thread(self._proc.wait, 30)


async def measure(
    calls: int, concurrency: int, root: Path, profile: Path | None = None
) -> dict[str, Any]:
    pg = Postgres(data_dir=root / "pg", port=free_port(), log_dir=root, durable=False)
    pg.start()
    bao = OpenBao(data_dir=root / "bao", port=free_port(2), log_dir=root, dev=True)
    bao.start()  # the campaign's CA: the catalog serves, the ledger calls, both with mTLS
    vault = hvac.Client(url=bao.addr, token=bao.token)

    def identity(who: Caller) -> tls.CertificateSource:
        names = {"ip_sans": ["127.0.0.1"]} if who.role is Role.SERVICE else {}
        return tls.VaultCertificates(lambda: pki.issue(vault, who, ttl="2h", **names))

    store = EventStore(make_engine(pg.url("catalog"), pool_size=concurrency))
    try:
        await store.create_tables(metadata)
        catalog = Catalog(store)
        await catalog.ensure_default_policy()
        server, _ = rpc.build_server(
            [(catalog_pb2_grpc.add_CatalogServiceServicer_to_server, CatalogApi(catalog))],
            [catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name],
        )
        port = rpc.listen(server, "127.0.0.1:0", identity(Caller(Role.SERVICE, "catalog")))
        await server.start()
        # VerifyItem is the ledger's call: the benchmark calls as the ledger does.
        channel = rpc.channel(
            f"127.0.0.1:{port}", identity(Caller(Role.SERVICE, "ledger")), deadline_s=30
        )
        address = f"127.0.0.1:{port}"
        people = [
            rpc.channel(address, identity(Caller(role, "bench")), deadline_s=30)
            for role in (Role.OPERATOR, Role.APPROVER)
        ]
        try:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            operator, approver = (catalog_pb2_grpc.CatalogServiceStub(c) for c in people)
            import_s = await seed(catalog, operator, approver)
            rng = random.Random(7)
            skus = [f"b-{rng.randrange(PRODUCTS)}" for _ in range(calls)]
            seen = sorted(set(skus))

            async def check(i: int) -> None:
                await health.Check(health_pb2.HealthCheckRequest())

            async def quote(i: int) -> None:
                await stub.Quote(
                    catalog_pb2.QuoteRequest(category="refrigerator", grade=1, price_fen=300_000)
                )

            async def verify(i: int) -> None:
                await stub.VerifyItem(
                    catalog_pb2.VerifyItemRequest(sku=skus[i], unit_price_fen=300_000)
                )

            async def verify_serial(i: int) -> None:
                v = await stub.VerifyItem(
                    catalog_pb2.VerifyItemRequest(
                        sku=skus[i], unit_price_fen=300_000, serial=f"86{i % (2 * PRODUCTS):013d}"
                    )
                )
                assert v.reasons or v.eligible

            async def verify_seen(i: int) -> None:
                await stub.VerifyItem(
                    catalog_pb2.VerifyItemRequest(sku=seen[i], unit_price_fen=300_000)
                )

            async def reprice_one() -> None:
                """A price change elsewhere: every row the catalog kept is older than it."""
                await operator.UpdatePrice(
                    catalog_pb2.UpdatePriceRequest(
                        sku="b-1", list_price_fen=280_000, reason="bench", actor=OPERATOR
                    )
                )

            async def nothing() -> None:
                return None

            # Warm the pools and plans, and read every product the rows ask for once: a
            # catalog in a rush has read its products before (the next rows say what a change
            # in between costs).
            await timed(min(calls, 500), concurrency, verify)
            await timed(len(seen), concurrency, verify_seen)
            meter = CpuMeter()
            load_before = os.getloadavg()
            rows = []
            for name, op, before_row in (
                ("baseline: gRPC health check", check, nothing),
                ("Quote (policy only, in memory)", quote, nothing),
                ("VerifyItem, nothing changed since each product was read", verify, nothing),
                ("VerifyItem after a price change (every row read again)", verify, reprice_one),
                ("VerifyItem with a serial (always read)", verify_serial, nothing),
            ):
                await before_row()
                remembered, statements = catalog.items.from_memory, catalog.items.statements
                async with SelfProfile(profile, name):
                    before = meter.sample()
                    row = summarise(name, *await timed(calls, concurrency, op))
                    cpu = CpuMeter.per_op(before, meter.sample(), calls)
                row["cpu_ms_per_call"] = {
                    "catalog + client": cpu.get(THIS_PROCESS, 0.0),
                    "postgres": cpu.get("postgres", 0.0),
                }
                row["answered_from_memory"] = catalog.items.from_memory - remembered
                row["statements"] = catalog.items.statements - statements
                rows.append(row)
            load_after = os.getloadavg()
        finally:
            for c in people:
                await c.close()
            await channel.close()
            await server.stop(grace=None)
    finally:
        await store.engine.dispose()
        pg.stop()
        bao.stop()
    against_baseline(rows, rows[0])
    return {
        "benchmark": "verify_item",
        "calls": calls,
        "concurrency": concurrency,
        "products": PRODUCTS,
        "import_10000_rows_s": round(import_s, 2),
        "load_average": [round(x, 2) for x in (*load_before, *load_after)],
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.verify_item")
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--profile", type=Path, help="py-spy collapsed stacks of each row here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        result = asyncio.run(measure(args.calls, args.concurrency, Path(tmp), args.profile))
    print(
        f"verify_item: {args.calls} calls per row, concurrency {args.concurrency}, "
        f"{PRODUCTS} products; bulk import of {PRODUCTS} rows: {result['import_10000_rows_s']} s"
    )
    report("verify_item", result)
    load = result["load_average"]
    print(f"CPU ms per call (load average {load[:3]} before, {load[3:]} after):")
    for row in result["rows"]:
        cpu = row["cpu_ms_per_call"]
        print(
            f"  {row['name']:32} catalog + client {cpu['catalog + client']:6.3f}"
            f"   postgres {cpu['postgres']:6.3f}"
        )
    return result


if __name__ == "__main__":
    main()
