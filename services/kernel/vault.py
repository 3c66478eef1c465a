"""Vault (or OpenBao, which speaks the same API) for the keys the services need.

Three transit keys:
- ``subsidy-pii-kek``: the key-encryption key that wraps each person's own data key. Personal
  data is encrypted locally (AES-256-GCM) under that per-person key; destroying the wrapped key
  crypto-shreds the person while the event log's hashes stay verifiable.
- ``subsidy-blind-index``: the HMAC key for blind indexes (look a person up without storing the
  number).
- ``subsidy-tree-head``: the Ed25519 key that signs the audit log's tree heads.

hvac is synchronous; async callers go through :func:`asyncio.to_thread` so one slow Vault call
never blocks the event loop. Unwrapped data keys are cached briefly in memory, never logged.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import pki, tls
from .identity import Caller

KEK_KEY = "subsidy-pii-kek"
BLIND_INDEX_KEY = "subsidy-blind-index"
TREE_HEAD_KEY = "subsidy-tree-head"
TRANSIT_KEYS: dict[str, str] = {
    KEK_KEY: "aes256-gcm96",
    BLIND_INDEX_KEY: "aes256-gcm96",
    TREE_HEAD_KEY: "ed25519",
}
K8S_TOKEN_PATH = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


class VaultUnavailable(RuntimeError):
    """Vault could not be reached or refused a call; nothing was changed."""


def connect(
    addr: str,
    *,
    token: str | None = None,
    k8s_role: str | None = None,
    transit_mount: str = "transit",
) -> Vault:
    """Log in with a token (local stack) or Kubernetes auth (in the cluster)."""
    client = hvac.Client(url=addr, timeout=5)
    if token:
        client.token = token
    elif k8s_role:
        _k8s_login(client, k8s_role)
    else:
        raise VaultUnavailable("neither a Vault token nor a Kubernetes auth role is configured")
    return Vault(client, transit_mount, k8s_role=k8s_role)


def _k8s_login(client: hvac.Client, role: str) -> None:
    jwt = K8S_TOKEN_PATH.read_text().strip()
    client.auth.kubernetes.login(role=role, jwt=jwt)


def ensure_transit_keys(addr: str, token: str, transit_mount: str = "transit") -> None:
    """Mount transit (if needed) and create the services' keys; idempotent."""
    client = hvac.Client(url=addr, token=token, timeout=10)
    mounts = client.sys.list_mounted_secrets_engines()
    data = mounts.get("data", mounts)
    if f"{transit_mount}/" not in data:
        client.sys.enable_secrets_engine("transit", path=transit_mount)
    for name, key_type in TRANSIT_KEYS.items():
        try:
            client.secrets.transit.read_key(name=name, mount_point=transit_mount)
        except hvac.exceptions.InvalidPath:
            client.secrets.transit.create_key(
                name=name, key_type=key_type, mount_point=transit_mount
            )


@dataclass(frozen=True)
class WrappedKey:
    """A person's data key as Vault wrapped it: safe to store, useless without Vault."""

    ciphertext: str


class Vault:
    """The services' view of Vault: data keys, blind indexes and signatures."""

    def __init__(
        self, client: hvac.Client, transit_mount: str = "transit", k8s_role: str | None = None
    ) -> None:
        self._client = client
        self._k8s_role = k8s_role
        self._mount = transit_mount
        self._dek_cache: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._dek_ttl = 300.0

    # -- synchronous primitives (run in a worker thread by the async wrappers) -----------
    def _call(self, fn: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            result: dict[str, Any] = fn(mount_point=self._mount, **kwargs)
        except hvac.exceptions.VaultError as exc:  # pragma: no cover - message has no secrets
            raise VaultUnavailable(f"vault refused {fn.__name__}: {type(exc).__name__}") from exc
        except Exception as exc:
            raise VaultUnavailable(f"vault unreachable during {fn.__name__}") from exc
        return result

    def new_data_key_sync(self) -> tuple[bytes, WrappedKey]:
        res = self._call(
            self._client.secrets.transit.generate_data_key, name=KEK_KEY, key_type="plaintext"
        )
        plaintext = base64.b64decode(res["data"]["plaintext"])
        return plaintext, WrappedKey(res["data"]["ciphertext"])

    def unwrap_sync(self, wrapped: WrappedKey) -> bytes:
        cached = self._dek_cache.get(wrapped.ciphertext)
        now = time.monotonic()
        if cached and now - cached[0] < self._dek_ttl:
            return cached[1]
        res = self._call(
            self._client.secrets.transit.decrypt_data, name=KEK_KEY, ciphertext=wrapped.ciphertext
        )
        key = base64.b64decode(res["data"]["plaintext"])
        self._dek_cache[wrapped.ciphertext] = (now, key)
        while len(self._dek_cache) > 10_000:
            self._dek_cache.popitem(last=False)
        return key

    def blind_index_sync(self, purpose: str, value: str) -> str:
        """Keyed HMAC of ``purpose:value``; the purpose keeps indexes of different fields apart."""
        res = self._call(
            self._client.secrets.transit.generate_hmac,
            name=BLIND_INDEX_KEY,
            hash_input=base64.b64encode(f"{purpose}:{value}".encode()).decode(),
            algorithm="sha2-256",
        )
        mac: str = res["data"]["hmac"]
        return mac.split(":")[-1]

    def blind_indexes_sync(self, items: Sequence[tuple[str, str]]) -> list[str]:
        """The blind indexes of many ``(purpose, value)`` pairs in ONE transit call (its
        ``batch_input``), equal to :meth:`blind_index_sync` of each: the risk screen indexes a
        claim's device, IP, address and card on the hot path for one round trip, not four."""
        if not items:
            return []
        batch = [
            {"input": base64.b64encode(f"{purpose}:{value}".encode()).decode()}
            for purpose, value in items
        ]
        try:
            res = self._client.adapter.post(
                f"/v1/{self._mount}/hmac/{BLIND_INDEX_KEY}/sha2-256", json={"batch_input": batch}
            )
        except hvac.exceptions.VaultError as exc:
            raise VaultUnavailable(f"vault refused hmac batch: {type(exc).__name__}") from exc
        except Exception as exc:
            raise VaultUnavailable("vault unreachable during hmac batch") from exc
        results = res["data"]["batch_results"]
        if len(results) != len(items) or any("error" in r and r["error"] for r in results):
            raise VaultUnavailable("vault refused an item of an hmac batch")
        return [str(r["hmac"]).split(":")[-1] for r in results]

    def sign_sync(self, message: bytes) -> str:
        res = self._call(
            self._client.secrets.transit.sign_data,
            name=TREE_HEAD_KEY,
            hash_input=base64.b64encode(message).decode(),
        )
        sig: str = res["data"]["signature"]
        return sig

    def verify_sync(self, message: bytes, signature: str) -> bool:
        res = self._call(
            self._client.secrets.transit.verify_signed_data,
            name=TREE_HEAD_KEY,
            hash_input=base64.b64encode(message).decode(),
            signature=signature,
        )
        return bool(res["data"]["valid"])

    def tree_head_public_keys_sync(self) -> dict[int, bytes]:
        """The tree-head key's Ed25519 public keys by version (every version still readable:
        checkpoints signed before a rotation verify with the old one)."""
        res = self._call(self._client.secrets.transit.read_key, name=TREE_HEAD_KEY)
        return {
            int(version): base64.b64decode(key["public_key"])
            for version, key in res["data"]["keys"].items()
        }

    def sign_tree_head_sync(self, message: bytes) -> tuple[int, bytes]:
        """Ed25519 over ``message`` with the tree-head key: (key version, raw signature)."""
        prefix, version, sig = self.sign_sync(message).split(":")
        if prefix != "vault" or not version.startswith("v"):
            raise VaultUnavailable("vault returned a signature in an unknown format")
        return int(version[1:]), base64.b64decode(sig)

    def answers_sync(self) -> bool:
        """True if Vault is initialised, unsealed and active (``sys/health`` says 200); the
        health watch asks while a call has met Vault down."""
        try:
            status = self._client.sys.read_health_status(method="GET")
        except Exception:  # unreachable
            return False
        if isinstance(status, dict):  # the JSON body, whatever the HTTP status
            return bool(status.get("initialized")) and not status.get("sealed", True)
        return getattr(status, "status_code", 0) == 200

    def forget_cached(self, wrapped: WrappedKey) -> None:
        self._dek_cache.pop(wrapped.ciphertext, None)

    def keep_token_fresh_sync(self) -> float:
        """Renew the token (or log in again) before it expires; seconds until the next check."""
        try:
            ttl = int(self._client.auth.token.lookup_self()["data"].get("ttl") or 0)
        except Exception:
            ttl = -1
        if ttl == 0:
            return 3600.0  # a token without expiry (local root token): nothing to renew
        try:
            if ttl > 0:
                res = self._client.auth.token.renew_self()
                ttl = int(res["auth"]["lease_duration"])
        except Exception:
            ttl = -1
        if ttl < 0:
            if not self._k8s_role:
                raise VaultUnavailable("the Vault token could not be renewed")
            _k8s_login(self._client, self._k8s_role)
            ttl = int(self._client.auth.token.lookup_self()["data"].get("ttl") or 3600)
        return max(5.0, ttl / 2)

    async def keep_token_fresh(self, stop: asyncio.Event) -> None:
        """Background loop: a long-running pod never finds its Vault token expired."""
        log = logging.getLogger(__name__)
        while not stop.is_set():
            try:
                wait = await asyncio.to_thread(self.keep_token_fresh_sync)
            except Exception:
                log.exception("Vault token renewal failed", extra={"alert": "vault-token"})
                wait = 10.0
            try:
                await asyncio.wait_for(stop.wait(), wait)
            except TimeoutError:
                pass

    def issue_certificate(
        self, who: Caller, *, ttl: str, names: Sequence[str] = ()
    ) -> tls.Certificate:
        """A certificate for ``who`` from the PKI engine; ``names`` are the DNS names and IP
        addresses a server certificate covers."""
        ips = [n for n in names if _is_ip(n)]
        dns = [n for n in names if not _is_ip(n)]
        try:
            return pki.issue(self._client, who, ttl=ttl, dns_names=dns, ip_sans=ips)
        except pki.PkiError as exc:
            raise VaultUnavailable(str(exc)) from None

    def read_secret_sync(self, path: str) -> dict[str, Any] | None:
        """The newest version of the KV v2 secret at ``<mount>/<path>`` (``secret/nats/ledger``),
        or None if there is none."""
        mount, _, rest = path.strip("/").partition("/")
        try:
            found = self._client.secrets.kv.v2.read_secret_version(
                path=rest, mount_point=mount, raise_on_deleted_version=True
            )
        except hvac.exceptions.InvalidPath:
            return None
        except hvac.exceptions.VaultError as exc:
            raise VaultUnavailable(f"vault refused to read {path}: {type(exc).__name__}") from None
        data: dict[str, Any] = found["data"]["data"]
        return data

    def write_secret_sync(self, path: str, data: dict[str, Any]) -> None:
        """A new version of the KV v2 secret at ``<mount>/<path>``."""
        mount, _, rest = path.strip("/").partition("/")
        try:
            self._client.secrets.kv.v2.create_or_update_secret(
                path=rest, secret=data, mount_point=mount
            )
        except hvac.exceptions.VaultError as exc:
            raise VaultUnavailable(f"vault refused to write {path}: {type(exc).__name__}") from None
        except Exception as exc:
            raise VaultUnavailable(f"vault unreachable writing {path}") from exc

    def list_secrets_sync(self, path: str) -> list[str]:
        """The names of the KV v2 secrets under ``<mount>/<path>`` (none: an empty list)."""
        mount, _, rest = path.strip("/").partition("/")
        try:
            found = self._client.secrets.kv.v2.list_secrets(path=rest, mount_point=mount)
        except hvac.exceptions.InvalidPath:
            return []
        except hvac.exceptions.VaultError as exc:
            raise VaultUnavailable(f"vault refused to list {path}: {type(exc).__name__}") from None
        except Exception as exc:
            raise VaultUnavailable(f"vault unreachable listing {path}") from exc
        return [str(k) for k in found["data"]["keys"]]

    # -- async wrappers --------------------------------------------------------------------
    async def new_data_key(self) -> tuple[bytes, WrappedKey]:
        return await asyncio.to_thread(self.new_data_key_sync)

    async def unwrap(self, wrapped: WrappedKey) -> bytes:
        return await asyncio.to_thread(self.unwrap_sync, wrapped)

    async def blind_index(self, purpose: str, value: str) -> str:
        return await asyncio.to_thread(self.blind_index_sync, purpose, value)

    async def blind_indexes(self, items: Sequence[tuple[str, str]]) -> list[str]:
        return await asyncio.to_thread(self.blind_indexes_sync, items)

    async def sign(self, message: bytes) -> str:
        return await asyncio.to_thread(self.sign_sync, message)

    async def sign_tree_head(self, message: bytes) -> tuple[int, bytes]:
        return await asyncio.to_thread(self.sign_tree_head_sync, message)

    async def tree_head_public_keys(self) -> dict[int, bytes]:
        return await asyncio.to_thread(self.tree_head_public_keys_sync)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def seal(key: bytes, plaintext: str, associated: bytes = b"") -> bytes:
    """Encrypt one field under a person's data key: nonce ‖ AES-256-GCM ciphertext."""
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext.encode(), associated)


def unseal(key: bytes, sealed: bytes, associated: bytes = b"") -> str:
    """Decrypt a field sealed by :func:`seal`."""
    return AESGCM(key).decrypt(sealed[:12], sealed[12:], associated).decode()
