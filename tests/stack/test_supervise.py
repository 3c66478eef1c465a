"""The local stack's supervisor: a killed part is reaped and started again, on the same data."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from services.kernel.vault import KEK_KEY
from subsidyctl.stack import Nats, OpenBao, Postgres, free_port
from subsidyctl.stack.supervise import Supervisor


def wait_for_line(lines: list[str], text: str, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not any(text in line for line in lines):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} in {lines}")
        time.sleep(0.1)


def test_a_killed_postmaster_is_reaped_and_restarted_on_its_data(tmp_path: Path) -> None:
    pg = Postgres(
        data_dir=tmp_path / "pg", port=free_port(), log_dir=tmp_path / "logs", durable=False
    )
    pg.start()
    lines: list[str] = []
    supervisor = Supervisor({"PostgreSQL": pg}, lines.append, interval_s=0.1)
    supervisor.start()
    try:
        with psycopg.connect(pg.conninfo("postgres"), autocommit=True) as db:
            # Tests run PostgreSQL with asynchronous commit; this commit must be on disk.
            db.execute("SET synchronous_commit = on")
            db.execute("CREATE TABLE kept (n int)")
            db.execute("INSERT INTO kept VALUES (15)")
        killed = pg.pid
        assert killed is not None
        os.kill(killed, signal.SIGKILL)
        wait_for_line(lines, "PostgreSQL restarted")
        assert lines[0] == "PostgreSQL exited (code -9); restarting it"
        assert not Path(f"/proc/{killed}").exists()  # reaped, not a zombie
        assert pg.pid is not None and pg.pid != killed and supervisor.restarts["PostgreSQL"] == 1
        with psycopg.connect(pg.conninfo("postgres"), autocommit=True) as db:
            assert db.execute("SELECT n FROM kept").fetchall() == [(15,)]
        # Stopped on purpose, it stays stopped.
        pg.stop()
        time.sleep(0.5)
        assert supervisor.check() == [] and pg.pid is None
    finally:
        supervisor.stop()
        pg.stop()


def test_a_killed_nats_server_is_restarted(tmp_path: Path) -> None:
    nats = Nats(
        store_dir=tmp_path / "nats",
        port=free_port(),
        monitor_port=free_port(),
        log_dir=tmp_path / "logs",
    )
    nats.start()
    lines: list[str] = []
    supervisor = Supervisor({"NATS": nats}, lines.append, interval_s=0.1)
    supervisor.start()
    try:
        killed = nats.pid
        assert killed is not None
        os.kill(killed, signal.SIGKILL)
        wait_for_line(lines, "NATS restarted")
        assert not Path(f"/proc/{killed}").exists()
        assert nats.is_running()
    finally:
        supervisor.stop()
        nats.stop()


@pytest.mark.parametrize("alive", [True, False])
def test_postmaster_pid_is_removed_only_when_its_process_is_gone(
    tmp_path: Path, alive: bool
) -> None:
    pg = Postgres(
        data_dir=tmp_path / "pg", port=free_port(), log_dir=tmp_path / "logs", durable=False
    )
    pg.start()
    pg.stop()
    if alive:
        pid = os.getpid()  # a process that runs (this one)
    else:
        gone = subprocess.Popen(["true"])
        gone.wait()  # exited and reaped: the pid names no process
        pid = gone.pid
    lock = pg.data_dir / "postmaster.pid"
    lock.write_text(f"{pid}\n{pg.data_dir}\n0\n{pg.port}\n\n127.0.0.1\n  0  0\nready\n")
    pg._remove_stale_lock()
    assert lock.exists() == alive


def test_a_killed_openbao_is_restarted_unsealed_with_its_keys(tmp_path: Path) -> None:
    """The stack's OpenBao keeps its data (raft): restarted, it is unsealed again and still
    has the transit keys (a key it lost would make every sealed field unreadable)."""
    bao = OpenBao(
        data_dir=tmp_path / "bao", port=free_port(2), log_dir=tmp_path / "logs", dev=False
    )
    bao.start()
    lines: list[str] = []
    supervisor = Supervisor({"OpenBao": bao}, lines.append, interval_s=0.1)
    supervisor.start()
    try:
        client = bao.client()
        before = client.secrets.transit.read_key(name=KEK_KEY)["data"]["keys"]
        killed = bao.pid
        assert killed is not None
        os.kill(killed, signal.SIGKILL)
        wait_for_line(lines, "OpenBao restarted")
        assert not Path(f"/proc/{killed}").exists()
        after = bao.client().secrets.transit.read_key(name=KEK_KEY)["data"]["keys"]
        assert after == before
    finally:
        supervisor.stop()
        bao.stop()
