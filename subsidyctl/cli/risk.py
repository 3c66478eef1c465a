"""Real-time risk control from the command line, against a running eligibility service (which
owns the rules and lists). Every change is maker-checker: an operator proposes, a different
approver approves, and only then is it in force (on every replica within a second).

  subsidyctl risk rules                                  the rule set in force, and pending changes
  subsidyctl risk rules propose FILE --reason TEXT       a new rule-set version (YAML or JSON)
  subsidyctl risk lists [--list block] [--kind device]   the live block and allow entries
  subsidyctl risk lists add KIND VALUE --list block --days N --reason TEXT
  subsidyctl risk lists remove ENTRY_ID --reason TEXT
  subsidyctl risk approve CHANGE_ID --reason TEXT        (the checker: an approver)
  subsidyctl risk decisions [--outcome block] [--status OPEN] [--limit N]
  subsidyctl risk lift DECISION_ID --reason TEXT [--exempt-for-s N]

Who proposes, approves, lifts or reads is the certificate's identity (default: the demo operator,
approver or auditor). Each prints one JSON object; with a terminal, a table on stderr too. A
rule-set document is ``{"rules": [...]}``, each rule as docs/operations.md ("Risk control") shows;
a list entry's value (a device id, an address) is sent once and kept only as its blind index.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml
from google.protobuf import json_format
from rich.table import Table

from services.kernel import rpc, tls
from subsidy.v1 import risk_pb2, risk_pb2_grpc

from ..stack.certs import APPROVER_DEMO, AUDITOR_DEMO, OPERATOR_DEMO
from .common import (
    ApproverIdentityOpt,
    AuditorIdentityOpt,
    Failure,
    JsonOpt,
    OperatorIdentityOpt,
    ReasonOpt,
    emit,
    identity,
    local_address,
    stderr_console,
)

T = TypeVar("T")
EligibilityOpt = Annotated[
    str, typer.Option(help="eligibility service HOST:PORT (default: the local stack's)")
]
app = typer.Typer(
    name="risk",
    help="Risk rules, block and allow lists, and decisions: read, propose, approve, lift.",
    no_args_is_help=True,
)
rules_app = typer.Typer(name="rules", help="The rule set in force; propose a new version.")
lists_app = typer.Typer(name="lists", help="The block and allow lists; propose a change.")
app.add_typer(rules_app)
app.add_typer(lists_app)


def risk_call(
    address: str,
    who: tls.CertificateSource,
    call: Callable[[risk_pb2_grpc.RiskServiceAsyncStub], Awaitable[T]],
) -> T:
    """Run ``call`` as ``who`` against eligibility's RiskService (a failure propagates;
    cli.main prints it)."""

    async def go() -> T:
        channel = rpc.channel(address or local_address("eligibility"), who, deadline_s=10)
        try:
            return await call(risk_pb2_grpc.RiskServiceStub(channel))
        finally:
            await channel.close()

    return asyncio.run(go())


def plain(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def table(title: str, columns: tuple[str, ...], rows: list[dict[str, Any]], quiet: bool) -> None:
    """The rows as a table on stderr, for a person at a terminal (never with --json)."""
    console = stderr_console()
    if quiet or not console.is_terminal:
        return
    t = Table(*columns, title=title)
    for row in rows:
        t.add_row(*(str(row.get(c, "")) for c in columns))
    console.print(t)


def show_change(change: risk_pb2.RiskChange) -> None:
    emit(plain(change) | {"activated_version": change.activated_version})


# -- rules ------------------------------------------------------------------------------------


@rules_app.callback(invoke_without_command=True)
def rules(
    ctx: typer.Context,
    eligibility: EligibilityOpt = "",
    identity_dir: AuditorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """The rule set in force (its version and rules) and the changes waiting for approval."""
    if ctx.invoked_subcommand is not None:
        return
    who = identity(identity_dir, AUDITOR_DEMO)
    got = risk_call(eligibility, who, lambda s: s.ListRules(risk_pb2.ListRiskRulesRequest()))
    docs = [plain(r) for r in got.rule_set.rules]
    emit(
        {
            "version": got.version,
            "activated_at": got.activated_at.ToJsonString() if got.version else "",
            "rules": docs,
            "pending": [
                {"change_id": c.change_id, "kind": c.kind, "proposed_by": c.proposed_by}
                for c in got.pending
            ],
        }
    )
    columns = ("rule_id", "kind", "action", "subject", "window_s", "max_count", "max_persons")
    table(f"risk rules v{got.version}", (*columns, "verdict"), docs, json_only)


@rules_app.command("propose")
def propose_rules(
    file: Annotated[Path, typer.Argument(help="the rule-set document, YAML or JSON")],
    reason: ReasonOpt,
    eligibility: EligibilityOpt = "",
    identity_dir: OperatorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Propose a new rule-set version; nothing changes until a different approver approves."""
    try:
        document = yaml.safe_load(file.read_text(encoding="utf-8"))
        rule_set = json_format.ParseDict(document, risk_pb2.RiskRuleSet())
    except (OSError, yaml.YAMLError) as exc:
        raise Failure(f"cannot read {file}: {type(exc).__name__}") from None
    except json_format.ParseError as exc:
        raise Failure(f"{file}: not a rule-set document: {exc}") from None
    who = identity(identity_dir, OPERATOR_DEMO)
    request = risk_pb2.ProposeRulesRequest(rule_set=rule_set, reason=reason)
    show_change(risk_call(eligibility, who, lambda s: s.ProposeRules(request)))


# -- lists ------------------------------------------------------------------------------------


@lists_app.callback(invoke_without_command=True)
def lists(
    ctx: typer.Context,
    list_name: Annotated[str, typer.Option("--list", help="block or allow (default: both)")] = "",
    kind: Annotated[str, typer.Option(help="person, device, address, merchant, serial")] = "",
    limit: Annotated[int, typer.Option(help="at most this many entries (≤ 1000)")] = 100,
    eligibility: EligibilityOpt = "",
    identity_dir: AuditorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """The live entries of the block and allow lists (subjects masked)."""
    if ctx.invoked_subcommand is not None:
        return
    who = identity(identity_dir, AUDITOR_DEMO)
    request = risk_pb2.ListRiskListsRequest(list=list_name, kind=kind, limit=limit)
    got = risk_call(eligibility, who, lambda s: s.ListLists(request))
    entries = [plain(e) for e in got.entries]
    emit({"version": got.version, "entries": entries})
    columns = ("entry_id", "list", "kind", "subject_masked", "expires_at", "reason")
    table(f"risk lists v{got.version}", columns, entries, json_only)


@lists_app.command("add")
def add_entry(
    kind: Annotated[str, typer.Argument(help="person, device, address, merchant or serial")],
    value: Annotated[
        str, typer.Argument(help="the consumer id, device id, address, merchant id or serial")
    ],
    reason: ReasonOpt,
    list_name: Annotated[str, typer.Option("--list", help="block or allow")] = "block",
    days: Annotated[int, typer.Option(help="the entry expires after this many days", min=1)] = 30,
    eligibility: EligibilityOpt = "",
    identity_dir: OperatorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Propose adding an entry to a list (it expires after --days)."""
    who = identity(identity_dir, OPERATOR_DEMO)
    request = risk_pb2.ProposeListChangeRequest(
        change="add", list=list_name, kind=kind, value=value, reason=reason
    )
    request.expires_at.FromDatetime(datetime.now(UTC) + timedelta(days=days))
    show_change(risk_call(eligibility, who, lambda s: s.ProposeListChange(request)))


@lists_app.command("remove")
def remove_entry(
    entry_id: Annotated[str, typer.Argument(help="from `risk lists`, e.g. rle-…")],
    reason: ReasonOpt,
    eligibility: EligibilityOpt = "",
    identity_dir: OperatorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Propose removing a live entry from its list."""
    who = identity(identity_dir, OPERATOR_DEMO)
    request = risk_pb2.ProposeListChangeRequest(change="remove", entry_id=entry_id, reason=reason)
    show_change(risk_call(eligibility, who, lambda s: s.ProposeListChange(request)))


# -- approval, decisions, lifts ----------------------------------------------------------------


@app.command()
def approve(
    change_id: Annotated[str, typer.Argument(help="from `risk rules propose` or `risk lists add`")],
    reason: ReasonOpt,
    eligibility: EligibilityOpt = "",
    identity_dir: ApproverIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Approve someone else's proposed change: it is in force within a second."""
    who = identity(identity_dir, APPROVER_DEMO)
    request = risk_pb2.ApproveRiskChangeRequest(change_id=change_id, reason=reason)
    show_change(risk_call(eligibility, who, lambda s: s.ApproveChange(request)))


@app.command()
def decisions(
    outcome: Annotated[str, typer.Option(help="block or flag (default: both)")] = "",
    status: Annotated[str, typer.Option(help="OPEN or LIFTED (default: both)")] = "",
    limit: Annotated[int, typer.Option(help="at most this many, newest first (≤ 1000)")] = 100,
    eligibility: EligibilityOpt = "",
    identity_dir: AuditorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Claims and reservations the risk rules blocked or flagged, newest first."""
    who = identity(identity_dir, AUDITOR_DEMO)
    request = risk_pb2.ListRiskDecisionsRequest(outcome=outcome, status=status, limit=limit)
    got = risk_call(eligibility, who, lambda s: s.ListDecisions(request))
    rows = [plain(d) for d in got.decisions]
    emit({"decisions": rows})
    columns = ("decision_id", "service", "outcome", "rule_id", "consumer_id", "status")
    table("risk decisions", (*columns, "decided_at"), rows, json_only)


@app.command()
def lift(
    decision_id: Annotated[str, typer.Argument(help="from `risk decisions`, e.g. rd-…")],
    reason: ReasonOpt,
    exempt_for_s: Annotated[
        int, typer.Option(help="how long the subject stays exempt (0: the rule's window)", min=0)
    ] = 0,
    eligibility: EligibilityOpt = "",
    identity_dir: OperatorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Lift a block, with a reason: the subject is let through (an event, with your name)."""
    who = identity(identity_dir, OPERATOR_DEMO)
    request = risk_pb2.LiftBlockRequest(
        decision_id=decision_id, reason=reason, exempt_for_s=exempt_for_s
    )
    emit(plain(risk_call(eligibility, who, lambda s: s.LiftBlock(request))))
