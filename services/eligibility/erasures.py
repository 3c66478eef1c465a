"""The erasure register: every consumer ever erased, kept in Vault's KV v2 engine next to the
keys, outside every database, so a restore from a backup taken before an erasure brings it back.

A backup holds what the databases held when it was taken: a consumer erased afterwards still
has their wrapped data key and no ``ConsumerErased`` in it. The register is written *before*
the erasure's transaction (an erasure that committed is always in it; one recorded there whose
transaction failed is finished at the next start, which is what was asked for), and at every
start eligibility erases, through its own pipeline (:meth:`Persons.erase`), each registered
consumer its store knows but has not erased: events, read models and the audit log then agree
again. ``subsidyctl restore`` also deletes the registered consumers' keys as soon as it has
restored the database, before any service starts (subsidyctl/backup.py).

A register entry is ``secret/erasures/<consumer_id>`` with the time it was asked for; the
consumer id is the random identifier the event log carries already, no personal data.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Protocol

from sqlalchemy import select

from services.kernel import vault
from services.kernel.errors import DomainError, Unavailable
from services.kernel.eventstore import EventStore
from services.kernel.identity import service_caller
from subsidy.v1 import common_pb2

from .projections import consumer_erasures

REGISTER = "secret/erasures"
REAPPLIED = "erasure register: re-applied after a restore"
# The pipeline's refusals that mean "nothing to do": not in this store, or erased already.
SKIPPED = frozenset({"UNKNOWN_CONSUMER", "CONSUMER_ERASED"})
log = logging.getLogger(__name__)


class Erases(Protocol):
    """What re-applying needs of :class:`services.eligibility.persons.Persons`."""

    async def erase(self, consumer_id: str, reason: str, actor: common_pb2.Actor) -> datetime: ...


def path_of(consumer_id: str) -> str:
    """The register entry of ``consumer_id``."""
    return f"{REGISTER}/{consumer_id}"


async def record(keys: vault.Vault, consumer_id: str) -> None:
    """Register ``consumer_id`` as erased (before the erasure commits); ``Unavailable`` when
    Vault refuses, so the erasure does not commit unregistered."""
    entry = {"requested_at": datetime.now(UTC).isoformat(timespec="seconds")}
    try:
        await asyncio.to_thread(keys.write_secret_sync, path_of(consumer_id), entry)
    except vault.VaultUnavailable as exc:
        raise Unavailable("VAULT_UNAVAILABLE", str(exc)) from None


def registered_sync(keys: vault.Vault) -> list[str]:
    """Every consumer id in the register."""
    return sorted(k for k in keys.list_secrets_sync(REGISTER) if not k.endswith("/"))


async def reapply(persons: Erases, keys: vault.Vault, store: EventStore) -> list[str]:
    """Erase every registered consumer the store holds and has not erased; returns them.

    Those the read model says are erased are skipped with one query (a start must not run the
    pipeline once per erasure ever made); of the rest, a consumer the store does not know
    (registered after the backup) has no data to erase: the pipeline's own refusal."""
    actor = service_caller("eligibility").actor(REAPPLIED)
    registered = await asyncio.to_thread(registered_sync, keys)
    async with store.engine.connect() as conn:
        erased = set((await conn.execute(select(consumer_erasures.c.consumer_id))).scalars())
    done = []
    for consumer_id in (c for c in registered if c not in erased):
        try:
            await persons.erase(consumer_id, REAPPLIED, actor)
        except DomainError as exc:
            if exc.reason in SKIPPED:
                continue
            raise
        done.append(consumer_id)
    if done:
        log.warning("re-applied %d erasures from the erasure register", len(done))
    return done
