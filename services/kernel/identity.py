"""Who is calling: the caller's identity, read from its certificate, never from a request.

Every client and every service holds a certificate from the campaign's CA (Vault's PKI engine)
whose URI SAN is a SPIFFE id, ``spiffe://subsidy.local/<role>/<name>``: a platform
(``platform/jd``), a person (``operator/li``, ``approver/wang``, ``auditor/zhao``) or one of
the services (``service/ledger``). gRPC verifies the chain during the TLS handshake and hands
the id to the server (``peer_spiffe_id`` in the call's auth context); the authorisation
interceptor parses it into a :class:`Caller` and sets it for the call, and use cases record
``caller().actor()`` on every event.
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from subsidy.v1 import common_pb2

from . import validate
from .errors import PermissionDenied

TRUST_DOMAIN: Final = "subsidy.local"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class Role(StrEnum):
    PLATFORM = "platform"
    OPERATOR = "operator"
    APPROVER = "approver"
    AUDITOR = "auditor"
    SERVICE = "service"


_KINDS: Final = {
    Role.PLATFORM: common_pb2.Actor.KIND_PLATFORM,
    Role.OPERATOR: common_pb2.Actor.KIND_OPERATOR,
    Role.APPROVER: common_pb2.Actor.KIND_APPROVER,
    Role.AUDITOR: common_pb2.Actor.KIND_AUDITOR,
    Role.SERVICE: common_pb2.Actor.KIND_SERVICE,
}


class NotAnIdentity(ValueError):
    """A SPIFFE id that is not one of this campaign's identities."""


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: its role and its name within the role."""

    role: Role
    name: str

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{TRUST_DOMAIN}/{self.role}/{self.name}"

    @property
    def principal(self) -> str:
        """``role/name``, as the authorisation table names a single caller."""
        return f"{self.role}/{self.name}"

    def actor(self, reason: str = "") -> common_pb2.Actor:
        """The actor every event this caller causes records."""
        return common_pb2.Actor(kind=_KINDS[self.role], id=self.name, reason=reason)

    @classmethod
    def parse(cls, spiffe_id: str) -> Caller:
        """The caller a certificate's SPIFFE id names; anything else is refused."""
        prefix = f"spiffe://{TRUST_DOMAIN}/"
        if not spiffe_id.startswith(prefix):
            raise NotAnIdentity("not of this campaign's trust domain")
        role, _, name = spiffe_id.removeprefix(prefix).partition("/")
        try:
            parsed_role = Role(role)
        except ValueError:
            raise NotAnIdentity(f"unknown role {role[:20]!r}") from None
        if not _NAME.fullmatch(name):
            raise NotAnIdentity("the name must be lower-case letters, digits and . _ -")
        return cls(parsed_role, name)


def service_caller(service: str) -> Caller:
    """A service acting on its own (expiry sweeps, reactions to events)."""
    return Caller(Role.SERVICE, service)


_current: ContextVar[Caller | None] = ContextVar("subsidy_caller", default=None)


def caller() -> Caller:
    """The authenticated caller of the RPC being handled (set by the authorisation
    interceptor). Outside an RPC there is none, and asking is a programming error."""
    found = _current.get()
    if found is None:
        raise LookupError("no authenticated caller: not inside an authorised RPC")
    return found


def set_caller(found: Caller) -> None:
    """Bind the caller for the rest of this RPC's task (the interceptor calls this)."""
    _current.set(found)


def scope() -> str | None:
    """The platform whose own data the current caller may see, or None for a caller who sees
    every platform's (an operator, an auditor, a service)."""
    who = caller()
    return who.name if who.role is Role.PLATFORM else None


def own_platform(field: str, requested: str) -> str:
    """The platform a request acts for: a platform caller may act only for itself (a request
    naming another platform is refused); anyone else names it in the request."""

    requested = validate.identifier(field, requested)
    platform = scope()
    if platform is not None and requested != platform:
        raise PermissionDenied(
            "NOT_YOUR_PLATFORM",
            f"{field}: the caller's certificate is platform {platform!r}'s",
            field=field,
        )
    return requested
