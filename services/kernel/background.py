"""Loops a service runs beside its server until the runtime's stop event is set (a policy
refresh, an expiry sweep): one way to wait, retry and stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from .faults import transient_part


async def pause(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less if ``stop`` is set meanwhile (shutdown never waits a round)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def every(
    stop: asyncio.Event,
    seconds: float,
    step: Callable[[], Awaitable[object]],
    *,
    log: logging.Logger,
    failure: str,
    alert: str,
) -> None:
    """Run ``step`` every ``seconds`` until ``stop`` is set.

    A step that raises is logged as ``failure`` with ``extra={"alert": alert}`` (what the
    alert rules match) and tried again next round: a background job must outlive a database
    or network blip rather than end the loop. An outage of a part (services.kernel.faults) is
    one warning line per outage, without a traceback: the health watch reports it itself.
    """
    waiting_for: str | None = None  # the part that is down, logged once per outage
    while not stop.is_set():
        try:
            await step()
        except Exception as exc:
            part = transient_part(exc)
            if part is None:
                log.exception(failure, extra={"alert": alert})
            elif part != waiting_for:
                log.warning("%s: the %s is down; retrying until it is back", failure, part)
            waiting_for = part
        else:
            waiting_for = None
        await pause(stop, seconds)
