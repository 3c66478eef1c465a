"""The live fund-detail ledger (资金明细台账) and the bureau's daily report: the ledger's own
events through the shared folds (:mod:`services.kernel.contract.fundledger`,
:mod:`services.kernel.contract.dailyreport`).

The reports are read from the store itself rather than from a read model of their own: the
store is the source of truth, the folds are the ones the auditor runs over the audit log, and
one statement reads every event of every pool's stream and every clawback in one snapshot, so a
report is always the state after some set of committed transactions. Folding a campaign's whole
history takes seconds, so the rows are kept for a minute and reused while the number of such
events is unchanged (the store is append-only: the same count is the same events), which makes
paging through the fund ledger, or a report after another, one count away. The day's campaign
time zone is the claim window's of the policy in force (catalog's, as the ledger already asks
it).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Final

import grpc
from sqlalchemy import text

from services.kernel.contract import dailyreport, fundledger
from services.kernel.contract.budget import POOL_STREAM_PREFIX
from services.kernel.contract.dailyreport import DailyReport, Day
from services.kernel.contract.fundledger import Movement
from services.kernel.contract.policy import policy_from_json
from services.kernel.events import Envelope
from services.kernel.eventstore import EventStore
from services.kernel.rpc import as_domain_error
from subsidy.v1 import catalog_pb2, catalog_pb2_grpc
from subsidy.v1 import events_pb2 as ev

_MONEY = "FROM events WHERE stream_id LIKE :pools OR event_type = :clawback"
_MONEY_EVENTS = text(f"SELECT envelope {_MONEY}")
_MONEY_COUNT = text(f"SELECT count(*) {_MONEY}")
_PARAMS: Final = {
    "pools": POOL_STREAM_PREFIX + "%",
    "clawback": ev.ClawbackRecorded.DESCRIPTOR.full_name,
}
KEEP_S: Final = 60.0  # how long folded rows are reused (then their memory is given back)


class FundReports:
    """The two reports of the ledger's money, from its store."""

    def __init__(
        self, store: EventStore, catalog: catalog_pb2_grpc.CatalogServiceAsyncStub
    ) -> None:
        self.store = store
        self.catalog = catalog
        self._kept: tuple[int, float, list[Movement]] | None = None  # (count, at, rows)
        self._folding = asyncio.Lock()  # one fold at a time; the others wait and reuse it

    async def events(self) -> list[Envelope]:
        """Every event that moves a pool's money or records a clawback, in one snapshot."""
        async with self.store.engine.connect() as conn:
            result = await conn.execute(_MONEY_EVENTS, _PARAMS)
            return [Envelope.FromString(r[0]) for r in result]

    async def movements(self) -> list[Movement]:
        """The fund-detail ledger: every source's every movement with its balances after it."""
        async with self._folding:
            async with self.store.engine.connect() as conn:
                count = int(await conn.scalar(_MONEY_COUNT, _PARAMS) or 0)
            kept, now = self._kept, time.monotonic()
            if kept is not None and kept[0] == count and now - kept[1] < KEEP_S:
                return kept[2]
            envelopes = await self.events()
            # Folded off the event loop: the ledger's checkouts go on meanwhile.
            rows = await asyncio.to_thread(fundledger.movements, envelopes)
            self._kept = (len(envelopes), time.monotonic(), rows)
            return rows

    async def timezone(self) -> str:
        """The campaign's time zone: the claim window's of the policy in force."""
        try:
            answer = await self.catalog.GetPolicy(catalog_pb2.GetPolicyRequest(version=""))
        except grpc.aio.AioRpcError as err:
            raise as_domain_error(err, "catalog") from err
        return policy_from_json(answer.policy_json).claim_window.timezone

    async def daily(self, date: dt.date, timezone: str = "") -> DailyReport:
        """The daily report of ``date`` in ``timezone`` (default: the campaign's)."""
        day = Day(date, timezone or await self.timezone())
        rows = await self.movements()
        return await asyncio.to_thread(dailyreport.daily_report, rows, day)
