"""``subsidyctl policy whatif --draft VERSION``: the real history of orders under a draft policy.

Reads the audit log's entries up to a fresh checkpoint, their tree checked against it (operator
or auditor; nothing else is asked and nothing changes),
finds the draft in the log (its ``PolicyDrafted`` or ``PolicyPublished`` event: a draft made
with ``policy draft`` and not approved is what this is for), replays every pool's stream under
it (:mod:`services.audit.whatif`) and prints one JSON object: the summary (actual and draft
subsidy, the difference, orders the draft would refuse), per day and category, the burn-down per
pool and day, and the orders that change. ``--out DIR`` writes the same as CSV (days, burn-down,
orders) for a spreadsheet.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Annotated, Any

import typer

from services.audit.totals import Rebuild
from services.audit.whatif import DAY_FIGURES, WhatIf, WhatIfFold, replay
from services.kernel import rpc
from services.kernel.contract.spreadsheet import csv_bytes
from services.kernel.events import Envelope
from subsidy.v1 import audit_pb2_grpc

from ..stack.certs import OPERATOR_DEMO
from .audit import AuditAddrOpt
from .audit.replay import checked_envelopes
from .common import Failure, JsonOpt, OperatorIdentityOpt, emit, identity, local_address
from .progress import PhaseProgress

SHOWN = 200  # changed orders listed in the JSON answer (all of them go to --out)
BURN_FIGURES = (
    "actual_available_fen",
    "actual_spent_fen",
    "draft_available_fen",
    "draft_spent_fen",
)
DAY = ["%Y-%m-%d"]
ORDER_COLUMNS = (
    "order_id",
    "day",
    "category",
    "pool_id",
    "status",
    "actual_subsidy_fen",
    "draft_subsidy_fen",
    "refused",
)


async def _fold(audit_addr: str, who: Any, quiet: bool) -> WhatIfFold:
    """Every entry of the log up to a fresh checkpoint (its tree checked), folded for a
    what-if."""
    channel = rpc.channel(audit_addr, who)
    try:
        with PhaseProgress(unit="entries", plain=False, quiet=quiet) as bar:
            data = await checked_envelopes(audit_pb2_grpc.AuditServiceStub(channel), bar.update)
    finally:
        await channel.close()
    fold = WhatIfFold()
    rebuild = Rebuild([fold])
    for d in data:
        rebuild.add(Envelope.FromString(d))
    rebuild.finish()
    return fold


def answer_of(result: WhatIf) -> dict[str, Any]:
    """The JSON answer: the summary, then the tables."""
    changed = result.changed()
    return {
        **result.summary(),
        "days": [
            {"day": day, "category": category, **figures}
            for (day, category), figures in result.days().items()
        ],
        "burn_down": [
            {"pool_id": pool, "day": day, **figures}
            for (pool, day), figures in result.burn_down.items()
        ],
        "changed_orders": [o.as_json() for o in changed[:SHOWN]],
        "changed_orders_listed": min(len(changed), SHOWN),
    }


def write_csv(result: WhatIf, out: Path) -> list[str]:
    """The three tables as CSV files in ``out``; their paths."""
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "whatif-days.csv": csv_bytes(
            ("day", "category", *DAY_FIGURES),
            ((d, c, *(f[k] for k in DAY_FIGURES)) for (d, c), f in result.days().items()),
        ),
        "whatif-burn-down.csv": csv_bytes(
            ("pool_id", "day", *BURN_FIGURES),
            ((p, d, *(f[k] for k in BURN_FIGURES)) for (p, d), f in result.burn_down.items()),
        ),
        "whatif-orders.csv": csv_bytes(
            ORDER_COLUMNS, (tuple(o.as_json().values()) for o in result.changed())
        ),
    }
    paths = []
    for name, data in files.items():
        (out / name).write_bytes(data)
        paths.append(str(out / name))
    return paths


def whatif_command(
    draft: Annotated[str, typer.Option("--draft", help="the policy version to replay under")],
    start: Annotated[
        dt.datetime | None,
        typer.Option("--from", formats=DAY, help="first day (YYYY-MM-DD, the draft's zone)"),
    ] = None,
    end: Annotated[
        dt.datetime | None,
        typer.Option("--to", formats=DAY, help="last day, inclusive (YYYY-MM-DD)"),
    ] = None,
    pool: Annotated[
        list[str] | None, typer.Option("--pool", help="only this pool (repeat for more)")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(file_okay=False, help="also write the tables as CSV here")
    ] = None,
    audit: AuditAddrOpt = "",
    identity_dir: OperatorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """What the orders so far would have been paid under a draft policy (changes nothing)."""
    if start is not None and end is not None and end < start:
        raise Failure("--to is before --from")
    who = identity(identity_dir, OPERATOR_DEMO)
    fold = asyncio.run(_fold(audit or local_address("audit"), who, json_only))
    policy = fold.policies.get(draft)
    if policy is None:
        known = ", ".join(sorted(fold.policies)) or "none"
        raise Failure(f"--draft: the log holds no policy version {draft!r} (it holds: {known})")
    result = replay(
        fold,
        policy,
        start.date() if start is not None else None,
        end.date() if end is not None else None,
        set(pool) if pool else None,
    )
    if pool and not result.burn_down:
        raise Failure(f"--pool: the log holds no pool {', '.join(sorted(pool))}")
    answer = answer_of(result)
    if out is not None:
        answer["files"] = write_csv(result, out)
    emit(answer)
