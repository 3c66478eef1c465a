"""Mutual TLS for every gRPC connection, with certificates that renew without a restart.

A process's certificate comes from a :class:`CertificateSource`:

- :class:`VaultCertificates`: the process asks Vault's PKI engine (OpenBao has it) for a
  short-lived certificate for its own SPIFFE id and asks again when two thirds of its lifetime
  have passed (local stack and tests; in a cluster, when the service may use the PKI role);
- :class:`FileCertificates`: ``tls.crt``, ``tls.key`` and ``ca.crt`` in a directory that Vault
  Agent or cert-manager keeps fresh (the chart), or that ``subsidyctl certs issue`` wrote (a
  platform's or a person's identity); a change of the files is picked up at the next handshake.

Servers use gRPC's dynamic credentials, which ask for the newest certificate at each new
handshake, so a renewal drops no call. Clients use a :class:`RenewingChannel`, which opens a
new channel when the certificate changes and lets calls on the old one finish. Written here
because gRPC's Python API has no renewing client credentials; the renewal rule (at 2/3 of the
lifetime) is the one Vault Agent and cert-manager use.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger(__name__)
CERT_FILE, KEY_FILE, CA_FILE = "tls.crt", "tls.key", "ca.crt"


@dataclass(frozen=True)
class Certificate:
    """A certificate chain with its private key, and the CA bundle that verifies peers."""

    chain_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    @property
    def leaf(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.chain_pem)

    @property
    def not_after(self) -> dt.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def not_before(self) -> dt.datetime:
        return self.leaf.not_valid_before_utc

    def spiffe_id(self) -> str:
        """The URI SAN naming the holder (``spiffe://subsidy.local/<role>/<name>``)."""
        san = self.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
        return uris[0] if uris else ""

    def renew_at(self) -> dt.datetime:
        """When to renew: two thirds into the certificate's lifetime."""
        return self.not_before + (self.not_after - self.not_before) * 2 / 3


class CertificateSource(Protocol):
    """Where a process's current certificate comes from."""

    def current(self) -> Certificate: ...

    async def keep_fresh(self, stop: asyncio.Event) -> None: ...


class FileCertificates:
    """A certificate kept in ``directory`` (tls.crt, tls.key, ca.crt) by someone else."""

    # current() is asked at every outgoing call and every handshake: it looks at the files at
    # most this often, so the checkout's hot path pays no file-system calls per RPC.
    LOOK_EVERY_S = 1.0

    def __init__(self, directory: Path, *, check_every_s: float = 5.0) -> None:
        self.directory = Path(directory)
        self.check_every_s = check_every_s
        self._lock = threading.Lock()
        self._stamp: tuple[float, ...] = ()
        self._cert = self._read()
        self._looked = time.monotonic()

    def _mtimes(self) -> tuple[float, ...]:
        return tuple((self.directory / f).stat().st_mtime for f in (CERT_FILE, KEY_FILE, CA_FILE))

    def _read(self) -> Certificate:
        try:
            stamp = self._mtimes()
            cert = Certificate(
                (self.directory / CERT_FILE).read_bytes(),
                (self.directory / KEY_FILE).read_bytes(),
                (self.directory / CA_FILE).read_bytes(),
            )
            _check_pair(cert)
        except (OSError, ValueError) as exc:
            raise TlsError(f"no usable certificate in {self.directory}: {exc}") from None
        self._stamp = stamp
        return cert

    def current(self) -> Certificate:
        if time.monotonic() - self._looked < self.LOOK_EVERY_S:
            return self._cert
        with self._lock:
            self._looked = time.monotonic()
            try:
                changed = self._mtimes() != self._stamp
            except OSError:
                changed = False  # mid-rotation: keep serving the one we have
            if changed:
                try:
                    fresh = self._read()
                except TlsError:
                    # The writer (Vault Agent) writes the three files one after another: a
                    # key that does not match its certificate yet is kept out until it does.
                    log.warning("certificate files changed but are not usable yet; keeping the old")
                else:
                    if fresh != self._cert:  # rewritten with the same content: nothing new
                        self._cert = fresh
            return self._cert

    async def keep_fresh(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.current()
            try:
                await asyncio.wait_for(stop.wait(), self.check_every_s)
            except TimeoutError:
                pass


Issuer = Callable[[], Certificate]


class VaultCertificates:
    """A certificate this process asks Vault's PKI engine for, and renews itself."""

    def __init__(self, issue: Issuer, *, min_wait_s: float = 1.0) -> None:
        self._issue = issue
        self._min_wait_s = min_wait_s
        self._cert = issue()
        self.renewals = 0

    def current(self) -> Certificate:
        return self._cert

    async def keep_fresh(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            wait = (self._cert.renew_at() - dt.datetime.now(dt.UTC)).total_seconds()
            try:
                await asyncio.wait_for(stop.wait(), max(self._min_wait_s, wait))
                return
            except TimeoutError:
                pass
            try:
                self._cert = await asyncio.to_thread(self._issue)
                self.renewals += 1
            except Exception:
                log.exception("certificate renewal failed", extra={"alert": "certificate"})


class TlsError(RuntimeError):
    """A certificate or key that cannot be used."""


def _check_pair(cert: Certificate) -> None:
    """The key is the certificate's own (ValueError otherwise)."""
    key = serialization.load_pem_private_key(cert.key_pem, password=None)
    public = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*public) != cert.leaf.public_key().public_bytes(*public):
        raise ValueError("the key does not belong to the certificate")


def server_credentials(source: CertificateSource) -> grpc.ServerCredentials:
    """Server credentials that require a client certificate from the same CA and pick up a
    renewed certificate at the next handshake."""
    served: list[Certificate] = [source.current()]

    def config(cert: Certificate) -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(cert.key_pem, cert.chain_pem)], root_certificates=cert.ca_pem
        )

    def fetch() -> Any:
        cert = source.current()
        if cert is served[0]:
            return None  # unchanged: gRPC keeps the configuration it has
        served[0] = cert
        return config(cert)

    return grpc.dynamic_ssl_server_credentials(
        config(served[0]), fetch, require_client_authentication=True
    )


def channel_credentials(cert: Certificate) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(cert.ca_pem, cert.key_pem, cert.chain_pem)


class RenewingChannel(grpc.aio.Channel):
    """A client channel that presents the source's current certificate: when it changes, new
    calls go over a new channel and the old one closes once its calls have finished.

    It offers the four multi-callable factories stubs use, so generated stubs work over it."""

    def __init__(
        self,
        target: str,
        source: CertificateSource,
        *,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        options: Sequence[tuple[str, Any]] = (),
        drain_s: float = 30.0,
    ) -> None:
        self.target = target
        self._source = source
        self._interceptors = list(interceptors)
        self._options = list(options)
        self._drain_s = drain_s
        self._cert = source.current()
        self._channel = self._open(self._cert)
        self._retired: set[asyncio.Task[None]] = set()

    def _open(self, cert: Certificate) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(
            self.target,
            channel_credentials(cert),
            options=self._options,
            interceptors=self._interceptors,
        )

    def current(self) -> grpc.aio.Channel:
        """The channel for a new call, reopened first if the certificate was renewed."""
        cert = self._source.current()
        if cert is not self._cert:
            old, self._cert = self._channel, cert
            self._channel = self._open(cert)
            task = asyncio.get_running_loop().create_task(old.close(grace=self._drain_s))
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)
        return self._channel

    def _factory(self, kind: str) -> Callable[..., Any]:
        def make(method: str, *args: Any, **kwargs: Any) -> Any:
            def call(*call_args: Any, **call_kwargs: Any) -> Any:
                multi = getattr(self.current(), kind)(method, *args, **kwargs)
                return multi(*call_args, **call_kwargs)

            return call

        return make

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._factory("unary_unary")(method, *args, **kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._factory("unary_stream")(method, *args, **kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._factory("stream_unary")(method, *args, **kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._factory("stream_stream")(method, *args, **kwargs)

    async def channel_ready(self) -> None:
        await self.current().channel_ready()

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.current().get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self.current().wait_for_state_change(last_observed_state)

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)
        for task in list(self._retired):
            task.cancel()

    async def __aenter__(self) -> RenewingChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
