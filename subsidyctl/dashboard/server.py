"""The dashboard's HTTP server (aiohttp): one page, its static files, a JSON snapshot and a
server-sent-event stream of snapshots; read-only, and nothing without a login.

Two ways in, chosen at start:
- **login token** (``make run``): a random token per run, which ``subsidyctl up`` prints in the
  dashboard's URL (``dashboard: http://127.0.0.1:PORT/?token=...``), as Jupyter does. The first
  visit trades it for an HttpOnly, SameSite=Strict cookie and is redirected to a URL without it;
  later requests carry the cookie (or ``Authorization: Bearer TOKEN``), compared in constant
  time. This serves plain HTTP, so it binds loopback addresses only and answers only requests
  addressed to one (a DNS-rebinding page cannot reach it under another name).
- **client certificate** (``--tls-dir``): HTTPS with the campaign's CA; operators and auditors
  log in with their own certificate (the role is the certificate's SPIFFE id, as for gRPC);
  any other role is refused (403), no certificate is 401.

No request changes anything: the only methods served are GET and HEAD.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from services.kernel.identity import Caller, NotAnIdentity, Role

from .monitor import Monitor

STATIC: Final = Path(__file__).resolve().parent / "static"
FILES: Final = {  # the only files served, with their types (nothing else under static/ leaks)
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}
ALLOWED_ROLES: Final = frozenset({Role.OPERATOR, Role.AUDITOR})
HEARTBEAT_S: Final = 15.0
# No inline script or style, nothing from anywhere else: the page works offline and a value
# that slipped into the markup could not run.
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class DashboardError(ValueError):
    """A dashboard that must not start as configured (e.g. a token login on a public port)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) names this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class TokenLogin:
    """The login token of one run, and the port its cookie is named after."""

    token: str
    port: int

    @property
    def cookie(self) -> str:
        # Per port: two local stacks on one machine keep separate logins.
        return f"subsidy-dashboard-{self.port}"

    def matches(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.token.encode())


@dataclass(frozen=True)
class CertificateLogin:
    """HTTPS with client certificates: the roles that may look."""

    roles: frozenset[Role] = ALLOWED_ROLES


Login = TokenLogin | CertificateLogin


def _refuse(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text + "\n", content_type="text/plain")


def _peer(request: web.Request) -> Caller | None:
    """The caller the client certificate names (None: no certificate, or not one of ours)."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        return None
    uris = [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]
    if len(uris) != 1:
        return None
    try:
        return Caller.parse(uris[0])
    except NotAnIdentity:
        return None


def auth_middleware(login: Login) -> Any:
    """Every request is logged in, or refused before any handler runs."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return _refuse(405, "read-only")
        if request.path == "/healthz":
            return await handler(request)
        if isinstance(login, CertificateLogin):
            who = _peer(request)
            if who is None:
                return _refuse(401, "log in with your client certificate")
            if who.role not in login.roles:
                return _refuse(403, f"{who.role.value} certificates may not view the dashboard")
            return await handler(request)
        if not is_loopback(request.url.host or ""):
            return _refuse(403, "this dashboard answers on a loopback address only")
        given = request.query.get("token")
        if given is not None:
            if not login.matches(given):
                return _refuse(403, "wrong login token")
            # Trade the token in the URL for a cookie, and drop it from the address bar (and
            # from anything the page's address could leak into).
            rest = {k: v for k, v in request.query.items() if k != "token"}
            target = request.rel_url.with_query(rest)
            response = web.HTTPSeeOther(location=str(target))
            response.set_cookie(
                login.cookie, login.token, httponly=True, samesite="Strict", path="/"
            )
            return response
        header = request.headers.get("Authorization", "")
        presented = header.removeprefix("Bearer ") if header.startswith("Bearer ") else None
        presented = presented if presented is not None else request.cookies.get(login.cookie)
        if presented is None:
            return _refuse(401, "log in with the URL `subsidyctl up` printed (dashboard: ...)")
        if not login.matches(presented):
            return _refuse(403, "wrong login token")
        return await handler(request)

    return authenticate


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def create_app(monitor: Monitor, login: Login) -> web.Application:
    """The dashboard's routes, behind the login and the security headers."""
    app = web.Application(middlewares=[security_headers, auth_middleware(login)])

    async def index(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(
            STATIC / "dashboard.html", headers={"Content-Type": "text/html; charset=utf-8"}
        )

    async def static(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in FILES:
            raise web.HTTPNotFound()
        return web.FileResponse(STATIC / name, headers={"Content-Type": FILES[name]})

    async def snapshot(request: web.Request) -> web.StreamResponse:
        return web.json_response(monitor.snapshot, dumps=_dumps)

    async def events(request: web.Request) -> web.StreamResponse:
        """Server-sent events: the snapshot now, then each time it changes."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        await response.prepare(request)
        version = -1
        with contextlib.suppress(ConnectionResetError, asyncio.CancelledError):
            while True:
                snap = await monitor.wait_change(version, HEARTBEAT_S)
                if snap["version"] == version:
                    await response.write(b": still here\n\n")
                    continue
                version = snap["version"]
                await response.write(f"id: {version}\ndata: {_dumps(snap)}\n\n".encode())
        return response

    async def health(request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok\n")

    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/api/snapshot", snapshot)
    app.router.add_get("/api/events", events)
    app.router.add_get("/healthz", health)
    return app


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def server_ssl(tls_dir: Path) -> ssl.SSLContext:
    """HTTPS with the campaign's CA: the dashboard's certificate from ``tls_dir`` (tls.crt,
    tls.key, ca.crt) and client certificates checked against the same CA (asked for, and a
    request without one answered 401 rather than a failed handshake)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls_dir / "ca.crt"))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls_dir / "tls.crt", tls_dir / "tls.key")
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def check_login(login: Login, host: str, tls_dir: Path | None) -> None:
    """Refuse a configuration that would expose the dashboard: a token login (plain HTTP) on
    anything but a loopback address, or a certificate login without a certificate."""
    if isinstance(login, TokenLogin) and not is_loopback(host):
        raise DashboardError(
            f"a dashboard with a login token serves plain HTTP: it binds loopback only, not "
            f"{host!r} (give --tls-dir for HTTPS with client certificates)"
        )
    if isinstance(login, CertificateLogin) and tls_dir is None:
        raise DashboardError("a certificate login needs --tls-dir (the dashboard's certificate)")


async def reload_certificate(
    context: ssl.SSLContext, tls_dir: Path, stop: asyncio.Event, every_s: float = 5.0
) -> None:
    """Load the dashboard's certificate again whenever its files change (Vault Agent or
    cert-manager renew them in place); new connections get the new one."""

    def stamp() -> tuple[float, ...]:
        return tuple((tls_dir / name).stat().st_mtime for name in ("tls.crt", "tls.key"))

    seen = stamp()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
        try:
            now = stamp()
            if now != seen:
                context.load_cert_chain(tls_dir / "tls.crt", tls_dir / "tls.key")
                seen = now
        except (OSError, ssl.SSLError):
            continue  # half-written files: the next look loads them


async def serve(
    monitor: Monitor,
    login: Login,
    host: str,
    port: int,
    stop: asyncio.Event,
    *,
    tls_dir: Path | None = None,
    ready: Callable[[int], None] = lambda port: None,
) -> None:
    """Serve until ``stop`` is set (``ready`` is called with the port once listening)."""
    check_login(login, host, tls_dir)
    context = server_ssl(tls_dir) if tls_dir is not None else None
    runner = web.AppRunner(create_app(monitor, login), shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=context)
    await site.start()
    refresh = asyncio.create_task(monitor.run(stop))
    renew = asyncio.create_task(
        reload_certificate(context, tls_dir, stop) if context and tls_dir else stop.wait()
    )
    try:
        ready(port)
        await stop.wait()
    finally:
        stop.set()
        await refresh
        await renew
        await runner.cleanup()
        await monitor.close()
