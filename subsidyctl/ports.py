"""The local stack's ports and the signals ``subsidyctl restore`` sends a running ``up``: what
most commands need of the stack, without importing what starts it (subsidyctl.localstack brings
NATS, SQLAlchemy and the event store, about a second of every command's start-up)."""

from __future__ import annotations

import signal
from dataclasses import dataclass

from services.kernel import topology

SERVICES = topology.SERVICE_NAMES
SIMULATOR = topology.IDENTITY_SIMULATOR


@dataclass(frozen=True)
class Ports:
    """Every port of the local stack, derived from one base so they are easy to configure
    (each process's offset is in services/kernel/topology.py)."""

    base: int = 7100

    @property
    def services(self) -> dict[str, int]:
        """gRPC port of each service and of the identity simulator."""
        return {name: topology.local_port(name, self.base) for name in (*SERVICES, SIMULATOR)}

    def metrics(self, service: str) -> int:
        return topology.local_metrics_port(service, self.base)

    @property
    def postgres(self) -> int:
        return self.base + 32

    @property
    def nats(self) -> int:
        return self.base + 42

    @property
    def nats_monitor(self) -> int:
        return self.base + 82

    @property
    def bao(self) -> int:
        return self.base + 20  # and base + 21 for its cluster listener

    @property
    def dashboard(self) -> int:
        """The fund-monitoring dashboard (``subsidyctl dashboard``, started by ``up``)."""
        return self.base + 88

    def all(self) -> list[int]:
        return [
            *self.services.values(),
            *(self.metrics(s) for s in SERVICES),
            self.postgres,
            self.nats,
            self.nats_monitor,
            self.bao,
            self.bao + 1,
            self.dashboard,
        ]


# How ``subsidyctl restore`` asks a running ``subsidyctl up`` (the pid in its run folder's
# stack.lock) to stop its services and start them again; ``up`` writes what it did to STATE.
QUIESCE, RESUME = signal.SIGUSR1, signal.SIGUSR2
STATE = "stack.state"
