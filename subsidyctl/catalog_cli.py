"""Catalog commands for operators, answered by a running catalog service.

  python -m subsidyctl.catalog_cli quote --category CODE [--grade G] --price-fen N [--policy V]
  python -m subsidyctl.catalog_cli import FILE [--only-good-rows] [--actor ID] [--reason TEXT]
  python -m subsidyctl.catalog_cli sales-ledger [--format csv|xlsx] [--merchant ID] [--out FILE]
  python -m subsidyctl.catalog_cli pause|resume (--category CODE | --campaign) --reason TEXT
  python -m subsidyctl.catalog_cli policy draft FILE --reason TEXT
  python -m subsidyctl.catalog_cli policy approve VERSION --reason TEXT

Every command takes ``--catalog HOST:PORT`` (default: $SUBSIDY_CATALOG_ADDR) and the acting
person as ``--actor`` (default: $SUBSIDY_ACTOR, else the login name). Answers are JSON on
stdout; a refused call prints ``{"error": {...}}`` with the status, reason and field on stderr
and exits 2; an unreachable catalog exits 3.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import grpc

from services.kernel import rpc
from subsidy.v1 import catalog_pb2, catalog_pb2_grpc, common_pb2

EXIT_REFUSED = 2
EXIT_UNREACHABLE = 3
GRADES = ("none", "0", "1", "2", "3", "4", "5")


def _grade(value: str) -> int:
    if value.lower() not in GRADES:
        raise argparse.ArgumentTypeError("a grade 1..5, or 0 / none for no efficiency grade")
    return 0 if value.lower() == "none" else int(value)


def _fail(err: grpc.aio.AioRpcError) -> int:
    code, info = err.code(), rpc.error_info(err)
    failure = {
        "code": code.name,
        "reason": info.reason if info else "",
        "field": info.metadata.get("field", "") if info else "",
        "message": err.details() or "",
    }
    print(json.dumps({"error": failure}, ensure_ascii=False), file=sys.stderr)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return EXIT_UNREACHABLE
    return EXIT_REFUSED


def _run(
    args: argparse.Namespace,
    call: Callable[[catalog_pb2_grpc.CatalogServiceAsyncStub], Awaitable[int]],
    *,
    deadline_s: float = 10.0,
) -> int:
    # Default: the catalog of the local stack (`make run`) on its base port.
    base = int(os.environ.get("SUBSIDY_BASE_PORT", "7100"))
    address = args.catalog or os.environ.get("SUBSIDY_CATALOG_ADDR", f"127.0.0.1:{base + 1}")

    async def go() -> int:
        channel = rpc.channel(address, deadline_s=deadline_s)
        try:
            return await call(catalog_pb2_grpc.CatalogServiceStub(channel))
        except grpc.aio.AioRpcError as err:
            return _fail(err)
        finally:
            await channel.close()

    return asyncio.run(go())


def _actor(
    args: argparse.Namespace, kind: int = common_pb2.Actor.KIND_OPERATOR
) -> common_pb2.Actor:
    who = args.actor or os.environ.get("SUBSIDY_ACTOR") or getpass.getuser()
    return common_pb2.Actor(kind=kind, id=who)  # type: ignore[arg-type]


def _print(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, ensure_ascii=False))


# --------------------------------------------------------------------------------------------
# quote


def quote_command(args: argparse.Namespace) -> int:
    """Print one JSON object: eligible, subsidy_fen, rate_bp, cap_fen, policy_version, reasons.

    ``args`` needs ``category``, ``grade`` (0 = none), ``price_fen``, ``policy`` ("" = in force)
    and ``catalog``; the answer comes from the running catalog service's Quote RPC.
    """

    async def call(stub: catalog_pb2_grpc.CatalogServiceAsyncStub) -> int:
        q = await stub.Quote(
            catalog_pb2.QuoteRequest(
                category=args.category,
                grade=args.grade or 0,
                price_fen=args.price_fen,
                policy_version=args.policy or "",
            )
        )
        _print(
            {
                "eligible": q.eligible,
                "subsidy_fen": q.subsidy_fen,
                "rate_bp": q.rate_bp,
                "cap_fen": q.cap_fen,
                "policy_version": q.policy_version,
                "reasons": list(q.reasons),
            }
        )
        return 0

    return _run(args, call)


def add_quote_arguments(parser: argparse.ArgumentParser) -> None:
    """The quote command's flags (shared with ``subsidyctl quote``)."""
    parser.add_argument("--category", required=True, help="category code, e.g. refrigerator")
    parser.add_argument(
        "--grade", type=_grade, default=0, help="efficiency grade 1..5; omit or 0/none for none"
    )
    parser.add_argument("--price-fen", type=int, required=True, help="final price in fen")
    parser.add_argument("--policy", default="", help="policy version (default: in force now)")
    _add_catalog(parser)


# --------------------------------------------------------------------------------------------
# import


class ProgressBar:
    """A progress bar on stderr: redrawn in place on a terminal, a line per phase otherwise."""

    def __init__(self, out: TextIO = sys.stderr, width: int = 30) -> None:
        self.out = out
        self.width = width
        self.tty = out.isatty()
        self._last: tuple[str, int] = ("", -1)

    def update(self, phase: str, done: int, total: int) -> None:
        pct = 100 * done // total if total else 100
        if self.tty:
            filled = self.width * pct // 100
            bar = "#" * filled + "." * (self.width - filled)
            self.out.write(f"\r{phase.lower():<8} [{bar}] {pct:3d}% {done}/{total}")
            if phase == "DONE":
                self.out.write("\n")
        elif (phase, pct // 25) != self._last:  # a line per phase and quarter
            self.out.write(f"{phase.lower()}: {done}/{total} rows ({pct}%)\n")
            self._last = (phase, pct // 25)
        self.out.flush()


def import_command(args: argparse.Namespace) -> int:
    """Import a product CSV; exit 0 if applied (all, or the good rows as asked), 1 if not."""
    path = Path(args.file)
    try:
        data = path.read_bytes()
    except OSError as exc:
        print(f"catalog_cli: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return EXIT_REFUSED
    bar = ProgressBar()

    async def call(stub: catalog_pb2_grpc.CatalogServiceAsyncStub) -> int:
        result: catalog_pb2.ImportResult | None = None
        request = catalog_pb2.ImportProductsRequest(
            csv=data,
            only_good_rows=args.only_good_rows,
            actor=_actor(args),
            reason=args.reason or f"import {path.name}",
            file_name=path.name,
        )
        async for progress in stub.ImportProducts(request, timeout=args.timeout):
            bar.update(progress.phase, progress.done, progress.total)
            if progress.HasField("result"):
                result = progress.result
        if result is None:  # pragma: no cover - the server always ends with a result
            print("catalog_cli: the import ended without a result", file=sys.stderr)
            return EXIT_UNREACHABLE
        for row in result.rejected:
            print(f"line {row.line}: {row.reason}: {row.message}", file=sys.stderr)
        if result.outcome == "APPLIED_NOTHING":
            print(
                f"{len(result.rejected)} bad row(s): nothing imported "
                "(fix them, or pass --only-good-rows)",
                file=sys.stderr,
            )
        elif result.outcome == "APPLIED_GOOD_ROWS":
            print(
                f"imported {result.applied} row(s); {len(result.rejected)} bad row(s) NOT imported",
                file=sys.stderr,
            )
        _print(
            {
                "outcome": result.outcome,
                "import_id": result.import_id,
                "total_rows": result.total_rows,
                "applied": result.applied,
                "rejected": [
                    {"line": r.line, "field": r.field, "reason": r.reason, "message": r.message}
                    for r in result.rejected
                ],
                "file_sha256": result.file_sha256,
            }
        )
        return 1 if result.outcome == "APPLIED_NOTHING" else 0

    return _run(args, call, deadline_s=args.timeout)


# --------------------------------------------------------------------------------------------
# sales ledger, switches, policy


def sales_ledger_command(args: argparse.Namespace) -> int:
    async def call(stub: catalog_pb2_grpc.CatalogServiceAsyncStub) -> int:
        got = await stub.ExportSalesLedger(
            catalog_pb2.ExportSalesLedgerRequest(format=args.format, merchant_id=args.merchant)
        )
        out = Path(args.out or got.filename)
        await asyncio.to_thread(out.write_bytes, got.content)
        _print({"file": str(out), "bytes": len(got.content), "content_type": got.content_type})
        return 0

    return _run(args, call, deadline_s=60)


def switch_command(args: argparse.Namespace) -> int:
    pause = args.command == "pause"

    async def call(stub: catalog_pb2_grpc.CatalogServiceAsyncStub) -> int:
        actor = _actor(args)
        if args.campaign:
            request = catalog_pb2.CampaignSwitchRequest(actor=actor, reason=args.reason)
            method = stub.PauseCampaign if pause else stub.ResumeCampaign
            s = await method(request)
        else:
            creq = catalog_pb2.CategorySwitchRequest(
                category=args.category, actor=actor, reason=args.reason
            )
            s = await (stub.PauseCategory if pause else stub.ResumeCategory)(creq)
        _print(
            {
                "campaign_paused": s.campaign_paused,
                "paused_categories": [c.category for c in s.paused_categories],
            }
        )
        return 0

    return _run(args, call)


def policy_command(args: argparse.Namespace) -> int:
    document = ""
    if args.action == "draft":
        try:
            document = Path(args.target).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            print(f"catalog_cli: cannot read {args.target}: {exc}", file=sys.stderr)
            return EXIT_REFUSED

    async def call(stub: catalog_pb2_grpc.CatalogServiceAsyncStub) -> int:
        if args.action == "draft":
            v = await stub.DraftPolicy(
                catalog_pb2.DraftPolicyRequest(
                    document=document,
                    actor=_actor(args),
                    reason=args.reason,
                )
            )
        else:
            v = await stub.ApprovePolicy(
                catalog_pb2.ApprovePolicyRequest(
                    version=args.target,
                    actor=_actor(args, common_pb2.Actor.KIND_APPROVER),
                    reason=args.reason,
                )
            )
        _print(
            {
                "version": v.version,
                "status": v.status,
                "effective_from": v.effective_from.ToJsonString(),
                "drafted_by": v.drafted_by,
                "approved_by": v.approved_by,
                "in_force": v.in_force,
            }
        )
        return 0

    return _run(args, call)


# --------------------------------------------------------------------------------------------


def _add_catalog(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--catalog",
        default="",
        help="catalog service HOST:PORT (default $SUBSIDY_CATALOG_ADDR, else the local stack's)",
    )


def _add_actor(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--actor", default="", help="who acts (default $SUBSIDY_ACTOR or login)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m subsidyctl.catalog_cli",
        description="Catalog commands, answered by a running catalog service.",
    )
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the catalog commands (also under ``subsidyctl``)."""

    quote = sub.add_parser("quote", help="the subsidy for one item under a policy version")
    add_quote_arguments(quote)
    quote.set_defaults(func=quote_command)

    imp = sub.add_parser("import", help="bulk-import products from a CSV file")
    imp.add_argument("file")
    imp.add_argument(
        "--only-good-rows",
        action="store_true",
        help="apply the good rows even if some are bad (default: a bad row stops the file)",
    )
    imp.add_argument("--reason", default="", help="why (default: import FILE)")
    imp.add_argument("--timeout", type=float, default=300.0, help="seconds (default 300)")
    _add_actor(imp)
    _add_catalog(imp)
    imp.set_defaults(func=import_command)

    ledger = sub.add_parser("sales-ledger", help="export the sales ledger (销售台账)")
    ledger.add_argument("--format", choices=("csv", "xlsx"), default="csv")
    ledger.add_argument("--merchant", default="", help="one merchant only")
    ledger.add_argument("--out", default="", help="file to write (default sales-ledger.FORMAT)")
    _add_catalog(ledger)
    ledger.set_defaults(func=sales_ledger_command)

    for verb in ("pause", "resume"):
        sw = sub.add_parser(verb, help=f"{verb} one category or the whole campaign")
        which = sw.add_mutually_exclusive_group(required=True)
        which.add_argument("--category", default="")
        which.add_argument("--campaign", action="store_true")
        sw.add_argument("--reason", required=True)
        _add_actor(sw)
        _add_catalog(sw)
        sw.set_defaults(func=switch_command)

    policy = sub.add_parser("policy", help="draft a policy version, or approve someone's draft")
    policy.add_argument("action", choices=("draft", "approve"))
    policy.add_argument("target", help="draft: the policy file; approve: the version")
    policy.add_argument("--reason", required=True)
    _add_actor(policy)
    _add_catalog(policy)
    policy.set_defaults(func=policy_command)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
