"""Catalog commands, answered by a running catalog service: quote, import, sales-ledger.

  subsidyctl quote --category CODE [--grade G] --price-fen N [--policy V]
  subsidyctl import FILE.csv [--only-good-rows] [--reason TEXT] [--timeout S]
  subsidyctl sales-ledger [--format csv|xlsx] [--merchant ID] [--out FILE]

Each takes ``--catalog HOST:PORT`` (default $SUBSIDY_CATALOG_ADDR, else the local stack's) and
``--identity DIR`` (default: the demo platform for ``quote``, the demo operator for the others)
and prints one JSON object on stdout. ``import`` shows its progress on stderr (a Rich bar on a
terminal, a line per phase and quarter otherwise) and exits 1 when nothing was imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.table import Table

from subsidy.v1 import catalog_pb2, catalog_pb2_grpc

from ..stack.certs import OPERATOR_DEMO, PLATFORM_DEMO
from .common import (
    EXIT_NO,
    EXIT_OK,
    EXIT_UNREACHABLE,
    CatalogOpt,
    Failure,
    JsonOpt,
    OperatorIdentityOpt,
    PlatformIdentityOpt,
    actor_of,
    catalog_call,
    emit,
    identity,
    note,
    pick,
    stderr_console,
)
from .progress import PhaseProgress

app = typer.Typer()
PANEL = "Catalog"
GRADES = ("none", "0", "1", "2", "3", "4", "5")


def parse_grade(value: str) -> int:
    """An efficiency grade 1..5; ``0`` or ``none`` for a product without one."""
    if str(value).lower() not in GRADES:
        raise typer.BadParameter("a grade 1..5, or 0 / none for no efficiency grade")
    return 0 if str(value).lower() == "none" else int(value)


# --------------------------------------------------------------------------------------------
# quote


QUOTE_FIELDS = ("eligible", "subsidy_fen", "rate_bp", "cap_fen", "policy_version", "reasons")


@app.command(rich_help_panel=PANEL)
def quote(
    category: Annotated[str, typer.Option(help="category code, e.g. refrigerator")],
    price_fen: Annotated[int, typer.Option(help="final price in fen")],
    grade: Annotated[
        int,
        typer.Option(parser=parse_grade, help="efficiency grade 1..5; omit, 0 or none for none"),
    ] = 0,
    policy: Annotated[str, typer.Option(help="policy version (default: in force now)")] = "",
    catalog: CatalogOpt = "",
    identity_dir: PlatformIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """The subsidy for one item under a policy version."""

    request = catalog_pb2.QuoteRequest(
        category=category, grade=grade, price_fen=price_fen, policy_version=policy
    )
    who = identity(identity_dir, PLATFORM_DEMO)
    emit(pick(catalog_call(catalog, who, lambda stub: stub.Quote(request)), *QUOTE_FIELDS))


# --------------------------------------------------------------------------------------------
# import


def import_answer(result: catalog_pb2.ImportResult) -> dict[str, Any]:
    return {
        **pick(result, "outcome", "import_id", "total_rows", "applied"),
        "rejected": [pick(r, "line", "field", "reason", "message") for r in result.rejected],
        "file_sha256": result.file_sha256,
    }


def tell_rejected(result: catalog_pb2.ImportResult, console: Console | None = None) -> None:
    """The bad rows (a table on a terminal) and what became of the file, on stderr."""
    console = console or stderr_console()
    if result.rejected and console.is_terminal:
        table = Table("line", "field", "reason", "message", title="rows not imported")
        for r in result.rejected:
            table.add_row(str(r.line), r.field, r.reason, r.message)
        console.print(table)
    else:
        for r in result.rejected:
            note(f"line {r.line}: {r.reason}: {r.message}")
    if result.outcome == "APPLIED_NOTHING":
        note(
            f"{len(result.rejected)} bad row(s): nothing imported "
            "(fix them, or pass --only-good-rows)"
        )
    elif result.outcome == "APPLIED_GOOD_ROWS":
        note(f"imported {result.applied} row(s); {len(result.rejected)} bad row(s) NOT imported")


@app.command("import", rich_help_panel=PANEL)
def import_products(
    file: Annotated[Path, typer.Argument(help="the product CSV (UTF-8, header row)")],
    only_good_rows: Annotated[
        bool,
        typer.Option(
            help="apply the good rows even if some are bad (default: a bad row stops the file)"
        ),
    ] = False,
    reason: Annotated[str, typer.Option(help="why (default: import FILE)")] = "",
    timeout: Annotated[float, typer.Option(help="seconds", min=0.0)] = 300.0,
    catalog: CatalogOpt = "",
    identity_dir: OperatorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Bulk-import products from a CSV file: all or nothing, or only the good rows."""
    raise typer.Exit(
        run_import(
            file,
            only_good_rows=only_good_rows,
            reason=reason,
            timeout=timeout,
            identity_dir=identity_dir,
            catalog=catalog,
            json_only=json_only,
        )
    )


def run_import(
    file: Path,
    *,
    only_good_rows: bool,
    reason: str,
    timeout: float,
    identity_dir: Path | None,
    catalog: str,
    json_only: bool,
) -> int:
    """Exit 0 if applied (all rows, or the good rows as asked), 1 if nothing was."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise Failure(f"cannot read {file}: {exc.strerror}") from None
    who = identity(identity_dir, OPERATOR_DEMO)
    request = catalog_pb2.ImportProductsRequest(
        csv=data,
        only_good_rows=only_good_rows,
        actor=actor_of(who),
        reason=reason or f"import {file.name}",
        file_name=file.name,
    )

    async def call(stub: catalog_pb2_grpc.CatalogServiceAsyncStub) -> catalog_pb2.ImportResult:
        result: catalog_pb2.ImportResult | None = None
        with PhaseProgress(quiet=json_only) as bar:
            async for progress in stub.ImportProducts(request, timeout=timeout):
                bar.update(progress.phase, progress.done, progress.total)
                if progress.HasField("result"):
                    result = progress.result
        if result is None:  # pragma: no cover - the server always ends with a result
            raise Failure("the import ended without a result", EXIT_UNREACHABLE)
        return result

    result = catalog_call(catalog, who, call, deadline_s=timeout)
    if not json_only:
        tell_rejected(result)
    emit(import_answer(result))
    return EXIT_NO if result.outcome == "APPLIED_NOTHING" else EXIT_OK


# --------------------------------------------------------------------------------------------
# sales ledger


@app.command("sales-ledger", rich_help_panel=PANEL)
def sales_ledger(
    fmt: Annotated[Literal["csv", "xlsx"], typer.Option("--format", help="file format")] = "csv",
    merchant: Annotated[str, typer.Option(help="one merchant only")] = "",
    out: Annotated[
        str, typer.Option(help="file to write (default: sales-ledger.FORMAT)", show_default=False)
    ] = "",
    catalog: CatalogOpt = "",
    identity_dir: OperatorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Export the sales ledger (销售台账) as CSV or XLSX."""

    request = catalog_pb2.ExportSalesLedgerRequest(format=fmt, merchant_id=merchant)
    who = identity(identity_dir, OPERATOR_DEMO)
    got = catalog_call(catalog, who, lambda stub: stub.ExportSalesLedger(request), deadline_s=60)
    path = Path(out or got.filename)
    try:
        path.write_bytes(got.content)
    except OSError as exc:
        raise Failure(f"cannot write {path}: {exc.strerror}") from None
    emit({"file": str(path), "bytes": len(got.content), "content_type": got.content_type})
