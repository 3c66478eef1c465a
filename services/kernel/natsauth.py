"""Who may do what on NATS: one nkey user per service, its permissions derived from the topology.

A service's user may publish only its own events (``events.<service>.>``), its dead letters,
and the JetStream API calls its relay and consumers make (stream info, create and bind its
durable pull consumers, fetch, ack); it may subscribe only to the events of the producers
services/kernel/topology.py says it consumes and to its own inbox prefix (``_INBOX_<service>``,
so one service cannot read the replies meant for another); no service may touch another's
durable consumer. Deleting or purging a stream is denied to every service; only the operator
user (no restrictions) creates, changes or removes streams
(:func:`services.kernel.bus.ensure_streams` with its credential).

The seeds live in Vault's KV v2 engine (``secret/nats/<user>``), never in the repo or in chart
values. The local stack and the test fixtures call :func:`provision`, which issues the seeds it
does not find there and hands back only the public keys for the server's configuration; a
service reads its own seed at start (:func:`service_credentials`).
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import hvac
import nkeys

from . import pki, topology
from .identity import Caller, Role
from .tls import Certificate

EVENTS_STREAM: Final = "SUBSIDY_EVENTS"  # the same names as services.kernel.bus (no cycle)
DLQ_STREAM: Final = "SUBSIDY_DLQ"
KV_MOUNT: Final = "secret"
KV_PREFIX: Final = "nats"
OPERATOR: Final = "operator"
# The certificate nats-server presents: a service identity of the campaign CA.
SERVER_IDENTITY: Final = Caller(Role.SERVICE, "nats")
# Stream administration no service credential may ever do (an explicit deny wins over any
# allow, so a later, wider allow cannot reopen it).
STREAM_ADMIN_DENIED: Final = (
    "$JS.API.STREAM.DELETE.>",
    "$JS.API.STREAM.PURGE.>",
    "$JS.API.STREAM.MSG.DELETE.>",
    "$JS.API.STREAM.UPDATE.>",
    "$JS.API.STREAM.CREATE.>",
)


# The durable consumers each service runs (its ServiceSpec's EventConsumer names): every other
# service is denied them. tests/kernel/test_nats_auth.py checks the list against the services'
# wiring.
DURABLES: Final[Mapping[str, tuple[str, ...]]] = {
    topology.CATALOG: ("catalog-sales",),
    topology.ELIGIBILITY: ("eligibility-policies", "eligibility-ledger", "eligibility-risk"),
    topology.LEDGER: ("ledger-risk-rules", "ledger-risk-lists"),
    topology.AUDIT: ("audit-log", "audit-supervision"),
}


# Services whose every durable filters on one subject: their create requests carry the filter
# in the NATS subject (services/kernel/consumer.py), so they are granted no create request
# without one, and can create consumers only on the producers they consume.
BOUND_CONSUMERS_ONLY: Final = frozenset({topology.LEDGER})


class NatsCredentialsError(RuntimeError):
    """A NATS credential that Vault does not hold or that is not an nkey user seed."""


@dataclass(frozen=True)
class Credentials:
    """What a NATS client signs in with: its user's nkey seed (never printed), the CA bundle
    that verifies the server's certificate (None: the system's trust store) and the inbox
    prefix its permissions allow."""

    user: str
    seed: str = field(repr=False)
    ca_pem: bytes | None = field(default=None, repr=False)

    @property
    def inbox_prefix(self) -> str:
        return inbox_prefix(self.user)

    @property
    def public_key(self) -> str:
        return public_key(self.seed)

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context that verifies the server's certificate and its name."""
        if self.ca_pem is None:
            return ssl.create_default_context()
        return ssl.create_default_context(cadata=self.ca_pem.decode())


def inbox_prefix(user: str) -> str:
    """The reply subjects of ``user``'s requests (the operator keeps NATS's default)."""
    return "_INBOX" if user == OPERATOR else f"_INBOX_{user}"


def kv_path(user: str) -> str:
    """Where ``user``'s seed lives in Vault, ``secret/nats/<user>`` (mount first)."""
    return f"{KV_MOUNT}/{KV_PREFIX}/{user}"


def new_seed() -> str:
    """A fresh nkey user seed (``SU...``)."""
    seed: bytes = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return seed.decode()


def public_key(seed: str) -> str:
    """The public nkey (``U...``) of a user seed; NatsCredentialsError if it is not one."""
    try:
        pair = nkeys.from_seed(bytearray(seed.strip().encode()))
        key = str(pair.public_key.decode())
    except Exception:
        raise NatsCredentialsError("not an nkey seed") from None
    if not key.startswith("U"):
        raise NatsCredentialsError("not an nkey user seed")
    return key


def permissions(service: str) -> dict[str, Any]:
    """The nats-server permissions of ``service``'s user, from what the topology declares."""
    consumes = topology.service(service).consumes
    publish = [
        f"events.{service}.>",
        "dlq.*",  # a consumer's dead letters (dlq.<consumer>)
        "$JS.API.INFO",
        f"$JS.API.STREAM.INFO.{EVENTS_STREAM}",
        f"$JS.API.STREAM.INFO.{DLQ_STREAM}",
        # Read a dead letter by sequence, to list and replay its consumers' (OutboxService).
        f"$JS.API.STREAM.MSG.GET.{DLQ_STREAM}",
    ]
    deny = list(STREAM_ADMIN_DENIED)
    if consumes:
        stream = EVENTS_STREAM
        publish += [
            # Look up, create and bind pull consumers, fetch from them and ack: its durables
            # and the short-lived ones a projection rebuild replays with (named by the client,
            # so not by a pattern). A consumer with one filter subject carries it in the create
            # subject, so it is bound to the producers consumed; one with several is not.
            f"$JS.API.CONSUMER.INFO.{stream}.*",
            *(() if service in BOUND_CONSUMERS_ONLY else (f"$JS.API.CONSUMER.CREATE.{stream}.*",)),
            *(f"$JS.API.CONSUMER.CREATE.{stream}.*.events.{p}.>" for p in consumes),
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.*",
            f"$JS.ACK.{stream}.>",
        ]
        # Never another service's durable: draining or acking it would hide events from it
        # (audit's, from the audit log), and re-creating it could change its filter.
        for other, durables in DURABLES.items():
            if other == service:
                continue
            for d in durables:
                deny += [
                    f"$JS.API.CONSUMER.*.{stream}.{d}",
                    f"$JS.API.CONSUMER.*.{stream}.{d}.>",
                    f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{d}",
                    f"$JS.ACK.{stream}.{d}.>",
                ]
    subscribe = [f"{inbox_prefix(service)}.>", *(f"events.{p}.>" for p in consumes)]
    return {
        "publish": {"allow": publish, "deny": deny},
        "subscribe": {"allow": subscribe},
    }


def users() -> tuple[str, ...]:
    """Every NATS user of the platform: one per service, and the operator."""
    return (*topology.SERVICE_NAMES, OPERATOR)


def authorization(public_keys: Mapping[str, str]) -> dict[str, Any]:
    """nats-server's ``authorization`` block: each user by its public nkey only, a service's
    with :func:`permissions`, the operator's unrestricted."""
    entries: list[dict[str, Any]] = []
    for user, key in public_keys.items():
        entry: dict[str, Any] = {"nkey": key}
        if user != OPERATOR:
            entry["permissions"] = permissions(user)
        entries.append(entry)
    return {"users": entries}


# -- Vault -------------------------------------------------------------------------------
def _split(path: str) -> tuple[str, str]:
    mount, _, rest = path.strip("/").partition("/")
    if not mount or not rest:
        raise NatsCredentialsError(f"{path!r} is not <mount>/<path>")
    return mount, rest


def ensure_kv_mount(client: hvac.Client, mount: str = KV_MOUNT) -> None:
    """Enable KV v2 at ``mount`` unless it is mounted (``bao server -dev`` has ``secret/``)."""
    mounts = client.sys.list_mounted_secrets_engines()
    data = mounts.get("data", mounts)
    if f"{mount}/" in data:
        return
    client.sys.enable_secrets_engine("kv", path=mount, options={"version": "2"})
    # A new KV v2 mount upgrades itself for a moment and refuses reads meanwhile.
    deadline = time.monotonic() + 30
    while True:
        try:
            client.secrets.kv.v2.read_configuration(mount_point=mount)
            client.secrets.kv.v2.list_secrets(path="", mount_point=mount)
        except hvac.exceptions.InvalidPath:
            return  # answered: empty, and ready
        except hvac.exceptions.InvalidRequest:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
            continue
        return


def read_seed(client: hvac.Client, path: str) -> str | None:
    """The seed stored at ``path`` (``<mount>/<path>``), or None if there is none."""
    mount, rest = _split(path)
    try:
        secret = client.secrets.kv.v2.read_secret_version(
            path=rest, mount_point=mount, raise_on_deleted_version=True
        )
    except hvac.exceptions.InvalidPath:
        return None
    seed = secret["data"]["data"].get("seed")
    return str(seed) if seed else None


@dataclass(frozen=True)
class Accounts:
    """What nats-server needs to authenticate the platform: its own certificate and each
    user's public key; and the operator's credentials, for the stack to create the streams."""

    certificate: Certificate = field(repr=False)
    public_keys: Mapping[str, str]
    operator: Credentials


def provision(
    client: hvac.Client, *, names: Iterable[str] = ("localhost",), ttl: str = pki.MAX_CERT_TTL
) -> Accounts:
    """Issue (or reuse) every user's seed in Vault and a server certificate for nats-server
    on 127.0.0.1 and ``names``; only public keys leave this function, and the operator's seed."""
    ensure_kv_mount(client)
    keys: dict[str, str] = {}
    operator_seed = ""
    for user in users():
        path = kv_path(user)
        seed = read_seed(client, path)
        if seed is None:
            seed = new_seed()
            mount, rest = _split(path)
            client.secrets.kv.v2.create_or_update_secret(
                path=rest, mount_point=mount, secret={"seed": seed}
            )
        keys[user] = public_key(seed)
        if user == OPERATOR:
            operator_seed = seed
    cert = pki.issue(client, SERVER_IDENTITY, ttl=ttl, dns_names=list(names), ip_sans=["127.0.0.1"])
    return Accounts(cert, keys, Credentials(OPERATOR, operator_seed, cert.ca_pem))


def service_credentials(
    service: str, path: str, read: Callable[[str], Mapping[str, Any] | None], ca_pem: bytes
) -> Credentials:
    """A service's NATS credentials: its seed from Vault at ``path`` (``secret/nats/<service>``
    when empty) through ``read`` (the service's own Vault token), ``ca_pem`` to verify the
    server with."""
    path = path or kv_path(service)
    secret = read(path)
    seed = str((secret or {}).get("seed") or "")
    if not seed:
        raise NatsCredentialsError(f"Vault holds no NATS seed for {service} at {path}")
    public_key(seed)  # refuse a malformed seed here, not as an opaque connect failure
    return Credentials(service, seed, ca_pem)
