"""``subsidyctl dashboard``: serve the live fund-monitoring dashboard (read-only) until stopped.

  subsidyctl dashboard [--listen HOST:PORT] (--token-file FILE | --tls-dir DIR)
                       [--identity DIR] [--base-port N] [--nats-monitor URL] [--pool ID ...]

The dashboard reads as ``--identity`` (by default the local stack's demo auditor): the
services' read APIs and the audit log (subsidyctl/dashboard/monitor.py). People log in with the
token in ``--token-file`` (loopback only; ``subsidyctl up`` starts it so and prints
``dashboard: URL``), or with their client certificate over HTTPS (``--tls-dir``: the
dashboard's own certificate, of the campaign's CA; operators and auditors may look).
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from services.kernel import tls, topology

from ..stack.certs import AUDITOR_DEMO
from .common import (
    DEFAULT_BASE_PORT,
    AuditorIdentityOpt,
    BasePortOpt,
    Failure,
    identity,
    local_address,
    note,
)

if TYPE_CHECKING:  # imported by the command itself: the dashboard brings aiohttp and the bus
    from ..dashboard.monitor import Endpoints
    from ..dashboard.server import Login

app = typer.Typer()
PANEL = "Audit"


def _split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise Failure(f"--listen: HOST:PORT expected, not {listen!r}")
    return host.strip("[]"), int(port)


@app.command(rich_help_panel=PANEL)
def dashboard(
    listen: Annotated[str, typer.Option(help="HOST:PORT to serve on")] = "127.0.0.1:7188",
    token_file: Annotated[
        Path | None,
        typer.Option(help="the login token (one line; loopback only)", dir_okay=False),
    ] = None,
    tls_dir: Annotated[
        Path | None,
        typer.Option(
            help="HTTPS: the dashboard's tls.crt, tls.key, ca.crt; people log in with their "
            "client certificate",
            file_okay=False,
        ),
    ] = None,
    who: AuditorIdentityOpt = None,
    base_port: BasePortOpt = DEFAULT_BASE_PORT,
    nats_monitor: Annotated[
        str, typer.Option(help="the NATS server's monitoring URL, for the consumers' lag")
    ] = "",
    pool: Annotated[
        list[str] | None,
        typer.Option(help="a pool to show even before the audit log names it (repeatable)"),
    ] = None,
) -> None:
    """Serve the live fund-monitoring dashboard (read-only) until Ctrl-C."""
    from ..dashboard.monitor import Endpoints
    from ..dashboard.server import CertificateLogin, DashboardError, TokenLogin, check_login

    if (token_file is None) == (tls_dir is None):
        raise Failure("give exactly one of --token-file (a login token) or --tls-dir (HTTPS)")
    host, port = _split(listen)
    login: Login
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise Failure(f"--token-file: {exc.strerror}: {token_file}") from None
        if len(token) < 32:
            raise Failure("--token-file: the token must be at least 32 characters")
        login = TokenLogin(token, port)
    else:
        login = CertificateLogin()
    try:
        check_login(login, host, tls_dir)
    except DashboardError as exc:
        raise Failure(str(exc)) from None
    endpoints = Endpoints(
        {s: local_address(s, base_port) for s in topology.SERVICE_NAMES}, nats_monitor
    )
    source = identity(who, AUDITOR_DEMO)
    try:
        asyncio.run(_serve(endpoints, source, tuple(pool or ()), login, host, port, tls_dir))
    except DashboardError as exc:
        raise Failure(str(exc)) from None


async def _serve(
    endpoints: Endpoints,
    source: tls.CertificateSource,
    pools: tuple[str, ...],
    login: Login,
    host: str,
    port: int,
    tls_dir: Path | None,
) -> None:
    from ..dashboard.monitor import Monitor
    from ..dashboard.server import serve

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    monitor = Monitor(endpoints, source, pools=pools)
    scheme = "https" if tls_dir is not None else "http"
    await serve(
        monitor,
        login,
        host,
        port,
        stop,
        tls_dir=tls_dir,
        ready=lambda bound: note(f"dashboard serving on {scheme}://{host}:{bound}/"),
    )
