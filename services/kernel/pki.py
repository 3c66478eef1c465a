"""The campaign's certificate authority, in Vault's PKI secrets engine (OpenBao has it).

Two mounts: ``pki`` holds the root (long-lived, used only to sign the intermediate) and
``pki_int`` the intermediate that issues every certificate. One PKI role per identity role
(``platform``, ``operator``, ``approver``, ``auditor``, ``service``) allows only URI SANs of
that role's SPIFFE ids, so a credential allowed to issue platform certificates cannot mint an
operator. Certificates are short-lived; a process renews its own (services.kernel.tls).

:func:`ensure_pki` sets it all up, idempotently (the local stack at start; an operator once per
cluster, see docs/security.md). :func:`issue` asks for one certificate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import hvac

from .identity import TRUST_DOMAIN, Caller, Role
from .tls import Certificate

ROOT_MOUNT: Final = "pki"
ISSUING_MOUNT: Final = "pki_int"
ROOT_TTL: Final = "87600h"  # ten years: the root signs only the intermediate
ISSUING_TTL: Final = "43800h"
MAX_CERT_TTL: Final = "720h"
# How far before its issue a certificate is valid (clock skew between hosts). Vault's default
# is 30 s, which for a short-lived certificate moves the renewal point (two thirds into the
# lifetime counted from notBefore, services.kernel.tls) before the moment of issue: a 10 s
# certificate would be renewed at every check. 5 s keeps any lifetime above ~8 s renewable.
BACKDATE: Final = "5s"


class PkiError(RuntimeError):
    """Vault refused to set up the CA or to issue a certificate."""


def _mounts(client: hvac.Client) -> dict[str, Any]:
    mounts = client.sys.list_mounted_secrets_engines()
    data: dict[str, Any] = mounts.get("data", mounts)
    return data


def ensure_pki(client: hvac.Client, *, max_cert_ttl: str = MAX_CERT_TTL) -> bytes:
    """Create the root, the intermediate and one role per identity role, unless they exist;
    returns the CA bundle (intermediate + root, PEM) that verifies every certificate."""
    mounts = _mounts(client)
    if f"{ROOT_MOUNT}/" not in mounts:
        client.sys.enable_secrets_engine("pki", path=ROOT_MOUNT, config={"max_lease_ttl": ROOT_TTL})
    if f"{ISSUING_MOUNT}/" not in mounts:
        client.sys.enable_secrets_engine(
            "pki", path=ISSUING_MOUNT, config={"max_lease_ttl": ISSUING_TTL}
        )
    root = _read_ca(client, ROOT_MOUNT)
    if not root:
        root = client.secrets.pki.generate_root(
            "internal",
            "Subsidy campaign root CA",
            extra_params={"ttl": ROOT_TTL, "key_type": "ec", "key_bits": 256},
            mount_point=ROOT_MOUNT,
        )["data"]["certificate"]
    issuing = _read_ca(client, ISSUING_MOUNT)
    if not issuing:
        csr = client.secrets.pki.generate_intermediate(
            "internal",
            "Subsidy campaign issuing CA",
            extra_params={"key_type": "ec", "key_bits": 256},
            mount_point=ISSUING_MOUNT,
        )["data"]["csr"]
        signed = client.secrets.pki.sign_intermediate(
            csr,
            "Subsidy campaign issuing CA",
            extra_params={"ttl": ISSUING_TTL, "format": "pem_bundle"},
            mount_point=ROOT_MOUNT,
        )["data"]["certificate"]
        client.secrets.pki.set_signed_intermediate(signed, mount_point=ISSUING_MOUNT)
        issuing = _read_ca(client, ISSUING_MOUNT)
    for role in Role:
        client.secrets.pki.create_or_update_role(
            role.value,
            extra_params={
                "allowed_uri_sans": f"spiffe://{TRUST_DOMAIN}/{role.value}/*",
                "allowed_uri_sans_template": False,
                "allow_any_name": True,  # the common name is informative; the URI SAN decides
                "enforce_hostnames": False,
                "allow_ip_sans": True,
                "server_flag": role is Role.SERVICE,
                "client_flag": True,
                "key_type": "ec",
                "key_bits": 256,
                "max_ttl": max_cert_ttl,
                "not_before_duration": BACKDATE,
                "no_store": False,  # stored, so a certificate can be revoked by serial
            },
            mount_point=ISSUING_MOUNT,
        )
    return ca_bundle(issuing, root)


def _read_ca(client: hvac.Client, mount: str) -> str:
    try:
        pem = client.secrets.pki.read_ca_certificate(mount_point=mount)
    except hvac.exceptions.VaultError:
        return ""
    return str(pem or "").strip()


def ca_bundle(*pems: str) -> bytes:
    return "".join(p.strip() + "\n" for p in pems if p.strip()).encode()


def serial_of(cert: Certificate) -> str:
    """The certificate's serial as Vault names it (``pki_int/revoke serial_number=...``)."""
    raw = cert.leaf.serial_number
    return ":".join(f"{b:02x}" for b in raw.to_bytes((raw.bit_length() + 7) // 8 or 1, "big"))


def revoke(client: hvac.Client, serial: str) -> None:
    """Revoke one certificate; peers refuse it once they see the new CRL (keep lifetimes short:
    gRPC does not fetch CRLs, so in practice a revoked certificate lives until it expires)."""
    try:
        client.write(f"{ISSUING_MOUNT}/revoke", serial_number=serial)
    except hvac.exceptions.VaultError as exc:
        raise PkiError(f"Vault refused to revoke {serial}: {type(exc).__name__}") from None


def issue(
    client: hvac.Client,
    who: Caller,
    *,
    ttl: str = "1h",
    dns_names: Sequence[str] = (),
    ip_sans: Sequence[str] = (),
) -> Certificate:
    """A fresh certificate for ``who`` (its SPIFFE id as the URI SAN), with the CA bundle."""
    params: dict[str, Any] = {
        "uri_sans": who.spiffe_id,
        "ttl": ttl,
        "format": "pem",
        "exclude_cn_from_sans": True,  # the SANs are exactly what was asked for
    }
    if dns_names:
        params["alt_names"] = ",".join(dns_names)
    if ip_sans:
        params["ip_sans"] = ",".join(ip_sans)
    try:
        data = client.secrets.pki.generate_certificate(
            who.role.value, f"{who.role}-{who.name}", extra_params=params, mount_point=ISSUING_MOUNT
        )["data"]
        root = _read_ca(client, ROOT_MOUNT)
    except hvac.exceptions.VaultError as exc:
        raise PkiError(f"Vault refused a {who.role} certificate: {type(exc).__name__}") from None
    chain = [data["certificate"], *(c for c in data.get("ca_chain") or () if c.strip() != root)]
    return Certificate(
        chain_pem=ca_bundle(*chain),
        key_pem=str(data["private_key"]).encode(),
        ca_pem=ca_bundle(data["issuing_ca"], root),
    )
