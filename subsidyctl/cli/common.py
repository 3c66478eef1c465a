"""What every command group shares: options, where the services are, output, exit codes, errors.

Output: stdout carries the command's data, by default in the format the docs show (one JSON
object per line for every command but ``up``); ``--json`` guarantees nothing but JSON, one
object per line, and turns off what is only for people (progress bars, tables, notes), which
all go to stderr. A failure is one line on stderr and a non-zero exit (see ``EXIT_*``).
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, TypeVar

import grpc
import typer
from google.protobuf.message import Message
from rich.console import Console

from services.kernel import rpc
from subsidy.v1 import catalog_pb2_grpc, common_pb2

from ..localstack import Ports

EXIT_OK = 0
EXIT_NO = 1  # the command ran and the answer is no: nothing imported, a disagreement, a stop
EXIT_REFUSED = 2  # bad input, or a service refused the call
EXIT_UNREACHABLE = 3  # a service could not be reached in time

T = TypeVar("T")


class Failure(typer.TyperException):
    """A failure of the command's own (an unreadable file, a missing actor): one line, no trace."""

    def __init__(self, message: str, exit_code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# --------------------------------------------------------------------------------------------
# options shared by several commands

JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json", help="print only JSON, one object per line (no progress bars, tables or notes)"
    ),
]
BasePortOpt = Annotated[
    int,
    typer.Option(envvar="SUBSIDY_BASE_PORT", help="the local stack's base port", min=1),
]
CatalogOpt = Annotated[
    str,
    typer.Option(
        envvar="SUBSIDY_CATALOG_ADDR",
        show_envvar=True,
        help="catalog service HOST:PORT (default: the local stack's)",
    ),
]
ActorOpt = Annotated[  # a parameter named actor_id, so actor() stays callable
    str,
    typer.Option(
        "--actor",
        envvar="SUBSIDY_ACTOR",
        show_envvar=True,
        help="who acts (default: the login name)",
    ),
]
ReasonOpt = Annotated[str, typer.Option(help="why; kept with the event")]

DEFAULT_BASE_PORT = 7100


def base_port() -> int:
    """The local stack's base port, for commands that have no ``--base-port`` of their own."""
    value = os.environ.get("SUBSIDY_BASE_PORT", str(DEFAULT_BASE_PORT))
    try:
        return int(value)
    except ValueError:
        raise Failure(f"SUBSIDY_BASE_PORT is not a port number: {value!r}") from None


def local_address(service: str, base: int | None = None) -> str:
    """A service of the local stack (``make run``)."""
    return f"127.0.0.1:{Ports(base_port() if base is None else base).services[service]}"


def actor(who: str, kind: int = common_pb2.Actor.KIND_OPERATOR) -> common_pb2.Actor:
    """The acting person: ``--actor``, else $SUBSIDY_ACTOR (both arrive in ``who``), else the
    login name."""
    if not who:
        try:
            who = getpass.getuser()
        except (KeyError, OSError):
            raise Failure("no login name to act as: pass --actor or set SUBSIDY_ACTOR") from None
    return common_pb2.Actor(kind=kind, id=who)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# output


def emit(obj: Mapping[str, Any], *, ensure_ascii: bool = False) -> None:
    """One JSON object on one line of stdout (never through Rich: it would wrap long lines)."""
    sys.stdout.write(json.dumps(obj, ensure_ascii=ensure_ascii) + "\n")
    sys.stdout.flush()


def pick(message: Message, *names: str) -> dict[str, Any]:
    """The named fields of a reply as plain values, in that order (repeated fields as lists)."""
    out: dict[str, Any] = {}
    for name in names:
        value = getattr(message, name)
        out[name] = value if isinstance(value, str | bytes | int | float | bool) else list(value)
    return out


def note(message: str) -> None:
    """A plain line for people, on stderr."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def stderr_console() -> Console:
    """Rich on stderr: progress bars and tables only when stderr is a terminal."""
    return Console(stderr=True, highlight=False)


def rpc_failure(err: grpc.aio.AioRpcError) -> tuple[int, dict[str, Any]]:
    """The exit code and the one-line ``{"error": ...}`` object for a failed call."""
    code, info = err.code(), rpc.error_info(err)
    failure = {
        "code": code.name,
        "reason": info.reason if info else "",
        "field": info.metadata.get("field", "") if info else "",
        "message": err.details() or "",
    }
    unreachable = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    return (EXIT_UNREACHABLE if unreachable else EXIT_REFUSED), {"error": failure}


# --------------------------------------------------------------------------------------------
# running calls


def catalog_call(
    address: str,
    call: Callable[[catalog_pb2_grpc.CatalogServiceAsyncStub], Awaitable[T]],
    *,
    deadline_s: float = 10.0,
) -> T:
    """Run ``call`` against the catalog at ``address`` (default: the local stack's catalog).

    A failed call propagates as ``grpc.aio.AioRpcError``; ``subsidyctl.cli.main`` prints it."""
    target = address or local_address("catalog")

    async def go() -> T:
        channel = rpc.channel(target, deadline_s=deadline_s)
        try:
            return await call(catalog_pb2_grpc.CatalogServiceStub(channel))
        finally:
            await channel.close()

    return asyncio.run(go())
