"""The ledger's side of risk control: reservations screened in-process against the rules and
lists eligibility owns, which the ledger learns from eligibility's events (``RiskRulesActivated``,
``RiskListChanged``) into its own copy; velocity counts come from its own observations of the
reservations it held. Decisions that block or flag are the ledger's own events, which
eligibility collects into the one list operators review and lift.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from services.kernel import riskscreen, vault
from services.kernel.events import Envelope, payload_of
from services.kernel.eventstore import Tx
from services.kernel.pipeline import Pipeline
from subsidy.v1 import events_pb2 as ev

from .projections import metadata

SERVICE = "ledger"
tables = riskscreen.risk_tables(metadata)


class LedgerRisk:
    """The screen reservations go through, and the ledger's copy of the rules and lists."""

    def __init__(
        self, pipeline: Pipeline, keys: vault.Vault, clock: Callable[[], datetime] | None = None
    ) -> None:
        self.screen = riskscreen.RiskScreen(
            SERVICE, pipeline, keys, tables, clock or (lambda: datetime.now(UTC))
        )
        self.active = self.screen.active

    async def on_eligibility_event(self, tx: Tx, env: Envelope) -> None:
        """Consumer of eligibility's rule and list changes: the ledger's copy, whose version
        counter every ledger replica polls."""
        event = payload_of(env)
        if isinstance(event, ev.RiskRulesActivated):
            at = env.occurred_at.ToDatetime(tzinfo=UTC)
            await riskscreen.apply_rules_activated(tx.conn, tables, event, at)
        elif isinstance(event, ev.RiskListChanged):
            await riskscreen.apply_list_changed(tx.conn, tables, event)
