"""The fund-detail ledger (资金明细台账), from the ledger service.

  subsidyctl ledger funds [--pool P] [--source S] [--out DIR] [--json]

Every movement of every funding source (funded, scheduled, tranche released, reserved,
captured, released, refunded, clawback), in each pool's stream order, with the source's
balances after it (``GetFundLedger``: the ledger's own events through the fold the auditor
replays, services/kernel/contract/fundledger.py). Prints one JSON object (``movements``, the
rows; ``count``); on a terminal also a table on stderr; ``--out DIR`` writes ``fund-ledger.csv``
and ``fund-ledger.xlsx`` (formula-safe). Operators and auditors may read it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from services.kernel import rpc
from services.kernel.contract.fundledger import HEADERS
from services.kernel.contract.spreadsheet import csv_bytes, xlsx_bytes
from subsidy.v1 import ledger_pb2, ledger_pb2_grpc

from ..stack.certs import AUDITOR_DEMO
from .budget import LedgerOpt
from .common import AuditorIdentityOpt, JsonOpt, emit, identity, local_address, stderr_console

app = typer.Typer(
    name="ledger",
    help="The fund-detail ledger: every movement of every funding source.",
    no_args_is_help=True,
)
PAGE = 10_000
# The XLSX's dates: a fixed instant, so the same rows give the same bytes.
PINNED = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
SHOWN = ("pool_id", "source", "kind", "amount_fen", "order_id", "available_fen", "spent_fen")


def row(m: ledger_pb2.FundMovement) -> dict[str, Any]:
    """One movement as the JSON shows it, in the fund ledger's column order."""
    out: dict[str, Any] = {}
    for name in HEADERS:
        value = getattr(m, name)
        out[name] = value.ToJsonString() if name == "occurred_at" else value
    return out


async def _all(
    address: str, who: Any, request: ledger_pb2.GetFundLedgerRequest
) -> list[ledger_pb2.FundMovement]:
    channel = rpc.channel(address or local_address("ledger"), who, deadline_s=60)
    try:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        rows: list[ledger_pb2.FundMovement] = []
        while True:
            page = await stub.GetFundLedger(request)
            rows += page.movements
            if not page.next_start:
                return rows
            request.start = page.next_start
    finally:
        await channel.close()


@app.command()
def funds(
    pool: Annotated[str, typer.Option(help="one pool's only")] = "",
    source: Annotated[
        str | None, typer.Option(help="one funding source's only (district, …)")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="also write fund-ledger.csv and .xlsx here")
    ] = None,
    ledger: LedgerOpt = "",
    identity_dir: AuditorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Every movement of every funding source, with the source's balances after it."""
    who = identity(identity_dir, AUDITOR_DEMO)
    request = ledger_pb2.GetFundLedgerRequest(pool_id=pool, limit=PAGE)
    if source is not None:
        request.source = source
    movements = [row(m) for m in asyncio.run(_all(ledger, who, request))]
    answer: dict[str, Any] = {"count": len(movements), "movements": movements}
    if out is not None:
        table = [tuple(m[h] for h in HEADERS) for m in movements]
        out.mkdir(parents=True, exist_ok=True)
        csv_path, xlsx_path = out / "fund-ledger.csv", out / "fund-ledger.xlsx"
        csv_path.write_bytes(csv_bytes(HEADERS, table))
        xlsx_path.write_bytes(xlsx_bytes([("fund ledger", HEADERS, table)], created=PINNED))
        answer |= {"csv": str(csv_path), "xlsx": str(xlsx_path)}
    emit(answer)
    console = stderr_console()
    if not json_only and console.is_terminal:
        t = Table(*SHOWN, title="fund-detail ledger")
        for m in movements:
            t.add_row(*(str(m[c]) for c in SHOWN))
        console.print(t)
