"""Eligibility's copy of the approved policy versions, fed by catalog's ``PolicyPublished``.

Claims are decided under the version in force now, and a refund under the order's own version;
both are picked by the shared contract (``services.kernel.contract.policy.in_force`` and
``named_version``, the same functions catalog uses), and a version this copy has never seen is
an error (``UNKNOWN_POLICY_VERSION``), never a silent fallback to another version.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert

from services.kernel.contract.policy import (
    Policy,
    in_force,
    named_version,
    policy_from_json,
    policy_json,
    policy_of,
)
from services.kernel.errors import FailedPrecondition
from services.kernel.events import Envelope, payload_of
from services.kernel.eventstore import EventStore, Tx
from services.kernel.readmodels import load_new_rows
from services.kernel.sql import Statement
from subsidy.v1 import events_pb2 as ev

from .projections import policies

log = logging.getLogger(__name__)
_VERSIONS = Statement(select(policies.c.version), name="policy_versions")


class PolicyCopy:
    """The approved versions this service has received, cached once parsed (they never change).

    The table is looked at most every ``refresh_s`` (a claim used to pay that look-up and a
    connection each, a tenth of eligibility's CPU under the rush): a version another replica
    stored is seen within ``refresh_s``, one this process's consumer stores at once. Catalog
    approves a version at least a second before it takes effect (APPROVAL_LEAD), so no claim is
    decided under a version that should no longer be in force."""

    def __init__(
        self, store: EventStore, clock: Callable[[], datetime], *, refresh_s: float = 0.1
    ) -> None:
        self.store = store
        self.clock = clock
        self.refresh_s = refresh_s
        self._parsed: dict[str, Policy] = {}
        self._looked_at = -math.inf  # monotonic time the last look-up started
        self._looking = asyncio.Lock()

    async def on_policy_published(self, tx: Tx, env: Envelope) -> None:
        """Consumer of catalog's PolicyPublished: keep the document, once per version."""
        event = payload_of(env)
        if not isinstance(event, ev.PolicyPublished):
            return
        # Stored as canonical JSON whichever form the event carries (message or old JSON).
        stmt = pg_insert(policies).values(
            version=event.version,
            document=policy_json(policy_of(event)),
            effective_from=event.effective_from.ToDatetime(tzinfo=UTC),
        )
        await tx.conn.execute(stmt.on_conflict_do_nothing())
        # Known here at once (a version never changes; were this rolled back, the redelivery
        # would bring the same one).
        self._parsed.setdefault(event.version, policy_of(event))

    async def _versions(self, *, fresh: bool = False) -> dict[str, Policy]:
        """Every version received, parsing only the ones not seen before (one small query, at
        most every ``refresh_s`` unless ``fresh``; concurrent callers share one look-up)."""
        if not fresh and time.monotonic() - self._looked_at < self.refresh_s:
            return self._parsed
        async with self._looking:
            started = time.monotonic()
            if not fresh and started - self._looked_at < self.refresh_s:
                return self._parsed  # looked up while this caller waited
            # Committed, not rolled back: a ROLLBACK makes psycopg drop the connection's
            # prepared statements (DEALLOCATE ALL), the hot path's included.
            async with self.store.engine.begin() as conn:
                # The versions, prepared (a claim rush asks ten times a second); the documents
                # only when one is new.
                if any(r.version not in self._parsed for r in await _VERSIONS.all(conn)):
                    await load_new_rows(
                        conn,
                        policies.c.version,
                        policies.c.document,
                        self._parsed,
                        policy_from_json,
                    )
            self._looked_at = started
        return self._parsed

    async def version(self, version: str) -> Policy:
        """The named version (an order's): unknown here is an error, not another version."""
        if version in self._parsed:
            return self._parsed[version]
        return named_version(await self._versions(fresh=True), version)

    async def in_force(self) -> Policy:
        """The version in force now: the latest whose effective_from has passed."""
        return in_force((await self._versions()).values(), self.clock())

    async def wait(self, every_s: float = 0.05) -> None:
        """Readiness: claims need the policy, which arrives through catalog's events."""
        tries = 0
        while True:
            try:
                await self.in_force()
                return
            except FailedPrecondition:
                tries += 1
                if tries % 100 == 0:
                    log.warning("not ready: still waiting for a subsidy policy from catalog")
                await asyncio.sleep(every_s)
