"""Signed checkpoints of the audit log's tree: published on a schedule and on demand, kept.

A checkpoint is a C2SP tlog-checkpoint signed note (:mod:`services.kernel.contract.checkpoint`)
of the tree's size and root, signed by the Ed25519 key ``subsidy-tree-head`` in Vault transit
(the private key never leaves Vault). Every checkpoint is kept in ``audit_checkpoints``
(append-only), so ``GetCheckpoint`` can show any earlier one and an auditor can prove the log
they saw last month is a prefix of today's.

The log must never sign two checkpoints that are inconsistent (tlog-checkpoint, "Signatures"):
before it signs, :func:`publish` checks, with the stored nodes, a consistency proof from the
last checkpoint it signed to the new tree, and refuses (with an alert) if the stored tree no
longer extends it, e.g. after someone rewrote the database.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

from sqlalchemy import BigInteger, Column, DateTime, LargeBinary, Table, Text, insert, select

from services.kernel import vault
from services.kernel.contract import merkle
from services.kernel.contract.checkpoint import Checkpoint, Signature, VerifierKey, signed_note
from services.kernel.eventstore import APPEND_ONLY, GRANTS, EventStore

from . import tree
from .log import metadata

log = logging.getLogger(__name__)

checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("tree_size", BigInteger, primary_key=True, autoincrement=False),
    Column("root_hash", LargeBinary(32), nullable=False),
    Column("note", Text, nullable=False),
    Column("published_at", DateTime(timezone=True), nullable=False),
    info={GRANTS: APPEND_ONLY},
)
ALERT: Final = "audit-tree"


@dataclass(frozen=True)
class Published:
    """One stored checkpoint."""

    tree_size: int
    root_hash: bytes
    note: str
    published_at: datetime


@dataclass
class Signer:
    """Signs checkpoint bodies with the tree-head key in Vault, under the log's origin."""

    vault: vault.Vault
    origin: str
    _keys: dict[int, VerifierKey] = field(default_factory=dict)

    async def keys(self) -> dict[int, VerifierKey]:
        """The verifier key of each version of the signing key."""
        public = await self.vault.tree_head_public_keys()
        self._keys = {v: VerifierKey(self.origin, pk) for v, pk in public.items()}
        return self._keys

    async def sign(self, body: str) -> Signature:
        version, signature = await self.vault.sign_tree_head(body.encode())
        key = self._keys.get(version) or (await self.keys())[version]  # rotated: read again
        return Signature(key.name, key.key_id, signature)


class CheckpointRefused(RuntimeError):
    """The stored tree does not extend the last checkpoint: nothing was signed."""


def _published(row: object) -> Published:
    return Published(
        int(row.tree_size),  # type: ignore[attr-defined]
        bytes(row.root_hash),  # type: ignore[attr-defined]
        str(row.note),  # type: ignore[attr-defined]
        row.published_at,  # type: ignore[attr-defined]
    )


async def latest(store: EventStore) -> Published | None:
    """The checkpoint signed last."""
    async with store.engine.connect() as conn:
        row = (
            await conn.execute(
                select(checkpoints).order_by(checkpoints.c.tree_size.desc()).limit(1)
            )
        ).first()
    return None if row is None else _published(row)


async def at_size(store: EventStore, tree_size: int) -> Published | None:
    """The checkpoint published when the tree had ``tree_size`` leaves, if one was."""
    async with store.engine.connect() as conn:
        row = (
            await conn.execute(select(checkpoints).where(checkpoints.c.tree_size == tree_size))
        ).first()
    return None if row is None else _published(row)


async def publish(store: EventStore, signer: Signer, now: datetime | None = None) -> Published:
    """Sign and keep a checkpoint of the tree as it is (the last one, if it has not grown)."""
    async with store.transaction() as tx:
        conn = tx.conn
        size = await tree.size_of(conn, lock=True)  # no integration while this one is signed
        row = (
            await conn.execute(
                select(checkpoints).order_by(checkpoints.c.tree_size.desc()).limit(1)
            )
        ).first()
        last = None if row is None else _published(row)
        if last is not None and last.tree_size == size:
            return last
        root = await tree.root_at(conn, size)
        if last is not None:
            try:
                if last.tree_size > size:
                    raise merkle.ProofInvalid(f"the tree has {size} entries")
                proof = await tree.proof(conn, merkle.consistency_ranges(last.tree_size, size))
                merkle.verify_consistency(last.tree_size, size, last.root_hash, root, proof)
            except (merkle.ProofInvalid, tree.TreeCorrupt) as exc:
                log.error(
                    "the audit tree no longer extends its last checkpoint: not signing",
                    extra={"alert": ALERT},
                )
                raise CheckpointRefused(
                    f"the stored tree (size {size}) is not consistent with the checkpoint "
                    f"signed at size {last.tree_size}: {exc}"
                ) from None
        at = (now or datetime.now(UTC)).replace(microsecond=0)
        body = Checkpoint(signer.origin, size, root, at).body()
        note = signed_note(body, [await signer.sign(body)])
        await conn.execute(
            insert(checkpoints).values(tree_size=size, root_hash=root, note=note, published_at=at)
        )
        return Published(size, root, note, at)
