"""Health follows the parts a service needs: its database always, Vault once a call met it down."""

from __future__ import annotations

import asyncio
from pathlib import Path

from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2

from services.kernel import faults, vault
from services.kernel.eventstore import make_engine
from services.kernel.health import HealthWatch, database_probe, vault_probe
from subsidyctl.stack import OpenBao, Postgres, free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def status(health: grpc_health.aio.HealthServicer, name: str = "") -> int:
    reply = await health.Check(health_pb2.HealthCheckRequest(service=name), None)
    return int(reply.status)


async def test_health_follows_the_database_and_vault_once_a_call_met_it_down(
    tmp_path: Path,
) -> None:
    logs = tmp_path / "logs"
    pg = Postgres(data_dir=tmp_path / "pg", port=free_port(), log_dir=logs, durable=False)
    bao = OpenBao(data_dir=tmp_path / "bao", port=free_port(2), log_dir=logs, dev=True)
    pg.start()
    bao.start()
    engine = make_engine(pg.url("postgres"), pool_size=1)
    try:
        watch = HealthWatch(
            {faults.DATABASE: database_probe(engine, timeout_s=1.0)},
            on_demand={faults.VAULT: vault_probe(vault.connect(bao.addr, token=bao.token))},
        )
        health = grpc_health.aio.HealthServicer()
        watch.bind(health, ["subsidy.v1.Test"])
        assert await watch.check()
        assert await status(health) == await status(health, "subsidy.v1.Test") == SERVING

        pg.stop()
        assert not await watch.check() and watch.down == {faults.DATABASE}
        assert await status(health) == await status(health, "subsidy.v1.Test") == NOT_SERVING
        pg.start()
        assert await watch.check() and watch.down == set()
        assert await status(health) == SERVING

        bao.stop()
        assert await watch.check()  # nothing has needed Vault yet: not this service's concern
        watch.poke_for(faults.VAULT)  # a call met it down
        assert not await watch.check() and watch.down == {faults.VAULT}
        assert await status(health) == NOT_SERVING
        # A dev server starts afresh (in memory) on the same address; health needs no token.
        bao = OpenBao(data_dir=tmp_path / "bao2", port=bao.port, log_dir=logs, dev=True)
        bao.start()
        assert await watch.check() and watch.down == set()
        assert await status(health) == SERVING

        await watch.hold("relay stuck")  # only the holder lifts a hold
        assert not await watch.check() and await status(health) == NOT_SERVING
        await watch.hold("relay stuck", on=False)
        assert await status(health) == SERVING
        stop = asyncio.Event()
        stop.set()
        await watch.run(stop)  # returns at once when stopped
    finally:
        await engine.dispose()
        bao.stop()
        pg.stop()
