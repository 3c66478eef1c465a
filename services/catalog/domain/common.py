"""What every catalog aggregate shares: the status words, and when and by whom an event was
recorded."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Final

# Policy version lifecycle.
DRAFT: Final = "DRAFT"
APPROVED: Final = "APPROVED"

# Merchant lifecycle (APPROVED as above).
APPLIED: Final = "APPLIED"
REJECTED: Final = "REJECTED"
SUSPENDED: Final = "SUSPENDED"

# Product lifecycle.
LISTED: Final = "LISTED"
DELISTED: Final = "DELISTED"

# Sales orders, as learnt from the ledger's events.
RESERVED: Final = "RESERVED"
CAPTURED: Final = "CAPTURED"
RELEASED: Final = "RELEASED"


@dataclass(frozen=True)
class Meta:
    """When an event was recorded and by whom (its envelope's occurred_at and actor.id):
    what an ``evolve`` needs beyond the event itself, passed in so evolve stays pure."""

    at: dt.datetime
    actor_id: str
