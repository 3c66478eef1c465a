"""The real parts of the stack, started for real: PostgreSQL, NATS JetStream, OpenBao."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import stat
import urllib.request
from pathlib import Path
from typing import Any

import hvac
import psycopg
import pytest

from services.kernel import pki
from services.kernel.identity import Role
from services.kernel.vault import KEK_KEY, TRANSIT_KEYS
from subsidyctl.stack import (
    SERVICE_DATABASES,
    UNSEAL_WARNING,
    Nats,
    OpenBao,
    Postgres,
    StackError,
    free_port,
    port_in_use,
)


def _get_json(url: str) -> Any:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as response:
        return json.loads(response.read())


def test_postgres_starts_with_one_database_per_service(tmp_path: Path) -> None:
    pg = Postgres(
        data_dir=tmp_path / "pg", port=free_port(), log_dir=tmp_path / "log", durable=False
    )
    pg.start()
    try:
        assert port_in_use(pg.port)
        with psycopg.connect(pg.conninfo("catalog")) as db:
            assert db.execute("SELECT 1").fetchone() == (1,)
            names = {row[0] for row in db.execute("SELECT datname FROM pg_database")}
            assert set(SERVICE_DATABASES) <= names
            assert db.execute("SHOW fsync").fetchone() == ("off",)
            assert db.execute("SHOW max_connections").fetchone() == ("200",)
            assert db.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
        # As the superuser, whose password (generated at initdb) is in a 0600 file.
        password = pg.superuser_password
        assert pg.url("ledger") == (
            f"postgresql+psycopg://postgres:{password}@127.0.0.1:{pg.port}/ledger"
        )
        pg.create_databases(["catalog", "extra"])  # idempotent for the ones that exist
        with psycopg.connect(pg.conninfo("extra")) as db:
            assert db.execute("SELECT current_database()").fetchone() == ("extra",)
    finally:
        pg.stop()
    assert not port_in_use(pg.port)
    pg.stop()  # a second stop is harmless
    assert (tmp_path / "log" / "postgres.log").stat().st_size > 0


def test_postgres_durable_data_survives_restart(tmp_path: Path) -> None:
    port = free_port()
    pg = Postgres(data_dir=tmp_path / "pg", port=port, log_dir=tmp_path / "log")
    with pg:
        with psycopg.connect(pg.conninfo("ledger")) as db:
            assert db.execute("SHOW fsync").fetchone() == ("on",)
            db.execute("CREATE TABLE kept (n int)")
            db.execute("INSERT INTO kept VALUES (42)")
    assert not port_in_use(port)

    again = Postgres(data_dir=tmp_path / "pg", port=port, log_dir=tmp_path / "log")
    again.start()
    # A fresh object (as `subsidyctl down` would make) stops the running server too.
    Postgres(data_dir=tmp_path / "pg", port=port, log_dir=tmp_path / "log").stop()
    assert not port_in_use(port)
    with again:  # restart once more through the first object's own handle
        with psycopg.connect(again.conninfo("ledger")) as db:
            assert db.execute("SELECT n FROM kept").fetchall() == [(42,)]


def test_nats_runs_jetstream_in_its_own_process_group(tmp_path: Path) -> None:
    nats = Nats(
        store_dir=tmp_path / "nats",
        port=free_port(),
        monitor_port=free_port(),
        log_dir=tmp_path / "log",
    )
    nats.start()
    try:
        assert nats.url == f"nats://127.0.0.1:{nats.port}"
        assert _get_json(f"{nats.monitor_url}/healthz") == {"status": "ok"}
        jsz = _get_json(f"{nats.monitor_url}/jsz")
        assert Path(jsz["config"]["store_dir"]).is_relative_to(tmp_path / "nats")
        with socket.create_connection(("127.0.0.1", nats.port), timeout=5) as client:
            assert client.recv(4096).startswith(b"INFO ")
        pid = int(nats.pid_file.read_text())
        assert os.getpgid(pid) == pid != os.getpgrp()
    finally:
        # A fresh object finds the server through its pid file.
        Nats(
            store_dir=nats.store_dir,
            port=nats.port,
            monitor_port=nats.monitor_port,
            log_dir=tmp_path,
        ).stop()
    assert not port_in_use(nats.port) and not port_in_use(nats.monitor_port)
    nats.stop()
    nats.stop()


def test_port_in_use_while_a_server_listens() -> None:
    port = free_port()
    assert not port_in_use(port)
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))
        server.listen()
        assert port_in_use(port)
        with pytest.raises(StackError, match=f"127.0.0.1:{port} is already in use"):
            Nats(
                store_dir=Path("/nonexistent"), port=port, monitor_port=0, log_dir=Path("/tmp")
            ).start()
    assert not port_in_use(port)
    assert not port_in_use(free_port(2) + 1)


def test_a_failed_start_names_the_port_and_shows_the_log(tmp_path: Path) -> None:
    port = free_port()
    clash = Nats(store_dir=tmp_path / "nats", port=port, monitor_port=port, log_dir=tmp_path)
    with pytest.raises(StackError, match=f"NATS on 127.0.0.1:{port}.*exited with code") as nats:
        clash.start()
    assert "address already in use" in str(nats.value)  # the tail of nats-server's own log
    bad_pg = Postgres(data_dir=tmp_path / "pg", port=free_port(), log_dir=tmp_path / "log")
    (tmp_path / "pg").mkdir()
    (tmp_path / "pg" / "stray").write_text("")
    with pytest.raises(StackError, match="neither empty nor a PostgreSQL data directory"):
        bad_pg.start()
    # The server itself refuses (bad setting): the error carries its log.
    broken = Postgres(
        data_dir=tmp_path / "pg2",
        port=free_port(),
        log_dir=tmp_path / "log",
        durable=False,
        max_connections=-5,
    )
    with pytest.raises(StackError) as failure:
        broken.start()
    message = str(failure.value)
    assert f"127.0.0.1:{broken.port}" in message and "exited with code" in message
    assert "max_connections" in message
    assert not port_in_use(broken.port)


def test_openbao_dev_has_the_transit_keys_and_the_ca(tmp_path: Path) -> None:
    bao = OpenBao(data_dir=tmp_path / "bao", port=free_port(2), log_dir=tmp_path / "log", dev=True)
    with bao:
        client = hvac.Client(url=bao.addr, token=bao.token, timeout=5)
        assert client.is_authenticated()
        for name, key_type in TRANSIT_KEYS.items():
            assert client.secrets.transit.read_key(name=name)["data"]["type"] == key_type
        roles = client.secrets.pki.list_roles(mount_point=pki.ISSUING_MOUNT)["data"]["keys"]
        assert sorted(roles) == sorted(r.value for r in Role)
        assert bao.ca_pem.count(b"BEGIN CERTIFICATE") == 2  # intermediate + root
        assert not (tmp_path / "bao" / ".vault-token").exists()
        banner = (tmp_path / "log" / "openbao.log").read_text()
        assert bao.token not in banner
        for printed in re.findall(r"Root Token: (\S+)", banner):  # dev mode prints one
            assert not hvac.Client(url=bao.addr, token=printed, timeout=5).is_authenticated()
    assert not port_in_use(bao.port)
    bao.stop()


def test_openbao_raft_keeps_its_keys_across_restarts(tmp_path: Path) -> None:
    data_dir, port, log_dir = tmp_path / "bao", free_port(2), tmp_path / "log"
    plaintext = base64.b64encode(b"a secret that must outlive a restart").decode()
    first = OpenBao(data_dir=data_dir, port=port, log_dir=log_dir, dev=False)
    with first:
        client = hvac.Client(url=first.addr, token=first.token, timeout=5)
        encrypted = client.secrets.transit.encrypt_data(name=KEK_KEY, plaintext=plaintext)
        ciphertext = encrypted["data"]["ciphertext"]
        first_ca = first.ca_pem

    unseal_file = data_dir / "LOCAL-ONLY-unseal.json"
    assert stat.S_IMODE(unseal_file.stat().st_mode) == 0o600
    saved = json.loads(unseal_file.read_text())
    assert saved["warning"] == UNSEAL_WARNING
    assert saved["root_token"] == first.token

    second = OpenBao(data_dir=data_dir, port=port, log_dir=log_dir, dev=False)
    with second:  # unsealed from the file; same token, same keys, same CA
        assert second.token == first.token
        assert second.ca_pem == first_ca
        client = hvac.Client(url=second.addr, token=second.token, timeout=5)
        decrypted = client.secrets.transit.decrypt_data(name=KEK_KEY, ciphertext=ciphertext)
        assert decrypted["data"]["plaintext"] == plaintext
    assert not port_in_use(port)


def test_openbao_raft_never_initialises_over_an_unseal_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "bao"
    data_dir.mkdir()
    (data_dir / "LOCAL-ONLY-unseal.json").write_text('{"keep": "me"}')
    bao = OpenBao(data_dir=data_dir, port=free_port(2), log_dir=tmp_path / "log", dev=False)
    with pytest.raises(StackError, match="refusing to initialise"):
        bao.start()
    assert json.loads((data_dir / "LOCAL-ONLY-unseal.json").read_text()) == {"keep": "me"}
    assert not port_in_use(bao.port)
