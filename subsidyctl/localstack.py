"""The whole platform on one machine: real PostgreSQL, NATS and OpenBao plus every service as
its own process, with logs and traces in one run folder.

(Just over 450 lines: one start-up sequence, read top to bottom; each part's own start is in
subsidyctl/stack/.)

Every connection is mutual TLS. OpenBao holds the campaign's CA (services.kernel.pki); each
service asks it for its own certificate with the stack's Vault token and renews it itself
(``SUBSIDY_TLS_SOURCE=vault``); the identity simulator reads files the stack issues into
``run/certs/service-identity-sim`` (``SUBSIDY_TLS_SOURCE=files``). At each start the stack also
issues the demo identities into ``run/certs/<role>-<name>/`` (stack.certs.DEMO_IDENTITIES),
which subsidyctl's commands present by default; ``up`` renews them while it runs.

Used by ``subsidyctl up`` (``make run``; data survives restarts) and ``subsidyctl smoke``
(``make smoke``; a throwaway folder and free ports, so it never collides with a running stack).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.js.errors import NotFoundError

from services.kernel import bus, natsauth, tls, topology
from services.kernel.identity import Caller

from .demo import write_demo_policy

# Re-exported: the stack's ports and services, for whoever starts a stack.
from .ports import SERVICES as SERVICES
from .ports import SIMULATOR as SIMULATOR
from .ports import Ports as Ports
from .stack import Nats, OpenBao, Postgres, StackError, port_in_use
from .stack import certs as identities
from .stack.nats import NatsCluster
from .stack.postgres import migration_user, runtime_user, sqlalchemy_url
from .stack.processes import _Server
from .stack.supervise import Supervisor

REPO = Path(__file__).resolve().parent.parent


def write_private(path: Path, content: str) -> None:
    """Write a secret to ``path``, readable by the owner only from the moment it exists.

    ``write_text`` then ``chmod`` leaves the secret readable under the default umask until the
    chmod (and for good if the process dies in between). The file is created 0600; one that
    already existed is made 0600 before anything is written to it (O_TRUNC has emptied it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fd, 0o600)
        fh.write(content)


class AlreadyRunning(StackError):
    """Another ``subsidyctl up`` holds this run folder."""


@dataclass
class LocalStack:
    run_dir: Path
    ports: Ports = field(default_factory=Ports)
    durable: bool = True
    log: IO[str] = sys.stderr
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _extra: dict[str, dict[str, str]] = field(default_factory=dict)
    settings_overrides: dict[str, str] = field(default_factory=dict)  # e.g. shorter timeouts
    _lock: IO[str] | None = None
    pg: Postgres | None = None
    nats: Nats | NatsCluster | None = None
    bao: OpenBao | None = None
    # 1: one nats-server on the stack's ports; more: a JetStream cluster of that many nodes on
    # free ports, every stream at that many replicas (as production runs it).
    nats_nodes: int = 1
    # Worker processes per service, all on the service's one port (SUBSIDY_WORKERS).
    workers: int = 1
    supervisor: Supervisor | None = None  # restarts a part that dies (stack/supervise.py)
    identity_ttl: str = identities.DEMO_TTL  # the demo users' and the simulator's certificates

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    @property
    def certs(self) -> Path:
        """``<role>-<name>/`` per identity the stack issued (tls.crt, tls.key, ca.crt)."""
        return self.run_dir / "certs"

    @property
    def token_file(self) -> Path:
        """The root token, how the stack (and ``subsidyctl certs issue``) reaches Vault."""
        return self.run_dir / "LOCAL-ONLY-vault-token"

    def identity(self, who: Caller) -> Path:
        """The directory of one identity the stack issued."""
        return identities.identity_dir(self.certs, who)

    @property
    def traces(self) -> Path:
        return self.run_dir / "traces"

    def endpoint(self, service: str) -> str:
        return f"127.0.0.1:{self.ports.services[service]}"

    def say(self, message: str) -> None:
        print(message, file=self.log, flush=True)

    # -- start ------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Hold the run folder's lock: a second ``up`` says so instead of failing obscurely."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock_path = self.run_dir / "stack.lock"
        fh = lock_path.open("a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            info = fh.read().strip()
            fh.close()
            raise AlreadyRunning(
                f"a stack is already running from {self.run_dir} ({info or 'pid unknown'}); "
                "stop it with Ctrl-C in its terminal, or use another --run-dir and --base-port"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}, ledger at {self.endpoint('ledger')}\n")
        fh.flush()
        self._lock = fh
        busy = [p for p in self.ports.all() if port_in_use(p)]
        if busy:
            self.release()
            raise StackError(
                f"ports {', '.join(map(str, busy))} are in use by another program; "
                f"choose another base port (--base-port, now {self.ports.base})"
            )

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def start(self) -> None:
        t0 = time.monotonic()
        self.acquire()
        try:
            self.logs.mkdir(parents=True, exist_ok=True)
            self.traces.mkdir(parents=True, exist_ok=True)
            data = self.run_dir / "data"
            self.pg = Postgres(
                data_dir=data / "postgres",
                port=self.ports.postgres,
                log_dir=self.logs,
                durable=self.durable,
                password_file=self.run_dir / "LOCAL-ONLY-postgres-password",
            )
            self.nats = (
                Nats(
                    store_dir=data / "nats",
                    port=self.ports.nats,
                    monitor_port=self.ports.nats_monitor,
                    log_dir=self.logs,
                )
                if self.nats_nodes == 1
                else NatsCluster(
                    store_dir=data / "nats-cluster", log_dir=self.logs, size=self.nats_nodes
                )
            )
            self.bao = OpenBao(
                data_dir=data / "openbao", port=self.ports.bao, log_dir=self.logs, dev=False
            )
            self.say("starting PostgreSQL, NATS JetStream and OpenBao ...")
            self.pg.start()
            self.provision_databases()
            self.bao.start()
            # NATS's users and certificate come from Vault: one nkey per service and the
            # operator's, their seeds kept in OpenBao (reused across restarts).
            self.nats.accounts = natsauth.provision(self.bao.client())
            self.nats.start()
            self.supervisor = Supervisor(self.infrastructure(), self.say)
            self.supervisor.start()
            token_file = self.token_file
            write_private(token_file, self.bao.token)
            self.issue_identities()
            self._spawn(
                SIMULATOR,
                {
                    "SUBSIDY_TLS_SOURCE": "files",
                    "SUBSIDY_TLS_DIR": str(self.identity(identities.SIMULATOR_IDENTITY)),
                },
            )
            self._wait_serving(SIMULATOR)
            self.migrate(token_file)
            for service in SERVICES:
                self._spawn(service, self._service_env(service, token_file))
            for service in SERVICES:
                self._wait_serving(service)
        except BaseException:
            self.stop()
            raise
        self.say(f"stack serving in {time.monotonic() - t0:.1f} s")

    def infrastructure(self) -> dict[str, _Server]:
        """The infrastructure processes the supervisor watches, by the name its log lines use
        (a NATS cluster's nodes each on their own: one that dies is restarted alone)."""
        assert self.pg and self.nats and self.bao
        nodes: list[_Server] = list(getattr(self.nats, "nodes", None) or [self.nats])
        nats = (
            {"NATS": nodes[0]}
            if len(nodes) == 1
            else {f"NATS node {i}": n for i, n in enumerate(nodes, 1)}
        )
        return {"PostgreSQL": self.pg, **nats, "OpenBao": self.bao}

    def issue_identities(self, *, only_due: bool = False) -> list[str]:
        """Issue the demo identities and the simulator's certificate from the stack's CA into
        ``certs/`` (all of them, or with ``only_due`` those two thirds through their lifetime);
        returns the directories written."""
        assert self.bao is not None
        client = self.bao.client()
        written = []
        wanted: list[tuple[Caller, tuple[str, ...]]] = [
            (who, ()) for who in identities.DEMO_IDENTITIES
        ]
        wanted.append((identities.SIMULATOR_IDENTITY, identities.LOOPBACK))
        for who, hosts in wanted:
            directory = self.identity(who)
            if only_due and not identities.due(directory):
                continue
            identities.issue_to(client, who, directory, ttl=self.identity_ttl, hosts=hosts)
            written.append(directory.name)
        return written

    @property
    def db_secrets(self) -> Path:
        """Each service's two database passwords, one 0600 file each."""
        return self.run_dir / "secrets"

    def provision_databases(self) -> None:
        """Per service, a migration role (owns its database) and a runtime role, with new
        passwords at every start, written for the services to read at start-up."""
        assert self.pg is not None
        self.db_secrets.mkdir(mode=0o700, exist_ok=True)
        self.db_secrets.chmod(0o700)
        for service in SERVICES:
            database = self.pg.service_database(service)
            write_private(self.db_secrets / f"{service}-db-password", database.runtime.password)
            write_private(
                self.db_secrets / f"{service}-db-migration-password", database.migration.password
            )

    def _database_env(self, service: str) -> dict[str, str]:
        """A service runs as its runtime role and migrates as its migration role; the URLs
        carry no password (Settings splices each file's in, written by provision_databases)."""
        assert self.pg is not None
        port = self.pg.port
        return {
            "SUBSIDY_DATABASE_URL": sqlalchemy_url(runtime_user(service), None, port, service),
            "SUBSIDY_DATABASE_PASSWORD_FILE": str(self.db_secrets / f"{service}-db-password"),
            "SUBSIDY_MIGRATION_DATABASE_URL": sqlalchemy_url(
                migration_user(service), None, port, service
            ),
            "SUBSIDY_MIGRATION_DATABASE_PASSWORD_FILE": str(
                self.db_secrets / f"{service}-db-migration-password"
            ),
        }

    def _service_env(self, service: str, token_file: Path) -> dict[str, str]:
        assert self.pg and self.nats and self.bao
        env = {
            **self._database_env(service),
            "SUBSIDY_NATS_URL": self.nats.url,
            "SUBSIDY_VAULT_ADDR": self.bao.addr,
            "SUBSIDY_VAULT_TOKEN_FILE": str(token_file),
            # each service issues and renews its own certificate from the stack's CA
            "SUBSIDY_TLS_SOURCE": "vault",
            "SUBSIDY_TLS_SERVER_NAMES": ",".join(identities.LOOPBACK),
            "SUBSIDY_METRICS_LISTEN": f"127.0.0.1:{self.ports.metrics(service)}",
            "SUBSIDY_TRACE_FILE": str(self.traces / f"{service}.jsonl"),
            # The local stack runs the demo campaign, whose claim window is open all day.
            "SUBSIDY_INITIAL_POLICY": str(write_demo_policy(self.run_dir)),
            "SUBSIDY_WORKERS": str(self.workers),
            **self.settings_overrides,
        }
        for peer in topology.peers(service):
            env[topology.addr_variable(peer)] = self.endpoint(topology.serving_process(peer))
        return env

    def migrate(self, token_file: Path) -> None:
        """``python -m services.<service> migrate`` for every service, side by side, before any
        starts (as the chart's migration Jobs run before its pods): each database is upgraded
        to this release's head as its migration role; a service refuses a database behind."""
        self.say("migrating the databases ...")
        running = {}
        for service in SERVICES:
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("SUBSIDY_")},
                "SUBSIDY_GRPC_LISTEN": self.endpoint(service),
                "PYTHONPATH": str(REPO),
                **self._service_env(service, token_file),
            }
            env.pop("SUBSIDY_METRICS_LISTEN", None)  # the service's own, once it serves
            out = (self.logs / f"{service}.log").open("ab")
            running[service] = subprocess.Popen(
                [sys.executable, "-m", f"services.{service}", "migrate"],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            out.close()
        failed = [s for s, proc in running.items() if proc.wait(120) != 0]
        if failed:
            raise StackError(
                "migration failed: " + "; ".join(f"{s}:\n{self.tail(s)}" for s in failed)
            )

    def pid(self, service: str) -> int:
        """The process id of one service (benchmarks read its CPU time)."""
        return self._procs[service].pid

    def kill(self, service: str) -> None:
        """kill -9 one service's process (chaos tests): no drain, no goodbye."""
        proc = self._procs[service]
        proc.kill()
        proc.wait(10)

    def respawn(self, service: str) -> None:
        """Start a killed service again with the environment it had, and wait until serving."""
        self._spawn(service, self._extra[service])
        self._wait_serving(service)

    def stop_services(self) -> None:
        """Stop the four services (they drain), keeping PostgreSQL, NATS, OpenBao and the
        identity simulator running: what ``subsidyctl restore`` quiesces (QUIESCE)."""
        for service in reversed(SERVICES):
            proc = self._procs.pop(service, None)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)

    def reset_event_stream(self) -> None:
        """Delete and recreate the events stream, with its consumers and its duplicate window,
        as a fresh NATS has it: after a restore every store's relay republishes every event,
        which JetStream would drop as duplicates for ``bus.DUPLICATE_WINDOW_S`` after their
        first publication, and the abandoned history's messages must not be replayed to
        anyone (catalog's sales rebuild reads the stream). The dead-letter stream is kept."""
        assert self.nats is not None
        url, operator = self.nats.url, self.nats.operator

        async def reset() -> None:
            nc, js = await bus.connect(url, "stack", operator)
            try:
                with contextlib.suppress(NotFoundError):
                    await js.delete_stream(bus.EVENTS_STREAM)
                await bus.ensure_streams(js, replicas=self.nats_nodes)
            finally:
                await nc.close()

        asyncio.run(reset())

    def start_services(self) -> None:
        """Start the services :meth:`stop_services` stopped, with the environment each had,
        and wait until every one is serving (RESUME)."""
        for service in SERVICES:
            if service not in self._procs:
                self._spawn(service, self._extra[service])
        for service in SERVICES:
            self._wait_serving(service)

    def _spawn(self, service: str, extra: dict[str, str]) -> None:
        self._extra[service] = extra
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SUBSIDY_")},
            "SUBSIDY_GRPC_LISTEN": self.endpoint(service),
            "PYTHONPATH": str(REPO),
            **extra,
        }
        out = (self.logs / f"{service}.log").open("ab")
        self._procs[service] = subprocess.Popen(
            [sys.executable, "-m", f"services.{service}"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()

    @property
    def dashboard_token_file(self) -> Path:
        """The dashboard's login token, new at each start (the URL ``up`` prints carries it)."""
        return self.run_dir / "LOCAL-ONLY-dashboard-token"

    @property
    def dashboard_url(self) -> str:
        """The dashboard's login URL (``dashboard: URL`` in what ``up`` prints)."""
        token = self.dashboard_token_file.read_text().strip()
        return f"http://127.0.0.1:{self.ports.dashboard}/?token={token}"

    def start_dashboard(self, timeout: float = 30.0) -> str:
        """Start the fund-monitoring dashboard beside the services, reading as the demo
        auditor, with a fresh random login token; returns its login URL once it answers."""
        import secrets
        import urllib.error
        import urllib.request

        assert self.nats is not None
        write_private(self.dashboard_token_file, secrets.token_urlsafe(32) + "\n")
        args = [
            *("--listen", f"127.0.0.1:{self.ports.dashboard}"),
            *("--token-file", str(self.dashboard_token_file)),
            *("--base-port", str(self.ports.base)),
            *("--identity", str(self.identity(identities.AUDITOR_DEMO))),
            *("--nats-monitor", self.nats.monitor_url),
        ]
        out = (self.logs / "dashboard.log").open("ab")
        self._procs["dashboard"] = proc = subprocess.Popen(
            [sys.executable, "-m", "subsidyctl", "dashboard", *args],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        health = f"http://127.0.0.1:{self.ports.dashboard}/healthz"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise StackError(
                    f"the dashboard exited with {proc.returncode}:\n{self.tail('dashboard')}"
                )
            with contextlib.suppress(OSError, urllib.error.URLError):
                with opener.open(health, timeout=1) as answer:
                    if answer.status == 200:
                        return self.dashboard_url
            time.sleep(0.1)
        raise StackError(f"the dashboard did not answer in {timeout:.0f} s")

    def probe_credentials(self) -> grpc.ChannelCredentials:
        """The health probes' mutual TLS: the demo operator's certificate (there is no
        plaintext port to probe)."""
        cert = tls.FileCertificates(self.identity(identities.OPERATOR_DEMO)).current()
        return tls.channel_credentials(cert)

    def _wait_serving(self, service: str, timeout: float = 30.0) -> None:
        timeout *= self.workers  # a supervisor and its workers start one after the other
        deadline = time.monotonic() + timeout
        proc = self._procs[service]
        with grpc.secure_channel(self.endpoint(service), self.probe_credentials()) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise StackError(
                        f"{service} exited with {proc.returncode}:\n{self.tail(service)}"
                    )
                with contextlib.suppress(grpc.RpcError):
                    res = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if res.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                time.sleep(0.1)
        raise StackError(f"{service} not serving after {timeout:.0f} s:\n{self.tail(service)}")

    def tail(self, service: str, lines: int = 20) -> str:
        path = self.logs / f"{service}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def dead(self) -> list[str]:
        """Services whose process has exited."""
        return [s for s, p in self._procs.items() if p.poll() is not None]

    # -- stop -------------------------------------------------------------------------------
    def stop(self) -> dict[str, int]:
        """Stop services first (they drain), then the infrastructure; safe to call twice.
        Returns each service's exit code (0 = it shut down gracefully on SIGTERM)."""
        for service in ("dashboard", *reversed(SERVICES), SIMULATOR):
            proc = self._procs.get(service)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for service, proc in list(self._procs.items()):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                self.say(f"{service} did not stop in 15 s; killing it")
                proc.kill()
                proc.wait(5)
        codes = {service: proc.returncode for service, proc in self._procs.items()}
        self._procs.clear()
        if self.supervisor is not None:  # stopping a part on purpose is not a crash
            self.supervisor.stop()
        for part in (self.bao, self.nats, self.pg):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.stop()
        self.release()
        return codes

    def endpoints(self) -> dict[str, str]:
        assert self.pg and self.nats and self.bao
        return {
            **{s: self.endpoint(s) for s in (*SERVICES, SIMULATOR)},
            "postgres": f"127.0.0.1:{self.ports.postgres}",
            "nats": self.nats.url,
            "openbao": self.bao.addr,
            "run_dir": str(self.run_dir),
            "certs": str(self.certs),
        }

    def trace_spans(self, trace_id: str) -> list[dict[str, object]]:
        spans: list[dict[str, object]] = []
        for path in sorted(self.traces.glob("*.jsonl")):
            for line in path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    span = json.loads(line)
                    if span.get("trace_id") == trace_id:
                        spans.append(span)
        return spans


def free_base() -> int:
    """A base port whose whole block is free (smoke, benchmarks and tests run beside make run).

    Chosen below the kernel's ephemeral port range: a port in that range that is free when
    checked can be taken a moment later as the local end of any outgoing connection (the
    stack's own clients open many), and the server that was to listen on it fails to start."""
    import random

    low = _ephemeral_low()
    top = low - 100 if low > 15000 else 60000
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(10000, top, 100)
        if not any(port_in_use(p) for p in Ports(base).all()):
            return base
    raise StackError("no free block of ports for a throwaway stack")


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux; 32768 if it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def store_event_ids(stack: LocalStack) -> dict[str, list[str]]:
    """Every event id in every service's store, read from its database."""
    import psycopg

    assert stack.pg is not None
    ids: dict[str, list[str]] = {}
    for service in SERVICES:
        with psycopg.connect(stack.pg.conninfo(service)) as db:
            ids[service] = [r[0] for r in db.execute("SELECT event_id FROM events")]
    return ids


async def wait_until_audited(stack: LocalStack, client: Any, within: float = 30.0) -> int:
    """Wait until every store's events are in the audit log exactly once (check_audit_complete);
    returns the log's size. ``client`` is a subsidyctl.demo.Client."""
    import asyncio

    from services.invariants import check_audit_complete
    from subsidy.v1 import audit_pb2

    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:  # the audit log catches up asynchronously, through NATS
        stores = store_event_ids(stack)
        info = await client.audit.GetLogInfo(audit_pb2.GetLogInfoRequest())
        entries: list[str] = []
        while len(entries) < info.size:
            page = await client.audit.GetEntries(
                audit_pb2.GetEntriesRequest(start=len(entries), limit=1000)
            )
            entries += [e.envelope.event_id for e in page.entries]
        try:
            check_audit_complete(stores, entries)
            return int(info.size)
        except AssertionError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.1)
