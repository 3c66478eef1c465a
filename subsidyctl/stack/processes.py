"""What every part of the local stack shares: ports, child processes, pid files, HTTP probes.

Each part (PostgreSQL, NATS, OpenBao) is a :class:`_Server` that runs one :class:`_Child`: a
real server process in its own session, its output appended to a log file, stopped with a
polite signal first and killed only after a timeout. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

HOST = "127.0.0.1"
START_TIMEOUT = 15.0
_POLL = 0.02
_LOG_TAIL_LINES = 25


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


def as_system_user(
    argv: list[str], user: pwd.struct_passwd | None
) -> tuple[list[str], dict[str, Any]]:
    """The command and the Popen keywords that run ``argv`` as ``user`` (None: as we are).

    Through ``setpriv`` where it exists: Popen's own ``user=``/``group=`` make CPython fork
    instead of vfork, and forking a process with gRPC's threads running can crash the child
    before it execs (seen: PostgreSQL "exited with code -11 at start" beside a test's channels).
    """
    if user is None:
        return argv, {}
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        ids = [f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
        return [setpriv, *ids, "--", *argv], {}
    return argv, {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def require_free(what: str, *ports: int) -> None:
    """Raise StackError naming the first of ``ports`` something already listens on."""
    for port in ports:
        if port_in_use(port):
            raise StackError(f"{what} cannot start: {HOST}:{port} is already in use")


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
        command, as_user = as_system_user([str(a) for a in argv], user)
        try:
            self.proc = subprocess.Popen(
                command,
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
    start_timeout: float

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def is_running(self) -> bool:
        """True while the server this object started is alive (watch it from ``up``)."""
        return self._child is not None and self._child.running()

    def exit_code(self) -> int | None:
        """The exit code of the server this object started if it has exited (negative: the
        signal that killed it), else None. Asking reaps it, so it never lingers as a zombie
        (whose pid still looks alive to the next start). The supervisor asks."""
        if self._child is None or self._child.running():
            return None
        return self._child.proc.returncode

    @property
    def pid(self) -> int | None:
        """The process id of the server this object started (None when it has none)."""
        return self._child.pid if self._child is not None else None

    def _already_running(self) -> bool:
        """True if our server runs; forgets (and closes the log of) one that died."""
        if self._child is None:
            return False
        if self._child.running():
            return True
        self._child.close()
        self._child = None
        return False

    def _stop_server(self, first_signal: int, program: str, pid_file: Path) -> None:
        """Stop the server this object started; else one of ``program`` that an earlier
        process left running with its pid in ``pid_file``."""
        child, self._child = self._child, None
        if child is not None:
            child.stop(first_signal, self.start_timeout)
            return
        pid = _read_pid(pid_file)
        if pid is not None and _pid_runs(pid, program):
            _shutdown(pid, first_signal, self.start_timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
