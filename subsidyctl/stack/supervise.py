"""The local stack watches its infrastructure as Kubernetes watches a pod's containers.

A :class:`Supervisor` thread polls each part (PostgreSQL, NATS, OpenBao) every half second.
Polling reaps a child that died, so it never lingers as a zombie whose pid still looks alive
(PostgreSQL's own start then refuses the data directory: "lock file postmaster.pid already
exists"). A part that exited is started again on the same data, with a log line saying what
happened and another when it is back; a start that fails (a killed postmaster's backends still
hold its shared memory for a moment) is tried again with a capped back-off, as a kubelet does
with a crash-looping container. The services are not touched: they notice the outage (health
NOT_SERVING, calls UNAVAILABLE) and reconnect by themselves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from .processes import _Server

_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)


class Supervisor:
    """Restarts a part of ``parts`` (name → server) that exited; ``say`` gets the log lines."""

    def __init__(
        self,
        parts: Mapping[str, _Server],
        say: Callable[[str], None],
        *,
        interval_s: float = 0.5,
    ) -> None:
        self._parts = dict(parts)
        self._say = say
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.restarts: dict[str, int] = dict.fromkeys(self._parts, 0)

    def start(self) -> None:
        """Watch in a daemon thread until :meth:`stop`."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop watching (before the parts are stopped on purpose); waits for a restart under
        way to finish."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def check(self) -> list[str]:
        """One round: restart every part that exited; returns the names restarted."""
        restarted = []
        for name, part in self._parts.items():
            code = part.exit_code()  # reaps it
            if code is None:
                continue
            self._say(f"{name} exited (code {code}); restarting it")
            if self._restart(name, part):
                restarted.append(name)
        return restarted

    def _restart(self, name: str, part: _Server) -> bool:
        started = time.monotonic()
        for attempt in range(1, 1_000_000):
            try:
                part.start()
            except Exception as exc:
                delay = _BACKOFF_S[min(attempt, len(_BACKOFF_S)) - 1]
                first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                self._say(f"{name}: restart {attempt} failed ({first_line}); again in {delay} s")
                if self._stop.wait(delay):
                    return False
                continue
            self.restarts[name] += 1
            self._say(f"{name} restarted in {time.monotonic() - started:.1f} s (pid {part.pid})")
            return True
        return False

    def _watch(self) -> None:
        said = ""
        while not self._stop.wait(self._interval_s):
            try:
                self.check()
            except Exception as exc:  # the watch must outlive anything one round meets
                if repr(exc) != said:  # once, not every half second
                    said = repr(exc)
                    self._say(f"supervisor: {said}")
