"""Emergency switches, answered by a running catalog service: pause and resume.

  subsidyctl pause  (--category CODE | --campaign) --reason TEXT [--identity DIR]
  subsidyctl resume (--category CODE | --campaign) --reason TEXT [--identity DIR]

Each is a catalog event with the operator (the certificate's identity; default the demo
operator) and the reason; every catalog replica applies it within
a second. Prints one JSON object: whether the campaign is paused and which categories are.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from subsidy.v1 import catalog_pb2, catalog_pb2_grpc

from ..stack.certs import OPERATOR_DEMO
from .common import (
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

app = typer.Typer()
PANEL = "Emergency switches"

CategoryOpt = Annotated[
    str, typer.Option(help="one category code, e.g. air_conditioner", show_default=False)
]
CampaignOpt = Annotated[bool, typer.Option("--campaign", help="the whole campaign")]


def switch(
    pause: bool,
    category: str,
    campaign: bool,
    reason: str,
    identity_dir: Path | None,
    catalog: str,
) -> None:
    """Throw one switch and print the switches as they now stand."""
    if bool(category) == campaign:
        raise Failure("give exactly one of --category CODE or --campaign")
    who = identity(identity_dir, OPERATOR_DEMO)
    actor = actor_of(who)

    async def call(stub: catalog_pb2_grpc.CatalogServiceAsyncStub) -> catalog_pb2.Switches:
        s: catalog_pb2.Switches
        if campaign:
            request = catalog_pb2.CampaignSwitchRequest(actor=actor, reason=reason)
            s = await (stub.PauseCampaign if pause else stub.ResumeCampaign)(request)
        else:
            creq = catalog_pb2.CategorySwitchRequest(category=category, actor=actor, reason=reason)
            s = await (stub.PauseCategory if pause else stub.ResumeCategory)(creq)
        return s

    s = catalog_call(catalog, who, call)
    emit(
        {
            "campaign_paused": s.campaign_paused,
            "paused_categories": [c.category for c in s.paused_categories],
        }
    )


def command(pause: bool) -> Callable[..., None]:
    """``pause`` or ``resume``: the same options, the opposite switch."""

    def throw(
        reason: ReasonOpt,
        category: CategoryOpt = "",
        campaign: CampaignOpt = False,
        catalog: CatalogOpt = "",
        identity_dir: OperatorIdentityOpt = None,
        json_only: JsonOpt = False,
    ) -> None:
        switch(pause, category, campaign, reason, identity_dir, catalog)

    throw.__doc__ = (
        "Pause one category or the whole campaign: new reservations are refused."
        if pause
        else "Resume one category or the whole campaign."
    )
    return throw


app.command("pause", rich_help_panel=PANEL)(command(pause=True))
app.command("resume", rich_help_panel=PANEL)(command(pause=False))
