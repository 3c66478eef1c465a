"""The local stack points each service at exactly the peers the topology gives it.

No server is started: the environment is computed from the parts' addresses alone.
"""

from __future__ import annotations

import re
from pathlib import Path

from services.kernel import topology
from subsidyctl.localstack import SERVICES, LocalStack, Ports
from subsidyctl.stack import Nats, OpenBao, Postgres


def unstarted_stack(tmp_path: Path, base: int) -> LocalStack:
    ports = Ports(base)
    stack = LocalStack(tmp_path, ports)
    stack.pg = Postgres(data_dir=tmp_path / "pg", port=ports.postgres, log_dir=tmp_path)
    stack.nats = Nats(
        store_dir=tmp_path / "nats",
        port=ports.nats,
        monitor_port=ports.nats_monitor,
        log_dir=tmp_path,
    )
    stack.bao = OpenBao(data_dir=tmp_path / "bao", port=ports.bao, log_dir=tmp_path, dev=False)
    return stack


def test_each_service_gets_the_addresses_of_exactly_its_peers(tmp_path: Path) -> None:
    stack = unstarted_stack(tmp_path, 7100)
    assert SERVICES == topology.SERVICE_NAMES
    for service in SERVICES:
        env = stack._service_env(service, tmp_path / "token")
        peers = {k: v for k, v in env.items() if re.fullmatch(r"SUBSIDY_\w+_ADDR", k)}
        peers.pop("SUBSIDY_VAULT_ADDR")
        expected = {}
        for peer in topology.peers(service):
            port = topology.local_port(topology.serving_process(peer), 7100)
            expected[topology.addr_variable(peer)] = f"127.0.0.1:{port}"
        assert peers == expected, service
    assert stack._service_env("ledger", tmp_path / "t")["SUBSIDY_CATALOG_ADDR"] == "127.0.0.1:7101"


def test_each_service_issues_its_own_certificate_for_the_loopback_names(tmp_path: Path) -> None:
    stack = unstarted_stack(tmp_path, 7100)
    for service in SERVICES:
        env = stack._service_env(service, tmp_path / "token")
        assert env["SUBSIDY_TLS_SOURCE"] == "vault"
        assert env["SUBSIDY_TLS_SERVER_NAMES"] == "localhost,127.0.0.1"
        assert env["SUBSIDY_VAULT_TOKEN_FILE"] == str(tmp_path / "token")
        assert "SUBSIDY_TLS_DIR" not in env


def test_ports_follow_the_topology_offsets_and_never_collide() -> None:
    ports = Ports(20000)
    assert ports.services == {
        "catalog": 20001,
        "eligibility": 20002,
        "ledger": 20003,
        "audit": 20004,
        "identity_sim": 20005,
    }
    assert [ports.metrics(s) for s in SERVICES] == [20011, 20012, 20013, 20014]
    assert len(set(ports.all())) == len(ports.all())
