"""What a service's ``grpc.health.v1`` answer means: every part it needs is up, and nothing that
must run has stopped.

One :class:`HealthWatch` per service decides SERVING or NOT_SERVING from two things:
- the parts it needs, probed every ``interval_s`` (and at once when a call or a consumer met a
  failure :func:`services.kernel.faults.transient_part` says is an outage): the service's
  database (``SELECT 1``) and its NATS connection, and Vault once a call has met it down (not
  every service needs it; its calls show which do). A part that is down turns the service
  NOT_SERVING (so Kubernetes takes it out of the Service's endpoints and a platform's client
  goes to a replica that can answer); once the part answers again it is SERVING again, with no
  restart. Each change is one log line.
- holds that only something else can lift: an essential task that ended (for good: the pod
  must be restarted), the relay stuck on an event the bus refuses (until an operator skips it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2
from nats.aio.client import Client as NatsClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from .background import pause
from .vault import Vault

log = logging.getLogger(__name__)
_MIN_SPACING_S = 0.2

Probe = Callable[[], Awaitable[bool]]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def database_probe(engine: AsyncEngine, timeout_s: float = 2.0) -> Probe:
    """True if the database answers ``SELECT 1`` within ``timeout_s``. A pooled connection that
    the server closed while it was down fails once and is discarded (SQLAlchemy then recycles
    the pool), so a failure is tried once more on a fresh connection before it counts."""

    async def once() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def probe() -> bool:
        for _ in range(2):
            try:
                await asyncio.wait_for(once(), timeout_s)
            except Exception:
                continue
            return True
        return False

    return probe


class HealthWatch:
    """Sets a server's health from its parts' probes and from holds (see the module)."""

    def __init__(
        self,
        probes: Mapping[str, Probe],
        *,
        on_demand: Mapping[str, Probe] | None = None,
        interval_s: float = 1.0,
    ) -> None:
        self._health: grpc_health.aio.HealthServicer | None = None
        self._names: tuple[str, ...] = ()
        self._probes = dict(probes)
        # Parts not every service needs (Vault): probed only once a call has met one down, and
        # until it answers again. Whether the service needs it is what its calls show.
        self._on_demand = dict(on_demand or {})
        self._suspects: set[str] = set()
        self._interval_s = interval_s
        self.down: set[str] = set()
        self._holds: set[str] = set()
        self._status: int | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    def bind(self, health: grpc_health.aio.HealthServicer, names: Sequence[str]) -> None:
        """Publish to ``health`` for the server and each of ``names``, from the next check on
        (until then, which is until the service is ready, nothing is published)."""
        self._health = health
        self._names = ("", *names)

    @property
    def serving(self) -> bool:
        return not self.down and not self._holds

    def poke(self) -> None:
        """Probe now rather than at the next period (a call or consumer met an outage)."""
        self._wake.set()

    def poke_for(self, part: str) -> None:
        """:meth:`poke`, as the callback that is told which part a failure met (an on-demand
        part is probed from now on, until it answers)."""
        if part in self._on_demand:
            self._suspects.add(part)
        self._wake.set()

    async def hold(self, reason: str, on: bool = True) -> None:
        """NOT_SERVING while ``reason`` holds (``on=False`` lifts it)."""
        if on:
            self._holds.add(reason)
        else:
            self._holds.discard(reason)
        await self._publish()

    async def check(self) -> bool:
        """Probe every part once and publish the result (once bound); True if serving."""
        async with self._lock:
            probes = {**self._probes, **{p: self._on_demand[p] for p in sorted(self._suspects)}}
            results = await asyncio.gather(*(p() for p in probes.values()))
            for part, up in zip(probes, results, strict=True):
                if up:
                    self._suspects.discard(part)
                if not up and part not in self.down:
                    self.down.add(part)
                    log.warning(
                        "%s is down: health NOT_SERVING until it is back",
                        part,
                        extra={"alert": "part-down", "part": part},
                    )
                elif up and part in self.down:
                    self.down.discard(part)
                    log.info("%s is back", part, extra={"part": part})
            await self._publish()
        return self.serving

    async def _publish(self) -> None:
        if self._health is None:
            return
        status = SERVING if self.serving else NOT_SERVING
        if status == self._status:
            return
        before, self._status = self._status, status
        for name in self._names:
            await self._health.set(name, status)
        if before is not None:
            log.info("health %s", health_pb2.HealthCheckResponse.ServingStatus.Name(status))

    async def run(self, stop: asyncio.Event) -> None:
        """Probe every ``interval_s`` (sooner when poked) until ``stop``."""
        while not stop.is_set():
            self._wake.clear()  # a poke from here on asks for the next check
            try:
                await self.check()
            except Exception:  # a probe must never end the watch
                log.exception("health check failed")
            # At most a few probes a second however many calls poke it meanwhile.
            await pause(stop, _MIN_SPACING_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval_s - _MIN_SPACING_S)


def vault_probe(v: Vault, timeout_s: float = 3.0) -> Probe:
    """True if Vault is unsealed and active within ``timeout_s``."""

    async def probe() -> bool:
        try:
            return await asyncio.wait_for(asyncio.to_thread(v.answers_sync), timeout_s)
        except TimeoutError:
            return False

    return probe


def nats_probe(nc: NatsClient) -> Probe:
    """True while the NATS client is connected (it reconnects by itself; meanwhile the relay
    cannot publish and the consumers cannot fetch)."""

    async def probe() -> bool:
        return bool(nc.is_connected)

    return probe
