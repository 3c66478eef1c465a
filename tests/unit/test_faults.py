"""Which failures are an outage of a part (retry, never dead-letter) and which are not."""

from __future__ import annotations

import hvac.exceptions
import nats.errors
import psycopg
import pytest
import requests.exceptions
import sqlalchemy.exc
from google.protobuf.message import DecodeError
from psycopg.errors import DeadlockDetected, SerializationFailure

from services.kernel import faults
from services.kernel.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.kernel.vault import VaultUnavailable


def wrapped(orig: Exception) -> BaseException:
    """What SQLAlchemy raises for a driver's error (its OperationalError for psycopg's)."""
    return sqlalchemy.exc.DBAPIError.instance("SELECT 1", {}, orig, psycopg.Error)


def raised_from(outer: BaseException, cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as exc:
            raise outer from exc
    except BaseException as exc:
        return exc


@pytest.mark.parametrize(
    ("exc", "part"),
    [
        (wrapped(psycopg.OperationalError("connection refused")), faults.DATABASE),
        (psycopg.OperationalError("server closed the connection unexpectedly"), faults.DATABASE),
        (sqlalchemy.exc.InterfaceError("SELECT 1", {}, Exception("closed")), faults.DATABASE),
        (sqlalchemy.exc.TimeoutError("QueuePool limit reached"), faults.DATABASE),
        (nats.errors.TimeoutError(), faults.NATS),
        (nats.errors.ConnectionClosedError(), faults.NATS),
        (nats.errors.NoServersError(), faults.NATS),
        (
            raised_from(
                VaultUnavailable("vault unreachable"), requests.exceptions.ConnectionError()
            ),
            faults.VAULT,
        ),
        (raised_from(VaultUnavailable("sealed"), hvac.exceptions.VaultDown()), faults.VAULT),
        (Unavailable("CATALOG_UNAVAILABLE", "catalog did not answer"), faults.PEER),
        (ConnectionRefusedError(), faults.PEER),
        # Wrapped in something else while it was being handled: still the database's.
        (raised_from(RuntimeError("rollback failed"), psycopg.OperationalError()), faults.DATABASE),
    ],
)
def test_an_outage_names_its_part(exc: BaseException, part: str) -> None:
    assert faults.transient_part(exc) == part


@pytest.mark.parametrize(
    "exc",
    [
        DecodeError("Error parsing message"),
        ValueError("cannot handle this event"),
        InvalidArgument("MISSING_FIELD", "sku: required", field="sku"),
        FailedPrecondition("ORDER_REFUSED", "refused"),
        wrapped(psycopg.errors.UniqueViolation("duplicate key")),
        # Vault answered, and refused: not an outage.
        raised_from(VaultUnavailable("vault refused"), hvac.exceptions.Forbidden()),
        KeyError("bug"),
    ],
)
def test_a_failure_of_its_own_is_not_an_outage(exc: BaseException) -> None:
    assert faults.transient_part(exc) is None
    assert not faults.is_conflict(exc)


@pytest.mark.parametrize("cls", [SerializationFailure, DeadlockDetected])
def test_a_serialization_failure_is_a_conflict_not_an_outage(cls: type[Exception]) -> None:
    for exc in (cls("could not serialize"), wrapped(cls("could not serialize"))):
        assert faults.transient_part(exc) is None  # the database is up
        assert faults.is_conflict(exc)  # and the call may be retried at once (ABORTED)


def test_the_refusal_says_which_part_and_when_to_retry() -> None:
    err = faults.unavailable(faults.DATABASE)
    assert err.code.name == "UNAVAILABLE" and err.reason == "DATABASE_UNAVAILABLE"
    assert err.metadata == {"part": "database"} and "retry" in err.message
