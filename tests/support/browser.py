"""A real headless Chromium for browser tests, driven over the Chrome DevTools protocol.

:func:`find_chromium` finds Debian's ``chromium`` (``which chromium``) or, when running as root
where apt works, installs it once (a few minutes the first time); it returns None, with the
reason, only when no browser can be had, so a test skips saying why. :class:`Browser` starts it
headless with a private profile and :class:`Page` speaks CDP over its WebSocket (aiohttp's
client, the library the dashboard already depends on): navigate, evaluate, screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

NAMES = ("chromium", "chromium-browser", "google-chrome")
APT_TIMEOUT_S = 900


def _which() -> str | None:
    for name in NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def find_chromium() -> tuple[str | None, str]:
    """The browser's path, or None and why there is none (installing it with apt-get first
    when running as root on a machine with apt)."""
    found = _which()
    if found:
        return found, ""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None, "no chromium on PATH and cannot install it (not root, or no apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for command in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"],
        ):
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S
            )
            if done.returncode != 0:
                return None, f"{' '.join(command)} failed: {done.stderr.strip()[-300:]}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"installing chromium with apt-get failed: {exc}"
    found = _which()
    return (found, "") if found else (None, "apt-get installed chromium but it is not on PATH")


class CdpError(RuntimeError):
    """The browser answered a command with an error, or went away."""


class Page:
    """One tab, over its DevTools WebSocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run one CDP command and return its result (events on the way are dropped)."""
        call_id = next(self._ids)
        command = {"id": call_id, "method": method, "params": params or {}}
        await self.ws.send_str(json.dumps(command))
        while True:
            message = await self.ws.receive(timeout=30)
            if message.type != aiohttp.WSMsgType.TEXT:
                raise CdpError(f"the browser closed the connection during {method}")
            answer = json.loads(message.data)
            if answer.get("id") != call_id:
                continue
            if "error" in answer:
                raise CdpError(f"{method}: {answer['error']}")
            result: dict[str, Any] = answer.get("result", {})
            return result

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = await self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}
        )
        if "exceptionDetails" in result:
            raise CdpError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, *, within_s: float = 30.0) -> Any:
        """Poll ``expression`` until it is truthy; returns its value (fails after ``within_s``)."""
        deadline = time.monotonic() + within_s
        last: Any = None
        while time.monotonic() < deadline:
            with contextlib.suppress(CdpError):  # mid-navigation the context may be gone
                last = await self.evaluate(expression)
                if last:
                    return last
            await asyncio.sleep(0.2)
        raise AssertionError(f"not true after {within_s:.0f} s: {expression} (last: {last!r})")

    async def screenshot(self, *, width: int = 1400, height: int = 0) -> bytes:
        """A PNG of the page (``height`` 0: the whole page's height)."""
        metrics = {"width": width, "height": height or 900, "deviceScaleFactor": 1, "mobile": False}
        await self.send("Emulation.setDeviceMetricsOverride", metrics)
        if not height:  # measured at the final width
            await asyncio.sleep(0.3)
            metrics["height"] = int(await self.evaluate("document.documentElement.scrollHeight"))
            await self.send("Emulation.setDeviceMetricsOverride", metrics)
        shot = await self.send("Page.captureScreenshot", {"format": "png"})
        return base64.b64decode(shot["data"])


class Browser:
    """A headless Chromium with its own throwaway profile; ``async with`` starts and stops it."""

    def __init__(self, executable: str) -> None:
        self.executable = executable
        # Chromium's helpers (crashpad) may still write into the profile as it is removed.
        self._profile = tempfile.TemporaryDirectory(
            prefix="subsidy-chromium-", ignore_cleanup_errors=True
        )
        self._proc: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0

    async def __aenter__(self) -> Browser:
        profile = Path(self._profile.name)
        self._proc = await asyncio.create_subprocess_exec(
            *[
                self.executable,
                "--headless=new",
                "--no-sandbox",  # tests run as root in a container, where the sandbox cannot
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if self._proc.returncode is not None or time.monotonic() > deadline:
                raise CdpError("chromium did not open its DevTools port")
            await asyncio.sleep(0.1)
        self.port = int(port_file.read_text().split()[0])
        self._session = aiohttp.ClientSession()
        return self

    async def new_page(self) -> Page:
        """A fresh tab."""
        assert self._session is not None
        base = f"http://127.0.0.1:{self.port}"
        async with self._session.put(f"{base}/json/new?about:blank") as answer:
            target = await answer.json(content_type=None)
        ws = await self._session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        page = Page(ws)
        await page.send("Page.enable")
        await page.send("Runtime.enable")
        return page

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            try:
                await asyncio.wait_for(self._proc.wait(), 10)
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        if self._proc is not None:  # and every helper process it started (its own session)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        self._profile.cleanup()
