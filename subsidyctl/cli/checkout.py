"""``subsidyctl checkout``: one subsidised checkout against a running stack, as a platform runs
it (register the consumer, claim, reserve, capture); prints one JSON line with the order, the
subsidy, the budget left and the trace id. The platform's calls present ``--identity DIR``
(default: the demo platform, RUN_DIR/certs/platform-demo); enrolling the made-up consumer at the
identity simulator is the demo operator's.

Its spans are written to the local run folder's traces ($SUBSIDY_RUN_DIR, default ``run``) when
that exists, so they join the services' in one trace.
"""

from __future__ import annotations

import asyncio
import random
from typing import Annotated, Any

import typer

from services.kernel.telemetry import configure_tracing

from .. import demo
from .common import (
    DEFAULT_BASE_PORT,
    DEFAULT_RUN_DIR,
    BasePortOpt,
    JsonOpt,
    PlatformIdentityOpt,
    RunDirOpt,
    demo_identities,
    emit,
)
from .stack import PANEL, endpoints

app = typer.Typer()


@app.command(rich_help_panel=PANEL)
def checkout(
    base_port: BasePortOpt = DEFAULT_BASE_PORT,
    pool: Annotated[str, typer.Option(help="the budget pool")] = "pingshan-2025",
    sku: Annotated[str, typer.Option(help="the product")] = "demo-fridge-g1",
    price_fen: Annotated[int, typer.Option(help="the unit price in fen")] = 1_200_000,
    run_dir: RunDirOpt = DEFAULT_RUN_DIR,
    identity_dir: PlatformIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """One subsidised checkout against a running stack, as a platform."""
    identities = demo_identities(run_dir, identity_dir)
    traces = run_dir / "traces"
    configure_tracing("platform", trace_file=traces / "platform.jsonl" if traces.is_dir() else None)

    async def run() -> dict[str, Any]:
        client = demo.Client(endpoints(base_port), identities)
        try:
            return await demo.checkout(
                client, random.Random(), pool_id=pool, sku=sku, price_fen=price_fen
            )
        finally:
            await client.close()

    emit(asyncio.run(run()))
