"""subsidyctl: the operator's and auditor's command line, on Typer and Rich.

One module per command group; each holds its commands and registers them on ``app`` below:

- :mod:`.stack`: ``up`` (the whole stack locally until Ctrl-C; ``make run``), ``smoke`` (a
  throwaway stack, one checkout, one JSON line; ``make smoke``), ``seed`` (the demo campaign on a
  running stack).
- :mod:`.checkout`: ``checkout``, one subsidised checkout against a running stack, as a platform
  runs it.
- :mod:`.catalog`: ``quote`` (the subsidy for one item, answered by the running catalog),
  ``import`` (bulk-import products from a CSV, all or nothing or ``--only-good-rows``, with a
  progress bar), ``sales-ledger`` (export the 销售台账 as CSV or XLSX).
- :mod:`.switches`: ``pause`` and ``resume``, the emergency switch for one category or the whole
  campaign.
- :mod:`.budget`: ``budget propose``, ``budget approve`` and ``budget status``, maker-checker
  funding of a pool;
- :mod:`.policy`: ``policy draft`` and ``policy approve``, maker-checker publication of a policy
  version.
- :mod:`.reconcile`: ``reconcile FILE.csv`` (the payment provider's discount bill against the
  ledger's captures: counts, fen totals and a CSV + XLSX report; once per file) and
  ``reconciliations`` (the recorded ones, for auditors).
- :mod:`.settlement`: ``settlement create|approve|export|paid``, merchant batches, maker-checker.
- :mod:`.funds`: ``ledger funds``, the fund-detail ledger (资金明细台账): every movement of every
  funding source with its balances after it.
- :mod:`.report`: ``report daily --date D``, the bureau's daily report (CSV + XLSX), from the
  ledger or rebuilt from the audit log's events (``--from-events``) and compared.
- :mod:`.audit`: ``audit verify``, recompute the audit chain and rebuild every budget from the log.
- :mod:`.risk`: ``risk rules``, ``risk lists``, ``risk decisions``: the risk rules and the block
  and allow lists (read; change through ``propose`` / ``lists add`` and ``approve`` by another
  person), the decisions they made, and ``risk lift`` for a block.
- :mod:`.audit`: ``audit verify`` (the signed Merkle log, its history, every store and every
  total rebuilt from the events), ``audit prove`` (one order's entries with inclusion proofs),
  ``audit key`` (the checkpoint key to pin).
- :mod:`.dashboard`: ``dashboard``, the live fund-monitoring dashboard (read-only, in a browser).
- :mod:`.cases`: ``cases list|show|assign|note|resolve|apply|approve|operator-actions``,
  supervision cases (complaints, risk alerts, operator activity), and ``complaint file``, a
  complaint as a platform files it.
- :mod:`.backup`: ``backup --out DIR`` and ``restore DIR``, encrypted archives of every
  service's database and the audit log's signed checkpoint.
- :mod:`.certs`: ``certs issue``, one identity (tls.crt, tls.key, ca.crt) from the running local
  stack's CA.
- :mod:`.schema`: ``schema revision SERVICE -m MESSAGE`` (the next Alembic revision of a
  service's database, from its models) and ``schema check`` (models against revisions).
- :mod:`.dlq`: ``dlq list|show|replay``, the dead letters of every service's consumers (metadata
  only), replayed once the cause is fixed (idempotent, recorded as an operator's event).
- :mod:`.common` (options, addresses, output, exit codes) and :mod:`.progress` (Rich progress
  bars) are shared by the groups.

Output: a command's data goes to stdout, by default exactly as the docs show it (one JSON object
per line for every command but ``up``); ``--json`` prints only JSON, one object per line, without
the progress bars, tables and notes that are otherwise drawn on stderr for people.

Exit codes: 0 done; 1 the command ran and the answer is no (nothing imported, the audit log and
the ledger disagree, the stack failed or a service died); 2 bad input or a refused call; 3 a
service could not be reached in time. A failure is one line on stderr, never a traceback: a
refused or failed call prints ``{"error": {"code", "reason", "field", "message"}}``, bad input
``subsidyctl COMMAND: error: ...``.

Identity: every call is mutual TLS, and the services take the caller from its certificate, never
from the request. A command that calls a service takes ``--identity DIR`` (default: the local
stack's demo identity that fits it, e.g. ``run/certs/operator-demo`` for ``pause``; see
docs/security.md).

A new command goes into the module of its group (or a new module registered below) and uses
``common``'s options (``--catalog``, ``--identity`` for its role, ``--json``) and ``emit`` for its
output; a new environment variable is declared in services.kernel.settings.CliSettings first.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

import grpc
import typer

from . import (
    audit,
    backup,
    budget,
    cases,
    catalog,
    certs,
    checkout,
    common,
    dashboard,
    dlq,
    funds,
    policy,
    reconcile,
    report,
    risk,
    schema,
    settlement,
    stack,
    switches,
)

app = typer.Typer(
    name="subsidyctl",
    help="The operator's and auditor's command line for the subsidy platform.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # a bug shows a plain traceback; everything else one line
)
app.add_typer(stack.app)
app.add_typer(checkout.app)
app.add_typer(catalog.app)
app.add_typer(policy.app, rich_help_panel=catalog.PANEL)
app.add_typer(budget.app, rich_help_panel=catalog.PANEL)
app.add_typer(risk.app, rich_help_panel=catalog.PANEL)
app.add_typer(reconcile.app)
app.add_typer(settlement.app, rich_help_panel=catalog.PANEL)
app.add_typer(funds.app, rich_help_panel=catalog.PANEL)
app.add_typer(report.app, rich_help_panel=catalog.PANEL)
app.add_typer(switches.app)
app.add_typer(audit.app, rich_help_panel="Audit")
app.add_typer(dashboard.app, rich_help_panel="Audit")
app.add_typer(certs.app, rich_help_panel=stack.PANEL)
app.add_typer(backup.app)
app.add_typer(schema.app, rich_help_panel=stack.PANEL)
app.add_typer(cases.app, rich_help_panel=cases.PANEL)
app.add_typer(cases.complaint_app, rich_help_panel=cases.PANEL)
app.add_typer(dlq.app, rich_help_panel=stack.PANEL)


GROUPS = (
    policy.app.info.name,
    budget.app.info.name,
    settlement.app.info.name,
    funds.app.info.name,
    report.app.info.name,
    risk.app.info.name,
    audit.app.info.name,
    certs.app.info.name,
    schema.app.info.name,
    cases.app.info.name,
    cases.complaint_app.info.name,
    dlq.app.info.name,
)


def _command_path(args: Sequence[str]) -> str:
    """``subsidyctl pause`` or ``subsidyctl policy draft``: the command words in ``args``."""
    words = [a for a in args[:2] if not a.startswith("-")]
    return " ".join(["subsidyctl", *words[: 2 if words and words[0] in GROUPS else 1]])


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit code (the console script ``subsidyctl`` calls this)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = app(args=args, prog_name="subsidyctl", standalone_mode=False)
    except typer.TyperException as exc:  # bad input (Typer's usage errors) or a Failure
        message = exc.format_message().strip()
        if not message or "\n" in message:  # the help, for a group given no command
            sys.stderr.write(message and message + "\n")
        else:
            ctx = getattr(exc, "ctx", None)
            where = ctx.command_path if ctx is not None else _command_path(args)
            common.note(f"{where}: error: {message}")
        return exc.exit_code
    except grpc.aio.AioRpcError as err:
        code, failure = common.rpc_failure(err)
        common.note(json.dumps(failure, ensure_ascii=False))
        return code
    except typer.Abort:
        common.note("subsidyctl: aborted")
        return common.EXIT_NO
    return code if isinstance(code, int) else common.EXIT_OK


__all__ = ["app", "main"]
