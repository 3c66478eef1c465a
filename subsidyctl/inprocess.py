"""The four services and the identity simulator in one event loop, on given infrastructure.

The services run exactly the code their own processes run (services.kernel.app.start); only the
process boundary is gone. Tests use it so an in-memory span exporter sees a whole checkout, and
benchmarks so that one Python process measures the hot path without process start-up noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.audit.service import SPEC as AUDIT
from services.catalog.service import SPEC as CATALOG
from services.eligibility.service import SPEC as ELIGIBILITY
from services.identity_sim.simulator import start as start_simulator
from services.kernel import tls, topology, vault
from services.kernel.app import Running, ServiceSpec, migrate_schema, start
from services.kernel.identity import service_caller
from services.kernel.settings import Settings
from services.ledger.service import SPEC as LEDGER

SPECS: tuple[ServiceSpec, ...] = (CATALOG, ELIGIBILITY, AUDIT, LEDGER)
LOOPBACK = ("localhost", "127.0.0.1")


@dataclass
class InProcessPlatform:
    running: dict[str, Running]
    endpoints: dict[str, str]
    simulator: grpc.aio.Server

    async def stop(self) -> None:
        for r in reversed(list(self.running.values())):
            await r.stop()
        await self.simulator.stop(grace=1)


async def start_platform(
    database_url: Callable[[str], str],
    nats_url: str,
    vault_addr: str,
    vault_token: str,
    *,
    reservation_timeout_s: int = 900,
    abandon_after_s: int = 60,
    cert_ttl: str = "1h",
    migration_database_url: Callable[[str], str | None] = lambda service: None,
    initial_policy: Path | None = None,
    expiry_sweep_s: float = 5.0,
    detect_every_s: float = 60.0,
    max_concurrent: int = 0,
) -> InProcessPlatform:
    """Start the simulator and the services (in dependency order) on free loopback ports;
    each service is pointed at the peers services/kernel/topology.py gives it."""
    sim_identity = tls.VaultCertificates(
        lambda: vault.connect(vault_addr, token=vault_token).issue_certificate(
            service_caller(topology.IDENTITY_SIMULATOR), ttl=cert_ttl, names=LOOPBACK
        )
    )
    sim, sim_port = await start_simulator("127.0.0.1:0", sim_identity)
    endpoints = {topology.IDENTITY_SIMULATOR: f"127.0.0.1:{sim_port}"}
    running: dict[str, Running] = {}
    for spec in SPECS:
        settings = Settings(
            service=spec.name,
            grpc_listen="127.0.0.1:0",
            database_url=database_url(spec.name),
            migration_database_url=migration_database_url(spec.name),
            nats_url=nats_url,
            vault_addr=vault_addr,
            vault_token=vault_token,
            vault_k8s_role=None,
            peers={p: endpoints[topology.serving_process(p)] for p in spec.peers},
            reservation_timeout_s=reservation_timeout_s,
            abandon_after_s=abandon_after_s,
            tls_source="vault",
            cert_ttl=cert_ttl,
            initial_policy=initial_policy,
            expiry_sweep_s=expiry_sweep_s,
            detect_every_s=detect_every_s,
            max_concurrent_writes=max_concurrent,
            max_concurrent_reads=max_concurrent,
        )
        await migrate_schema(spec, settings)  # as the chart's migration Job does, first
        running[spec.name] = await start(spec, settings)
        endpoints[spec.name] = f"127.0.0.1:{running[spec.name].port}"
    return InProcessPlatform(running, endpoints, sim)
