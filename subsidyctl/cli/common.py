"""What every command group shares: options, where the services are, output, exit codes, errors.

Output: stdout carries the command's data, by default in the format the docs show (one JSON
object per line for every command but ``up``); ``--json`` guarantees nothing but JSON, one
object per line, and turns off what is only for people (progress bars, tables, notes), which
all go to stderr. A failure is one line on stderr and a non-zero exit (see ``EXIT_*``).

Identity: every call is mutual TLS and the services take the caller from its certificate alone
(docs/security.md). A command that calls a service takes ``--identity DIR`` (``tls.crt``,
``tls.key``, ``ca.crt``; $SUBSIDY_IDENTITY), by default the local stack's demo identity that fits
it, under ``$SUBSIDY_RUN_DIR/certs`` (``run/certs/operator-demo`` for ``pause``). Every variable
the CLI reads is declared in services.kernel.settings.CliSettings.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import grpc
import typer
from google.protobuf.message import Message
from rich.console import Console

from services.kernel import rpc, tls
from services.kernel.identity import Caller
from services.kernel.settings import CliSettings, SettingsError
from subsidy.v1 import catalog_pb2_grpc, common_pb2

from .. import demo
from ..ports import Ports
from ..stack.certs import (
    APPROVER_DEMO,
    AUDITOR_DEMO,
    OPERATOR_DEMO,
    PLATFORM_DEMO,
    dir_name,
    identity_dir,
)

EXIT_OK = 0
EXIT_NO = 1  # the command ran and the answer is no: nothing imported, a disagreement, a stop
EXIT_REFUSED = 2  # bad input, or a service refused the call
EXIT_UNREACHABLE = 3  # a service could not be reached in time

T = TypeVar("T")


class Failure(typer.TyperException):
    """A failure of the command's own (an unreadable file, no certificate): one line, no trace."""

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
ReasonOpt = Annotated[str, typer.Option(help="why; kept with the event")]
RunDirOpt = Annotated[
    Path,
    typer.Option(envvar="SUBSIDY_RUN_DIR", help="data, logs, traces and certs/", file_okay=False),
]


def identity_option(default: Caller) -> Any:
    """``--identity DIR`` for a command whose demo identity is ``default``."""
    return typer.Option(
        "--identity",
        envvar="SUBSIDY_IDENTITY",
        show_envvar=True,
        file_okay=False,
        show_default=False,
        help="the certificate to call with: a directory with tls.crt, tls.key and ca.crt "
        f"(default: the demo identity, $SUBSIDY_RUN_DIR/certs/{dir_name(default)})",
    )


PlatformIdentityOpt = Annotated[Path | None, identity_option(PLATFORM_DEMO)]
OperatorIdentityOpt = Annotated[Path | None, identity_option(OPERATOR_DEMO)]
ApproverIdentityOpt = Annotated[Path | None, identity_option(APPROVER_DEMO)]
AuditorIdentityOpt = Annotated[Path | None, identity_option(AUDITOR_DEMO)]


DEFAULT_BASE_PORT = 7100
DEFAULT_RUN_DIR = Path("run")


def settings() -> CliSettings:
    """The CLI's own variables, for commands that have no option for them."""
    try:
        return CliSettings.from_env()
    except SettingsError as exc:
        raise Failure(str(exc)) from None


def base_port() -> int:
    """The local stack's base port, for commands that have no ``--base-port`` of their own."""
    return settings().base_port


def run_dir() -> Path:
    """The local stack's run folder, for commands that have no ``--run-dir`` of their own."""
    return settings().run_dir


def local_address(service: str, base: int | None = None) -> str:
    """A service of the local stack (``make run``)."""
    return f"127.0.0.1:{Ports(base_port() if base is None else base).services[service]}"


def demo_identities(run: Path, platform: Path | None = None) -> demo.Identities:
    """The local stack's demo identities under ``run``/certs, one per role the demo acts in;
    ``platform`` replaces the demo platform's."""
    return demo.Identities(
        {
            PLATFORM_DEMO.role: identity(platform, PLATFORM_DEMO, run),
            OPERATOR_DEMO.role: identity(None, OPERATOR_DEMO, run),
            APPROVER_DEMO.role: identity(None, APPROVER_DEMO, run),
            AUDITOR_DEMO.role: identity(None, AUDITOR_DEMO, run),
        }
    )


def actor_of(who: tls.CertificateSource) -> common_pb2.Actor:
    """The actor the certificate names, for requests that still carry an ``actor`` field (the
    services ignore it and record the authenticated caller; sending the same keeps older
    servers answering)."""
    return Caller.parse(who.current().spiffe_id()).actor()


def identity(given: Path | None, default: Caller, run: Path | None = None) -> tls.CertificateSource:
    """The certificate a command presents: ``--identity DIR``, else the demo identity
    ``default`` under the run folder's ``certs``."""
    directory = given or identity_dir((run or run_dir()) / "certs", default)
    try:
        return tls.FileCertificates(directory)
    except tls.TlsError:
        hint = (
            "pass --identity DIR (subsidyctl certs issue writes one)"
            if given
            else "start the local stack (make run), or pass --identity DIR"
        )
        raise Failure(f"no certificate in {directory} (tls.crt, tls.key, ca.crt): {hint}") from None


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
    who: tls.CertificateSource,
    call: Callable[[catalog_pb2_grpc.CatalogServiceAsyncStub], Awaitable[T]],
    *,
    deadline_s: float = 10.0,
) -> T:
    """Run ``call`` as ``who`` against the catalog at ``address`` (default: the local stack's
    catalog).

    A failed call propagates as ``grpc.aio.AioRpcError``; ``subsidyctl.cli.main`` prints it."""
    target = address or local_address("catalog")

    async def go() -> T:
        channel = rpc.channel(target, who, deadline_s=deadline_s)
        try:
            return await call(catalog_pb2_grpc.CatalogServiceStub(channel))
        finally:
            await channel.close()

    return asyncio.run(go())
