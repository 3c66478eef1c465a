"""Maker-checker publication of a policy version, answered by a running catalog service.

  subsidyctl policy draft FILE --reason TEXT [--actor ID]        (the maker)
  subsidyctl policy approve VERSION --reason TEXT [--actor ID]   (the checker: someone else)

Prints one JSON object: the version, its status, when it takes effect, who drafted and who
approved it, and whether it is in force now.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from subsidy.v1 import catalog_pb2, common_pb2

from .common import ActorOpt, CatalogOpt, Failure, JsonOpt, ReasonOpt, actor, catalog_call, emit

app = typer.Typer(
    name="policy",
    help="Draft a policy version, or approve someone else's draft.",
    no_args_is_help=True,
)


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
    actor_id: ActorOpt = "",
    catalog: CatalogOpt = "",
    json_only: JsonOpt = False,
) -> None:
    """Propose a policy version; it changes nothing until someone else approves it."""
    try:
        document = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else exc
        raise Failure(f"cannot read {file}: {why}") from None
    request = catalog_pb2.DraftPolicyRequest(
        document=document, actor=actor(actor_id), reason=reason
    )
    show(catalog_call(catalog, lambda stub: stub.DraftPolicy(request)))


@app.command()
def approve(
    version: Annotated[str, typer.Argument(help="the drafted version, e.g. shenzhen-2026.1")],
    reason: ReasonOpt,
    actor_id: ActorOpt = "",
    catalog: CatalogOpt = "",
    json_only: JsonOpt = False,
) -> None:
    """Approve a drafted version (not your own); it is in force from its effective_from."""
    who = actor(actor_id, common_pb2.Actor.KIND_APPROVER)
    request = catalog_pb2.ApprovePolicyRequest(version=version, actor=who, reason=reason)
    show(catalog_call(catalog, lambda stub: stub.ApprovePolicy(request)))
