"""Settings come from the environment and fail fast, naming what is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from services.kernel.eventstore import make_engine
from services.kernel.settings import RelaySettings, Settings, SettingsError, SimulatorSettings
from tests.conftest import Infra

BASE = {
    "SUBSIDY_GRPC_LISTEN": "127.0.0.1:0",
    "SUBSIDY_DATABASE_URL": "postgresql+psycopg://svc@db:5432/ledger",
    "SUBSIDY_NATS_URL": "nats://nats:4222",
    "SUBSIDY_VAULT_ADDR": "http://vault:8200",
    "SUBSIDY_VAULT_K8S_ROLE": "subsidy-ledger",
    "SUBSIDY_CATALOG_ADDR": "catalog:50051",
    "SUBSIDY_ELIGIBILITY_ADDR": "eligibility:50051",
    "SUBSIDY_TLS_SOURCE": "files",
    "SUBSIDY_TLS_DIR": "/vault/secrets",
}


def test_a_complete_environment_gives_settings() -> None:
    s = Settings.from_env("ledger", peers=("catalog", "eligibility"), env=BASE)
    assert s.peers == {"catalog": "catalog:50051", "eligibility": "eligibility:50051"}
    assert (s.vault_token, s.vault_k8s_role) == (None, "subsidy-ledger")
    assert s.reservation_timeout_s == 900


@pytest.mark.parametrize(
    "missing",
    [
        "SUBSIDY_GRPC_LISTEN",
        "SUBSIDY_DATABASE_URL",
        "SUBSIDY_NATS_URL",
        "SUBSIDY_VAULT_ADDR",
        "SUBSIDY_CATALOG_ADDR",
        "SUBSIDY_ELIGIBILITY_ADDR",
        "SUBSIDY_TLS_SOURCE",
    ],
)
def test_each_missing_variable_is_named(missing: str) -> None:
    env = {k: v for k, v in BASE.items() if k != missing}
    with pytest.raises(SettingsError, match=missing):
        Settings.from_env("ledger", peers=("catalog", "eligibility"), env=env)


def test_vault_needs_a_token_or_a_kubernetes_role() -> None:
    env = {k: v for k, v in BASE.items() if k != "SUBSIDY_VAULT_K8S_ROLE"}
    with pytest.raises(SettingsError, match="SUBSIDY_VAULT_TOKEN"):
        Settings.from_env("ledger", peers=("catalog", "eligibility"), env=env)


def test_malformed_number_is_named() -> None:
    env = {**BASE, "SUBSIDY_RESERVATION_TIMEOUT_S": "fifteen minutes"}
    with pytest.raises(SettingsError, match="SUBSIDY_RESERVATION_TIMEOUT_S"):
        Settings.from_env("ledger", peers=("catalog", "eligibility"), env=env)


def test_the_database_password_comes_from_a_file_never_the_url(tmp_path: Path) -> None:
    secret = tmp_path / "db-password"
    secret.write_text("s3cret\n")
    env = {**BASE, "SUBSIDY_DATABASE_PASSWORD_FILE": str(secret)}
    s = Settings.from_env("ledger", peers=("catalog", "eligibility"), env=env)
    assert s.database_url == "postgresql+psycopg://svc:s3cret@db:5432/ledger"


def test_a_service_process_refuses_to_start_and_names_the_variable() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUBSIDY_")}
    proc = subprocess.run(
        [sys.executable, "-m", "services.ledger"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "missing required environment variable SUBSIDY_" in proc.stderr


async def test_a_password_with_url_syntax_in_it_is_encoded_and_connects(
    infra: Infra, tmp_path: Path
) -> None:
    """Spliced in raw, ``p@ss/w:rd#1`` moved the host into the password and cut the URL at
    ``#`` (and the parse errors showed part of it)."""
    password = "p@ss/w:rd#1"
    secret = tmp_path / "db-password"
    secret.write_text(password + "\n")
    # A role whose password is exactly that, on a database it may use; the URL has none.
    database = infra.create_service_database("pwd")
    login = infra.pg.create_login("pwd_login", password)
    with psycopg.connect(infra.pg.conninfo(database.name), autocommit=True) as db:
        db.execute(f"GRANT CONNECT ON DATABASE {database.name} TO pwd_login")
    url = database.url(login, with_password=False)
    env = {**BASE, "SUBSIDY_DATABASE_URL": url, "SUBSIDY_DATABASE_PASSWORD_FILE": str(secret)}
    s = Settings.from_env("ledger", peers=("catalog", "eligibility"), env=env)
    assert isinstance(s.database_url, str)
    parsed, expected = make_url(s.database_url), make_url(url)
    assert parsed.password == password
    assert (parsed.username, parsed.host, parsed.port, parsed.database) == (
        expected.username,
        expected.host,
        expected.port,
        expected.database,
    )
    # The local server checks every password (scram-sha-256): connecting proves the spliced
    # password is the role's, and the URL reaches the right database.
    engine = make_engine(s.database_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT current_database()")) == expected.database
    finally:
        await engine.dispose()


def test_a_malformed_database_url_is_named_without_echoing_it(tmp_path: Path) -> None:
    secret = tmp_path / "db-password"
    secret.write_text("s3cret")
    env = {
        **BASE,
        "SUBSIDY_DATABASE_URL": "not a url with hunter2",
        "SUBSIDY_DATABASE_PASSWORD_FILE": str(secret),
    }
    with pytest.raises(SettingsError, match="SUBSIDY_DATABASE_URL") as err:
        Settings.from_env("ledger", peers=("catalog", "eligibility"), env=env)
    assert "hunter2" not in str(err.value)


def test_a_service_requires_the_addresses_of_exactly_the_peers_the_topology_gives_it() -> None:
    """With no peers passed, from_env asks the topology: ledger needs catalog and eligibility."""
    s = Settings.from_env("ledger", env=BASE)
    assert s.peers == {"catalog": "catalog:50051", "eligibility": "eligibility:50051"}
    env = {k: v for k, v in BASE.items() if k != "SUBSIDY_ELIGIBILITY_ADDR"}
    with pytest.raises(SettingsError, match="SUBSIDY_ELIGIBILITY_ADDR"):
        Settings.from_env("ledger", env=env)
    assert Settings.from_env("catalog", env=BASE).peers == {}
    required = {v.name for v in Settings.variables_of("ledger") if v.required}
    assert {"SUBSIDY_CATALOG_ADDR", "SUBSIDY_ELIGIBILITY_ADDR"} <= required
    read = {v.name for v in Settings.variables_of("ledger")}
    assert "SUBSIDY_IDENTITY_AUTHORITY_ADDR" not in read


def test_kubernetes_auth_uses_the_role_even_when_a_token_is_set() -> None:
    env = {**BASE, "SUBSIDY_VAULT_AUTH": "kubernetes", "SUBSIDY_VAULT_TOKEN": "stray"}
    s = Settings.from_env("ledger", env=env)
    assert (s.vault_auth, s.vault_token, s.vault_k8s_role) == ("kubernetes", None, "subsidy-ledger")
    without_role = {k: v for k, v in env.items() if k != "SUBSIDY_VAULT_K8S_ROLE"}
    with pytest.raises(SettingsError, match="SUBSIDY_VAULT_K8S_ROLE"):
        Settings.from_env("ledger", env=without_role)


def test_token_auth_needs_a_token_and_an_unknown_method_is_named() -> None:
    with pytest.raises(SettingsError, match="SUBSIDY_VAULT_TOKEN"):
        Settings.from_env("ledger", env={**BASE, "SUBSIDY_VAULT_AUTH": "token"})
    with pytest.raises(SettingsError, match="SUBSIDY_VAULT_AUTH"):
        Settings.from_env("ledger", env={**BASE, "SUBSIDY_VAULT_AUTH": "ldap"})


def test_tracing_settings_come_from_the_standard_otel_variables() -> None:
    env = {**BASE, "OTEL_TRACES_EXPORTER": "otlp", "OTEL_SERVICE_NAME": "ledger-eu"}
    s = Settings.from_env("ledger", env=env)
    assert (s.otel_traces_exporter, s.otel_service_name) == ("otlp", "ledger-eu")
    assert Settings.from_env("ledger", env=BASE).otel_traces_exporter == "none"


def test_the_simulator_reads_its_settings_and_fails_fast() -> None:
    tls = {"SUBSIDY_TLS_SOURCE": "files", "SUBSIDY_TLS_DIR": "/certs"}
    s = SimulatorSettings.from_env({"SUBSIDY_GRPC_LISTEN": "0.0.0.0:50051", **tls})
    assert (s.grpc_listen, s.log_level, s.tls_dir) == ("0.0.0.0:50051", "INFO", Path("/certs"))
    with pytest.raises(SettingsError, match="SUBSIDY_GRPC_LISTEN"):
        SimulatorSettings.from_env(tls)
    with pytest.raises(SettingsError, match="SUBSIDY_TLS_SOURCE"):
        SimulatorSettings.from_env({"SUBSIDY_GRPC_LISTEN": "0.0.0.0:50051"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUBSIDY_")}
    proc = subprocess.run(
        [sys.executable, "-m", "services.identity_sim"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "missing required environment variable SUBSIDY_GRPC_LISTEN" in proc.stderr


def test_the_relay_reads_its_store_and_bus_from_settings(tmp_path: Path) -> None:
    secret = tmp_path / "db-password"
    secret.write_text("s3cret\n")
    env = {
        "SUBSIDY_DATABASE_URL": BASE["SUBSIDY_DATABASE_URL"],
        "SUBSIDY_DATABASE_PASSWORD_FILE": str(secret),
        "SUBSIDY_NATS_URL": "nats://nats:4222",
    }
    s = RelaySettings.from_env(env)
    assert s.database_url == "postgresql+psycopg://svc:s3cret@db:5432/ledger"
    assert s.nats_url == "nats://nats:4222"
    for missing in ("SUBSIDY_DATABASE_URL", "SUBSIDY_NATS_URL"):
        with pytest.raises(SettingsError, match=missing):
            RelaySettings.from_env({k: v for k, v in env.items() if k != missing})
    bare = {k: v for k, v in os.environ.items() if not k.startswith("SUBSIDY_")}
    proc = subprocess.run(
        [sys.executable, "-m", "services.kernel.bus"],
        env=bare,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "missing required environment variable SUBSIDY_" in proc.stderr


def test_no_process_reads_the_environment_outside_settings() -> None:
    """Settings is the one reader: no other module of a process calls os.environ/getenv."""
    root = Path(__file__).resolve().parents[2] / "services"
    readers = [
        str(path.relative_to(root.parent))
        for path in sorted(root.rglob("*.py"))
        if path.name != "settings.py"
        and any(word in path.read_text() for word in ("os.environ", "os.getenv", "getenv("))
    ]
    assert readers == []
