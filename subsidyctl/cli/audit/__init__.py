"""Auditor commands: ``audit verify`` checks the whole log, ``audit prove`` proves one order's
entries, ``audit key`` prints the key checkpoints are signed with (docs/audit.md).

``verify`` asks the audit service for a fresh signed checkpoint and checks its signature with a
key the auditor pinned (``--key FILE``, or read from Vault transit), fetches every entry the
checkpoint covers (a Rich progress bar on a terminal), recomputes each leaf and the tree's root,
checks a sample of the service's inclusion proofs, checks that the log extends the checkpoint it
trusted last time (``--trusted FILE``, written after every run that passes), cross-checks the
log with every service's own store (``EventLogService``), and rebuilds from the events alone
every total the services report (budget pools, daily quotas, per-person usage, the sales
ledger, settlement batches and the returns ledger: :mod:`services.audit.totals`), comparing
each with the live service. It prints one JSON object (``ok``, ``tree_size``, ``root_hex``,
``signature_ok``, ``consistent_with_trusted``, ``cross_check_ok``, ``totals_compared``,
``differences``, ...) and exits 1 when anything is off.

One module per part: :mod:`.replay` runs the checks (what tests and benchmarks call),
:mod:`.live` reads each service's own figures, :mod:`.keys` finds the verifier keys (and holds
``audit key``), :mod:`.verify_command` and :mod:`.prove` are the other two commands.
"""

from __future__ import annotations

import typer

from .keys import (
    DEFAULT_ORIGIN,
    AuditAddrOpt,
    KeyOpt,
    MountOpt,
    VaultAddrOpt,
    VaultTokenOpt,
    key_command,
    key_source,
    keys_from_file,
    keys_from_vault,
)
from .live import LIVE, Sources
from .prove import prove, prove_command
from .replay import Verification, audit_log, report, verify
from .verify_command import verify_command

app = typer.Typer(name="audit", help="Auditor commands.", no_args_is_help=True)
app.command("verify")(verify_command)
app.command("prove")(prove_command)
app.command("key")(key_command)

__all__ = [
    "DEFAULT_ORIGIN",
    "LIVE",
    "AuditAddrOpt",
    "KeyOpt",
    "MountOpt",
    "Sources",
    "VaultAddrOpt",
    "VaultTokenOpt",
    "Verification",
    "app",
    "audit_log",
    "key_source",
    "keys_from_file",
    "keys_from_vault",
    "prove",
    "report",
    "verify",
]
