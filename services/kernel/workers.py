"""Several worker processes of one service on one port, and the work only one of them does.

With ``SUBSIDY_WORKERS=N`` (N > 1) ``python -m services.<name>`` becomes a small supervisor: it
starts N workers (``python -m services.<name> serve --worker K``), each a whole service process
(its own event loop, database pool, NATS connection and certificate) listening on the same
port with ``SO_REUSEPORT``, so the kernel spreads new connections over them. The supervisor
passes SIGTERM/SIGINT on, and when one worker ends unasked it stops the others and exits with
that worker's code: the pod (or the local stack's supervisor) restarts the service whole,
rather than serving on with fewer workers than it was sized for.

What the workers share safely as it is: the durable JetStream pull consumers (each message goes
to one of them, and a handler's effects commit with its handled-record), the per-process caches
refreshed from the database (policy, switches, risk rules), and every command (stream locks).
What must be singular — the outbox relay (one publisher keeps the bus free of N copies of every
event and the relay's checkpoint moving one way) and the sweepers and detection loops — runs
under :class:`Leadership`: one process at a time per service database, decided by a PostgreSQL
session advisory lock. The lock is the database's, so the same holds across pod replicas whose
workers share the database; another process takes over within ``retry_s`` of the leader's
session ending (a crash, a kill, a database restart).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from types import FrameType
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .background import pause

log = logging.getLogger(__name__)

Loop = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


def worker_command(service: str, index: int) -> list[str]:
    """The command line of worker ``index`` of ``service`` (what the supervisor starts)."""
    return [sys.executable, "-m", f"services.{service}", "serve", "--worker", str(index)]


def supervise(
    service: str, workers: int, *, grace_s: float = 20.0, env: dict[str, str] | None = None
) -> int:
    """Run ``workers`` worker processes of ``service`` (with ``env``, if given, as their
    environment) until a signal or one of them ends; returns the exit code (0 after a signal;
    else the first ended worker's code, or 1)."""
    procs = [subprocess.Popen(worker_command(service, k), env=env) for k in range(workers)]
    asked = {"stop": False}

    def forward(signum: int, _frame: FrameType | None) -> None:
        asked["stop"] = True
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    log.info("%s: %d workers on one port (pids %s)", service, workers, [p.pid for p in procs])
    ended: list[subprocess.Popen[bytes]] = []
    while not asked["stop"] and not ended:
        time.sleep(0.2)
        ended = [p for p in procs if p.poll() is not None]
    code = 0
    if ended and not asked["stop"]:
        code = ended[0].returncode or 1
        log.error(
            "%s: worker pid %d ended (code %s); stopping the others",
            service,
            ended[0].pid,
            ended[0].returncode,
            extra={"alert": "task"},
        )
        forward(signal.SIGTERM, None)
    for proc in procs:
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return code


async def orphan_watch(stop: asyncio.Event, supervisor: int, every_s: float = 1.0) -> None:
    """Set ``stop`` (the worker drains and exits) once its supervisor is gone, killed without
    a chance to pass a signal on: no orphan keeps serving the port."""
    while not stop.is_set():
        if os.getppid() != supervisor:
            log.error("supervisor pid %d is gone; this worker stops", supervisor)
            stop.set()
            return
        await pause(stop, every_s)


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``name`` (PostgreSQL's bigint)."""
    digest = hashlib.blake2b(f"subsidy:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class Leadership:
    """Runs ``loops`` in only one process at a time among those sharing ``engine``'s database.

    Each process contends for a session advisory lock every ``retry_s``; the one holding it
    runs every loop with an event set when the service stops or the lock's session is lost
    (checked every ``check_s``), then lets go. ``on_step_down`` runs in the leader after its
    loops ended because the service stops, still holding the lock (the relay's last flush)."""

    def __init__(
        self,
        engine: AsyncEngine,
        name: str,
        loops: Sequence[Loop],
        *,
        on_step_down: Callable[[], Coroutine[Any, Any, object]] | None = None,
        retry_s: float = 1.0,
        check_s: float = 1.0,
    ) -> None:
        self.engine = engine
        self.name = name
        self.key = lock_key(name)
        self.loops = loops
        self.on_step_down = on_step_down
        self.retry_s = retry_s
        self.check_s = check_s
        self.leading = False
        self.terms = 0  # how many times this process became the leader (tests read it)

    async def _try_lock(self, conn: AsyncConnection) -> bool:
        got = (
            await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key})
        ).scalar()
        await conn.commit()  # a session lock: it outlives the transaction that took it
        return bool(got)

    async def run(self, stop: asyncio.Event) -> None:
        """Contend, lead while the lock is held, until ``stop``."""
        while not stop.is_set():
            try:
                await self._term(stop)
            except Exception as exc:  # the database is down: contend again when it is back
                log.warning("%s: leadership lost or not reachable (%s)", self.name, exc)
            await pause(stop, self.retry_s)

    async def _term(self, stop: asyncio.Event) -> None:
        async with self.engine.connect() as conn:
            try:
                if await self._try_lock(conn):
                    await self._lead(conn, stop)
            except BaseException:
                # Never back into the pool with the lock perhaps still held by its session.
                await conn.invalidate()
                raise

    async def _lead(self, conn: AsyncConnection, stop: asyncio.Event) -> None:
        until = asyncio.Event()
        tasks = [asyncio.create_task(loop(until)) for loop in self.loops]
        self.leading, self.terms = True, self.terms + 1
        log.info("%s: this process leads (its singular work runs here)", self.name)
        try:
            while not stop.is_set():
                await pause(stop, self.check_s)
                await conn.execute(text("SELECT 1"))  # raises once the session is gone
                await conn.commit()
        finally:
            until.set()
            for result in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(result, BaseException):
                    log.error("%s: a singular loop failed", self.name, exc_info=result)
            self.leading = False
        if self.on_step_down is not None:
            await self.on_step_down()
        await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
        await conn.commit()


__all__ = ["Leadership", "lock_key", "orphan_watch", "supervise", "worker_command"]
