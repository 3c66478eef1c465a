"""Which failures are the infrastructure's and which are a request's or an event's own.

A database that is restarting, a NATS server that is gone, a Vault that does not answer: these
pass, and the same call or event succeeds once the part is back. They must never be treated as
the message's fault (dead-lettered) nor reported as the server's (``INTERNAL``): consumers retry
them without counting them towards the dead-letter limit, and the RPC edge answers
``UNAVAILABLE`` with a retry delay. Anything else (a message that cannot be decoded, a handler
that refuses the event the same way every time, a bug) is the event's or the code's own.

:func:`transient_part` names the part a failure came from, looking through the exception's
chain (``raise ... from`` and the exception being handled when it was raised), because a
driver's error often arrives wrapped: SQLAlchemy wraps psycopg's, the Vault adapter wraps
hvac's and requests'.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Final

from .errors import Unavailable

DATABASE: Final = "database"
NATS: Final = "nats"
VAULT: Final = "vault"
PEER: Final = "peer"

# How long a caller should wait before retrying a call that met a part that is down: about the
# time PostgreSQL needs to restart or a NATS client to reconnect; the health check's period.
RETRY_DELAY_S: Final = 1.0

Kinds = tuple[type[BaseException], ...]


@functools.cache
def _kinds() -> tuple[Kinds, Kinds, Kinds, Kinds]:
    """(conflicts, database, NATS, Vault) exception classes. Imported at the first failure,
    not with this module: the rpc bootstrap imports it, and so does the pod's health probe,
    which must start in a fraction of its 5 s."""
    import hvac.exceptions
    import nats.errors
    import nats.js.errors
    import psycopg
    import requests.exceptions
    import sqlalchemy.exc
    from psycopg.errors import DeadlockDetected, SerializationFailure, TransactionRollback

    # psycopg files these under OperationalError, but the database is up: a retry succeeds.
    conflicts: Kinds = (SerializationFailure, DeadlockDetected, TransactionRollback)
    database: Kinds = (
        sqlalchemy.exc.OperationalError,  # wraps psycopg.OperationalError: refused, terminated
        sqlalchemy.exc.InterfaceError,  # a connection that is closed
        sqlalchemy.exc.DisconnectionError,
        sqlalchemy.exc.TimeoutError,  # no connection free in the pool in time
        psycopg.OperationalError,
        psycopg.InterfaceError,
    )
    bus: Kinds = (
        nats.errors.TimeoutError,
        nats.errors.ConnectionClosedError,
        nats.errors.ConnectionDrainingError,
        nats.errors.ConnectionReconnectingError,
        nats.errors.NoServersError,
        nats.errors.NoRespondersError,
        nats.errors.StaleConnectionError,
        nats.errors.OutboundBufferLimitError,
        nats.errors.UnexpectedEOF,
        nats.js.errors.ServiceUnavailableError,
    )
    vault: Kinds = (
        hvac.exceptions.VaultDown,  # sealed or restarting
        hvac.exceptions.InternalServerError,
        hvac.exceptions.BadGateway,
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
    )
    return conflicts, database, bus, vault


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def transient_part(exc: BaseException) -> str | None:
    """The part (``database``, ``nats``, ``vault``, ``peer``) whose outage ``exc`` comes from,
    or None if the failure is not an outage (it will happen again on a retry)."""
    conflicts, database, bus, vault = _kinds()
    for link in _chain(exc):
        # psycopg files a serialization failure or deadlock under OperationalError: a retry
        # succeeds, but the database is up (see :func:`is_conflict`).
        if isinstance(link, conflicts):
            return None
        if isinstance(link, database):
            if isinstance(getattr(link, "orig", None), conflicts):
                return None
            return DATABASE
        if isinstance(link, bus):
            return NATS
        if isinstance(link, vault):
            return VAULT
        if isinstance(link, Unavailable):
            return PEER  # another service (or the identity authority) did not answer
        if isinstance(link, ConnectionError | TimeoutError):
            return PEER
    return None


def is_conflict(exc: BaseException) -> bool:
    """True if ``exc`` is the database's serialization failure or deadlock: nothing was
    written and the same call may be retried at once (``ABORTED``)."""
    conflicts = _kinds()[0]
    return any(
        isinstance(link, conflicts) or isinstance(getattr(link, "orig", None), conflicts)
        for link in _chain(exc)
    )


def unavailable(part: str) -> Unavailable:
    """The refusal of a call that met ``part`` down: retry after :data:`RETRY_DELAY_S`."""
    return Unavailable(
        f"{part.upper()}_UNAVAILABLE",
        f"the {part} this service needs is not reachable: retry the same request in "
        f"{RETRY_DELAY_S:.0f} s",
        part=part,
    )
