"""Identities on disk: a directory with ``tls.crt``, ``tls.key`` (0600) and ``ca.crt``, the
layout Vault Agent and cert-manager write and services.kernel.tls.FileCertificates reads.

The local stack issues one per demo user into ``run/certs/<role>-<name>/`` at each start
(``platform-demo``, ``platform-other``, ``operator-demo``, ``approver-checker``, ``auditor-demo``)
and one for the identity simulator (``service-identity-sim``), renewing each once two thirds
of its lifetime have passed; ``subsidyctl certs issue`` writes another anywhere.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

import hvac

from services.kernel import pki, tls, topology
from services.kernel.identity import Caller, Role, service_caller

DEMO_TTL: Final = "24h"
PLATFORM_DEMO: Final = Caller(Role.PLATFORM, "demo")
PLATFORM_OTHER: Final = Caller(Role.PLATFORM, "other")
OPERATOR_DEMO: Final = Caller(Role.OPERATOR, "demo")
# Maker-checker compares people by name: the demo approver is another person than the demo
# operator, or the demo could never approve its own campaign's drafts and fundings.
APPROVER_DEMO: Final = Caller(Role.APPROVER, "checker")
AUDITOR_DEMO: Final = Caller(Role.AUDITOR, "demo")
DEMO_IDENTITIES: Final = (PLATFORM_DEMO, PLATFORM_OTHER, OPERATOR_DEMO, APPROVER_DEMO, AUDITOR_DEMO)
SIMULATOR_IDENTITY: Final = service_caller(topology.IDENTITY_SIMULATOR)
LOOPBACK: Final = ("localhost", "127.0.0.1")


def dir_name(who: Caller) -> str:
    """``<role>-<name>`` (``_`` written ``-``): ``operator-demo``, ``service-identity-sim``."""
    return f"{who.role}-{who.name}".replace("_", "-")


def identity_dir(certs: Path, who: Caller) -> Path:
    return certs / dir_name(who)


def split_hosts(hosts: Iterable[str]) -> tuple[list[str], list[str]]:
    """DNS names and IP addresses, apart (Vault takes them as two parameters)."""
    import ipaddress

    dns, ips = [], []
    for host in hosts:
        try:
            ipaddress.ip_address(host)
            ips.append(host)
        except ValueError:
            dns.append(host)
    return dns, ips


def write_identity(directory: Path, cert: tls.Certificate) -> None:
    """Write the three files so a reader never sees a half-written one: each goes to a
    temporary file in the same directory first (the key created 0600) and is renamed over."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    for name, content, mode in (
        (tls.KEY_FILE, cert.key_pem, 0o600),
        (tls.CERT_FILE, cert.chain_pem, 0o644),
        (tls.CA_FILE, cert.ca_pem, 0o644),
    ):
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as out:
                out.write(content)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, directory / name)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def issue_to(
    client: hvac.Client,
    who: Caller,
    directory: Path,
    *,
    ttl: str = DEMO_TTL,
    hosts: Sequence[str] = (),
) -> tls.Certificate:
    """Issue ``who`` a certificate from the CA and write it into ``directory``."""
    dns, ips = split_hosts(hosts)
    cert = pki.issue(client, who, ttl=ttl, dns_names=dns, ip_sans=ips)
    write_identity(directory, cert)
    return cert


def due(directory: Path, *, now: dt.datetime | None = None) -> bool:
    """Whether the identity in ``directory`` is missing, unreadable or two thirds through its
    lifetime (the renewal point services.kernel.tls uses)."""
    try:
        cert = tls.FileCertificates(directory).current()
    except tls.TlsError:
        return True
    return (now or dt.datetime.now(dt.UTC)) >= cert.renew_at()
