"""Maker-checker publication of a policy version, answered by a running catalog service.

  subsidyctl policy draft FILE --reason TEXT [--identity DIR]        (the maker: an operator)
  subsidyctl policy approve VERSION --reason TEXT [--identity DIR]   (the checker: an approver)
  subsidyctl policy whatif --draft VERSION [--from DAY --to DAY]     (history under a draft)

Who drafts and who approves is the certificate's identity (default: the demo operator, the demo
approver); the catalog refuses an approval by the drafter. Prints one JSON object: the version,
its status, when it takes effect, who drafted and who approved it, and whether it is in force
now.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from subsidy.v1 import catalog_pb2

from ..stack.certs import APPROVER_DEMO, OPERATOR_DEMO
from . import whatif
from .common import (
    ApproverIdentityOpt,
    CatalogOpt,
    Failure,
    JsonOpt,
    OperatorIdentityOpt,
    ReasonOpt,
    actor_of,
    catalog_call,
    emit,
    identity,
)

app = typer.Typer(
    name="policy",
    help="Draft a policy version, or approve someone else's draft.",
    no_args_is_help=True,
)
app.command("whatif")(whatif.whatif_command)


def show(v: catalog_pb2.PolicyVersion) -> None:
    emit(
        {
            "version": v.version,
            "status": v.status,
            "effective_from": v.effective_from.ToJsonString(),
            "drafted_by": v.drafted_by,
            "approved_by": v.approved_by,
            "in_force": v.in_force,
        }
    )


@app.command()
def draft(
    file: Annotated[Path, typer.Argument(help="the policy document (YAML)")],
    reason: ReasonOpt,
    catalog: CatalogOpt = "",
    identity_dir: OperatorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Propose a policy version; it changes nothing until someone else approves it."""
    try:
        document = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else exc
        raise Failure(f"cannot read {file}: {why}") from None
    who = identity(identity_dir, OPERATOR_DEMO)
    request = catalog_pb2.DraftPolicyRequest(document=document, actor=actor_of(who), reason=reason)
    show(catalog_call(catalog, who, lambda stub: stub.DraftPolicy(request)))


@app.command()
def approve(
    version: Annotated[str, typer.Argument(help="the drafted version, e.g. shenzhen-2026.1")],
    reason: ReasonOpt,
    catalog: CatalogOpt = "",
    identity_dir: ApproverIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Approve a drafted version (not your own); it is in force from its effective_from."""
    who = identity(identity_dir, APPROVER_DEMO)
    request = catalog_pb2.ApprovePolicyRequest(version=version, actor=actor_of(who), reason=reason)
    show(catalog_call(catalog, who, lambda stub: stub.ApprovePolicy(request)))
