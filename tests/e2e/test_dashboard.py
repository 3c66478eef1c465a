"""The fund-monitoring dashboard on the separate-process stack `make run` starts: its logins,
and the page itself in a real headless Chromium (Debian's ``chromium``; installed once when
missing and possible, otherwise these browser tests skip saying why).

``DASHBOARD_SCREENSHOT=docs/dashboard.png`` makes the browser test save its screenshot there
(how the one in docs/ is made).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import signal
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from services.kernel import rpc
from services.kernel.identity import Caller, Role
from subsidy.v1 import cases_pb2, catalog_pb2, ledger_pb2
from subsidyctl import demo
from subsidyctl.dashboard.figures import yuan
from subsidyctl.localstack import LocalStack, Ports, free_base
from subsidyctl.stack import certs as identities
from subsidyctl.stack import free_port
from tests.support.browser import Browser, find_chromium
from tests.support.foreign_ca import foreign_certificate

POOL = "pingshan-2025"
SERVER_IDENTITY = Caller(Role.SERVICE, "dashboard")  # the HTTPS dashboard's own certificate
AVAILABLE = f'document.querySelector(\'[data-pool="{POOL}"] [data-field="available"]\')'


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The local stack with the demo campaign and its dashboard, as `make run` starts them."""
    s = LocalStack(
        tmp_path_factory.mktemp("dashboard") / "run",
        Ports(free_base()),
        durable=False,
        log=io.StringIO(),
    )
    s.start()
    try:
        asyncio.run(_seed(s))
        s.start_dashboard()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed once if missing and possible; skips only without one."""
    path, why = find_chromium()
    if path is None:
        pytest.skip(f"no headless browser for the dashboard test: {why}")
    return path


async def _seed(stack: LocalStack) -> None:
    client = demo.Client(stack.endpoints())
    try:
        await demo.seed(client, random.Random(), {**demo.load_demo(), "consumers": 0})
    finally:
        await client.close()


def _base(stack: LocalStack) -> str:
    return f"http://127.0.0.1:{stack.ports.dashboard}"


def _token(stack: LocalStack) -> str:
    return stack.dashboard_token_file.read_text().strip()


async def test_no_token_no_dashboard_and_the_token_becomes_a_cookie(stack: LocalStack) -> None:
    base, token = _base(stack), _token(stack)
    assert len(token) >= 43  # 32 random bytes
    assert stat.S_IMODE(stack.dashboard_token_file.stat().st_mode) == 0o600
    assert stack.dashboard_url == f"{base}/?token={token}"
    bearer = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        for path in ("/", "/api/snapshot", "/api/events", "/static/dashboard.js"):
            async with http.get(base + path) as r:
                assert r.status == 401, path
        async with http.get(f"{base}/?token={token[:-1]}x", allow_redirects=False) as r:
            assert r.status == 403
        async with http.get(f"{base}/api/snapshot", headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 403
        cookie = {f"subsidy-dashboard-{stack.ports.dashboard}": "x" * len(token)}
        async with http.get(f"{base}/api/snapshot", cookies=cookie) as r:
            assert r.status == 403
        # The login URL trades the token for a cookie and drops it from the address.
        async with http.get(stack.dashboard_url, allow_redirects=False) as r:
            assert r.status == 303
            assert r.headers["Location"] == "/"
            set_cookie = r.headers["Set-Cookie"]
            assert f"subsidy-dashboard-{stack.ports.dashboard}={token}" in set_cookie
            assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
        cookie = {f"subsidy-dashboard-{stack.ports.dashboard}": token}
        async with http.get(f"{base}/", cookies=cookie) as r:
            assert r.status == 200
            page = await r.text()
            assert "Fund monitoring" in page
            assert "http://" not in page and "https://" not in page  # nothing from elsewhere
            assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        snapshot = await _snapshot_with_pools(http, f"{base}/api/snapshot", bearer)
        assert POOL in {p["pool_id"] for p in snapshot["pools"]}
        # Read-only, and only for requests addressed to the loopback address.
        async with http.post(f"{base}/api/snapshot", headers=bearer) as r:
            assert r.status == 405
        async with http.get(
            f"{base}/api/snapshot", headers={**bearer, "Host": "rebound.example:80"}
        ) as r:
            assert r.status == 403
        async with http.get(f"{base}/static/dashboard.html", headers=bearer) as r:
            assert r.status == 404  # only the listed assets are served

    # A new run, a new token: the old one no longer opens anything.
    stack.kill("dashboard")
    stack.start_dashboard()
    assert _token(stack) != token
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/api/snapshot", headers=bearer) as r:
            assert r.status == 403


async def test_the_page_shows_the_campaign_and_updates_after_a_checkout(
    stack: LocalStack, chromium: str
) -> None:
    client = demo.Client(stack.endpoints())
    try:
        # Some history first, so the page has a burn-down and several categories to show.
        rng = random.Random(13)
        for sku, price_fen in (("demo-washer-g2", 500_000), ("demo-phone", 300_000)):
            await demo.checkout(client, rng, pool_id=POOL, sku=sku, price_fen=price_fen)
        before = await client.ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=POOL))
        async with Browser(chromium) as browser:
            page = await browser.new_page()
            await page.navigate(stack.dashboard_url)
            # The monitor asks the ledger every second: the page reaches the figure the ledger
            # answered after the history (a first snapshot may predate the last checkout).
            shown = yuan(before.available_fen)
            await page.wait_for(f"{AVAILABLE}?.textContent === {shown!r}")
            assert await page.evaluate("location.href") == _base(stack) + "/"
            ids = await page.evaluate(
                "[...document.querySelectorAll('[data-field=pool_id]')].map(e => e.textContent)"
            )
            assert POOL in ids
            # A mark the page would lose if it reloaded.
            await page.evaluate("window.stillTheSamePage = 'yes'")
            version = int(await page.evaluate("document.body.dataset.version"))

            result = await demo.checkout(
                client, rng, pool_id=POOL, sku="demo-fridge-g1", price_fen=1_200_000
            )
            after = yuan(result["budget_available_fen"])
            assert after != shown
            await page.wait_for(f"{AVAILABLE}?.textContent === {after!r}")
            assert await page.evaluate("window.stillTheSamePage") == "yes"
            assert int(await page.evaluate("document.body.dataset.version")) > version
            # The log's side caught up too: the capture, today's claim, the audit consumer.
            captured = (
                "document.querySelector('[data-pool] tr[data-outcome=captured] td:nth-child(2)')"
                "?.textContent"
            )
            assert int(await page.wait_for(captured)) >= 1
            claimed = (
                "document.querySelector('#claims tr[data-category=refrigerator] td:nth-child(2)')"
                "?.textContent"
            )
            await page.wait_for(f"Number({claimed}) >= 1")
            assert await page.evaluate(
                "document.querySelector('#lag [data-service=audit]') !== null"
            )
            assert await page.evaluate("document.getElementById('status').textContent") == "live"
            # A complaint about the order becomes an open case on the page.
            case = await _complain(client, str(result["order_id"]))
            row = f"""document.querySelector('#cases-table tr[data-case="{case}"]')"""
            await page.wait_for(f"{row} !== null || document.getElementById('errors').textContent")
            errors = await page.evaluate("document.getElementById('errors').textContent")
            assert errors == "", errors
            assert await page.evaluate(f"{row}.children[1].textContent") == "COMPLAINT"
            # A draft with a lower refrigerator cap, not approved: its what-if panel shows the
            # saving on the one refrigerator order so far (the washer and phone pay the same).
            draft = await _draft_lower_cap(client, "refrigerator", FRIDGE_CAP)
            saving = int(result["subsidy_fen"]) - FRIDGE_CAP
            assert saving > 0
            panel = f"""document.querySelector('#whatif [data-draft="{draft}"]')"""
            difference = f"{panel}?.querySelector('[data-field=difference]')?.textContent"
            shown_difference = await page.wait_for(difference)
            assert shown_difference == yuan(-saving)
            assert (
                await page.evaluate(f"{panel}.querySelector('[data-field=refused]').textContent")
                == "0"
            )
            assert await page.evaluate(f"{panel}.querySelectorAll('svg.chart').length") >= 2
            today = f"{panel}.querySelector('tr[data-day]:last-child td:nth-child(5)').textContent"
            assert await page.evaluate(today) == yuan(-saving)  # the fridge order is the last day's
            png = await page.screenshot()
    finally:
        await client.close()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    target = os.environ.get("DASHBOARD_SCREENSHOT")
    if target:
        await asyncio.to_thread(Path(target).write_bytes, png)


FRIDGE_CAP = 10_000  # 100 yuan, under what the demo policy pays for the 12,000-yuan fridge


async def _draft_lower_cap(client: demo.Client, category: str, cap_fen: int) -> str:
    """A draft (never approved) of the policy in force with ``category``'s cap lowered."""
    current = await client.catalog.GetPolicy(catalog_pb2.GetPolicyRequest())
    document = json.loads(current.policy_json)
    document["version"] = f"{document['version']}-lower-{category}"
    document["effective_from"] = "2095-01-01T00:00:00+08:00"
    for rule in document["categories"]:
        if rule["code"] == category:
            rule["cap_fen"] = cap_fen
    drafted = await client.catalog.DraftPolicy(
        catalog_pb2.DraftPolicyRequest(document=json.dumps(document), reason="what-if")
    )
    assert drafted.status == "DRAFT"
    return str(drafted.version)


async def _complain(client: demo.Client, order_id: str) -> str:
    """File a complaint about ``order_id`` as the demo platform, once the order has reached
    audit (until then it is UNKNOWN_ORDER); the case's id."""
    deadline = time.monotonic() + 30
    while True:
        try:
            filed = await client.cases.FileComplaint(
                cases_pb2.FileComplaintRequest(order_id=order_id, text="未收到货")
            )
            return str(filed.case_id)
        except grpc.aio.AioRpcError as err:
            info = rpc.error_info(err)
            if info is None or info.reason != "UNKNOWN_ORDER" or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def _snapshot_with_pools(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> dict[str, Any]:
    """The snapshot once the dashboard's first round of reads is in."""
    deadline = time.monotonic() + 30
    while True:
        async with http.get(url, headers=headers) as r:
            assert r.status == 200
            snapshot: dict[str, Any] = await r.json()
        if snapshot.get("pools") or time.monotonic() > deadline:
            return snapshot
        await asyncio.sleep(0.2)


def _https(identity: Path | None, ca: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if identity is not None:
        context.load_cert_chain(identity / "tls.crt", identity / "tls.key")
    return context


async def test_over_https_operators_and_auditors_log_in_with_their_certificate(
    stack: LocalStack, tmp_path: Path
) -> None:
    assert stack.bao is not None
    tls_dir = tmp_path / "dashboard-tls"
    identities.issue_to(stack.bao.client(), SERVER_IDENTITY, tls_dir, hosts=identities.LOOPBACK)
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "subsidyctl", "dashboard"),
        *("--listen", f"127.0.0.1:{port}", "--tls-dir", str(tls_dir)),
        *("--base-port", str(stack.ports.base)),
        *("--identity", str(stack.identity(identities.AUDITOR_DEMO))),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    ca = tls_dir / "ca.crt"
    url = f"https://127.0.0.1:{port}"
    try:
        await _until_healthy(f"{url}/healthz", _https(None, ca), proc)

        async def status(who: Caller | None) -> tuple[int, Any]:
            identity = stack.identity(who) if who is not None else None
            connector = aiohttp.TCPConnector(ssl=_https(identity, ca))
            async with aiohttp.ClientSession(connector=connector) as http:
                async with http.get(f"{url}/api/snapshot") as r:
                    body = await r.json() if r.status == 200 else await r.text()
                    return r.status, body

        code, _ = await status(identities.AUDITOR_DEMO)
        assert code == 200
        code, _ = await status(identities.OPERATOR_DEMO)
        assert code == 200
        code, text = await status(identities.PLATFORM_DEMO)
        assert (code, text.strip()) == (403, "platform certificates may not view the dashboard")
        code, text = await status(identities.APPROVER_DEMO)
        assert code == 403
        code, _ = await status(None)
        assert code == 401
        # An auditor's name on a certificate of another CA does not get past the handshake.
        impostor = tmp_path / "impostor"
        identities.write_identity(
            impostor,
            foreign_certificate(
                identities.AUDITOR_DEMO.spiffe_id,
                trusted_ca=ca.read_bytes(),
                chain_includes_ca=True,
            ),
        )
        connector = aiohttp.TCPConnector(ssl=_https(impostor, ca))
        async with aiohttp.ClientSession(connector=connector) as http:
            with pytest.raises(aiohttp.ClientError):
                async with http.get(f"{url}/api/snapshot") as r:
                    await r.read()
        # A renewed certificate (Vault Agent or cert-manager rewrite the files) is served to
        # new connections without a restart.
        first = await asyncio.to_thread(_served_certificate, port, ca)
        identities.issue_to(
            stack.bao.client(),
            Caller(Role.SERVICE, "dashboard"),
            tls_dir,
            hosts=identities.LOOPBACK,
        )
        renewed = (tls_dir / "tls.crt").read_bytes()
        deadline = time.monotonic() + 20
        while (served := await asyncio.to_thread(_served_certificate, port, ca)) == first:
            assert time.monotonic() < deadline, "the renewed certificate was not served"
            await asyncio.sleep(0.5)
        assert ssl.DER_cert_to_PEM_cert(served).encode().strip() in renewed
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, err.decode()


def _served_certificate(port: int, ca: Path) -> bytes:
    """The certificate the dashboard presents to a new connection (DER)."""
    import socket

    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


async def _until_healthy(
    url: str, context: ssl.SSLContext, proc: asyncio.subprocess.Process
) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as http:
        while time.monotonic() < deadline:
            assert proc.returncode is None, "the HTTPS dashboard exited"
            try:
                async with http.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError("the HTTPS dashboard did not answer")


@pytest.mark.slow
async def test_make_run_prints_the_dashboard_url_and_it_logs_in(tmp_path: Path) -> None:
    """`subsidyctl up --seed-demo` (make run) prints `dashboard: URL`; the URL logs in."""
    base = free_base()
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "subsidyctl", "up", "--seed-demo"),
        *("--run-dir", str(tmp_path / "run"), "--base-port", str(base)),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    assert proc.stdout is not None
    url = ""
    try:
        deadline = time.monotonic() + 180
        while not url:
            line = await asyncio.wait_for(proc.stdout.readline(), deadline - time.monotonic())
            assert line, "up exited before printing the dashboard's URL"
            if line.startswith(b"dashboard: "):
                url = line.decode().removeprefix("dashboard: ").strip()
        assert url.startswith(f"http://127.0.0.1:{Ports(base).dashboard}/?token=")
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.get(url) as r:  # follows the redirect, with the cookie
                assert r.status == 200
                assert str(r.url) == f"http://127.0.0.1:{Ports(base).dashboard}/"
            snapshot = await _snapshot_with_pools(http, str(r.url) + "api/snapshot", {})
            assert POOL in {p["pool_id"] for p in snapshot["pools"]}
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 60)
    assert proc.returncode == 0


async def test_a_service_down_is_reported_and_the_last_figures_kept(stack: LocalStack) -> None:
    """The ledger killed: the page says so and keeps the pool's last figures (marked stale);
    back up, the figures are live again. The dashboard itself never stops."""
    url, headers = f"{_base(stack)}/api/snapshot", {"Authorization": f"Bearer {_token(stack)}"}
    async with aiohttp.ClientSession() as http:
        live = await _snapshot_with_pools(http, url, headers)
        [pool] = [p for p in live["pools"] if p["pool_id"] == POOL]
        assert pool["stale"] is False
        stack.kill("ledger")
        try:
            down = await _snapshot_until(
                http, url, headers, lambda s: any("ledger" in e for e in s["errors"])
            )
            [stale] = [p for p in down["pools"] if p["pool_id"] == POOL]
            assert stale["stale"] is True
            assert stale["available"] == pool["available"]
        finally:
            stack.respawn("ledger")
        back = await _snapshot_until(
            http, url, headers, lambda s: not s["errors"] and bool(s["pools"])
        )
        assert [p["stale"] for p in back["pools"] if p["pool_id"] == POOL] == [False]


async def _snapshot_until(
    http: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    done: Callable[[dict[str, Any]], bool],
) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        async with http.get(url, headers=headers) as r:
            assert r.status == 200
            snapshot: dict[str, Any] = await r.json()
        if done(snapshot):
            return snapshot
        assert time.monotonic() < deadline, f"never came: {snapshot.get('errors')}"
        await asyncio.sleep(0.3)
