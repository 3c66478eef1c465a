"""FileCertificates: what Vault Agent or cert-manager writes is picked up, at most once a second,
and a half-written pair (a key that is not the certificate's) is never served."""

from __future__ import annotations

import os
import time
from pathlib import Path

from services.kernel import tls
from tests.support.foreign_ca import foreign_certificate


def write(directory: Path, cert: tls.Certificate, *, key: bytes | None = None) -> None:
    (directory / tls.CERT_FILE).write_bytes(cert.chain_pem)
    (directory / tls.KEY_FILE).write_bytes(key if key is not None else cert.key_pem)
    (directory / tls.CA_FILE).write_bytes(cert.ca_pem)
    later = time.time() + 5  # an mtime the next look sees as new, however fast the test runs
    for name in (tls.CERT_FILE, tls.KEY_FILE, tls.CA_FILE):
        os.utime(directory / name, (later, later))


def test_a_renewed_pair_is_served_and_a_mismatched_one_is_not(tmp_path: Path) -> None:
    first = foreign_certificate("spiffe://subsidy.local/service/ledger")
    write(tmp_path, first)
    source = tls.FileCertificates(tmp_path)
    assert source.current() == first
    second = foreign_certificate("spiffe://subsidy.local/service/ledger")
    write(tmp_path, second)
    assert source.current() == first  # not looked at again within LOOK_EVERY_S
    source.LOOK_EVERY_S = 0.0
    assert source.current() == second
    third = foreign_certificate("spiffe://subsidy.local/service/ledger")
    write(tmp_path, third, key=second.key_pem)  # the agent has written the certificate only
    assert source.current() == second
    write(tmp_path, third)
    assert source.current() == third
