"""The ledger database's schema revisions (Alembic): env.py and versions/, run by
services/kernel/schema.py (`python -m services.ledger migrate`).

A revision that adds what only the events can fill (a reservation's funding-source parts, a
pool's per-source figures) sets ``rebuild_read_models = True``: the migration then replays the
read models with :func:`rebuild`, in the same transaction as the schema change."""

from __future__ import annotations

from services.kernel.eventstore import EventStore


async def rebuild(store: EventStore) -> int:
    """The ledger's read models replayed from its events (projections.rebuild)."""
    from services.ledger import projections  # at migration time only: no import cycle

    return await projections.rebuild(store)
