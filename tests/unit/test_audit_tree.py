"""The audit log's Merkle tree as the service stores it, on a real PostgreSQL and OpenBao:
integrated in batches, proofs for every past size from the stored nodes, checkpoints signed in
Vault and kept, and what the service refuses to integrate or sign."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import func, select, text

from services.audit import checkpoints, log, tree
from services.kernel import vault
from services.kernel.contract import merkle
from services.kernel.contract.checkpoint import open_checkpoint
from services.kernel.events import Context, new_envelope, service_actor
from services.kernel.eventstore import EventStore, make_engine
from subsidy.v1 import events_pb2 as ev
from tests.conftest import Infra

ORIGIN = "test.subsidy.example/audit"


@pytest.fixture
async def audit_store(infra: Infra) -> AsyncIterator[EventStore]:
    s = EventStore(make_engine(infra.create_database("audit")))
    await s.create_tables(log.metadata)
    await log.ensure_head(s)
    await tree.ensure_tree(s)
    yield s
    await s.engine.dispose()


@pytest.fixture
def signer(infra: Infra) -> checkpoints.Signer:
    return checkpoints.Signer(vault.connect(infra.bao.addr, token=infra.bao.token), ORIGIN)


async def append(store: EventStore, n: int, order: str = "o-1") -> list[bytes]:
    """Append ``n`` ledger events as the consumer does; returns their envelope bytes."""
    out = []
    for i in range(n):
        env = new_envelope(
            "ledger",
            f"reservation/{order}-{i}",
            ev.SubsidyCaptured(order_id=f"{order}-{i % 3}", pool_id="p", subsidy_fen=i),
            Context(service_actor("ledger"), correlation_id=f"{order}-{i % 3}"),
            version=1,
        )
        async with store.transaction() as tx:
            await log.append(tx, env)
        out.append(env.SerializeToString(deterministic=True))
    return out


async def test_the_stored_tree_is_rfc6962_and_proves_every_past_size(
    audit_store: EventStore,
) -> None:
    data = await append(audit_store, 37)
    leaves = [merkle.leaf_hash(d) for d in data]
    integrated = []
    while n := await tree.integrate(audit_store, batch=10):  # in batches, as the loop does
        integrated.append(n)
    assert integrated == [10, 10, 10, 7]
    assert await tree.current_size(audit_store) == 37
    async with audit_store.engine.connect() as conn:
        # Every complete subtree, once: 2n - popcount(n) rows, two per entry amortised.
        assert await conn.scalar(select(func.count()).select_from(tree.nodes)) == 2 * 37 - 3
        for size in range(1, 38):
            root = merkle.root_of(leaves[:size])
            assert await tree.root_at(conn, size) == root
    for size in (1, 2, 5, 16, 17, 37):
        root = merkle.root_of(leaves[:size])
        for index in range(size):
            leaf, proof = await tree.inclusion_proof(audit_store, index, size)
            assert leaf == leaves[index]
            merkle.verify_inclusion(index, size, leaf, proof, root)
        for old in range(1, size + 1):
            proof = await tree.consistency_proof(audit_store, old, size)
            merkle.verify_consistency(old, size, merkle.root_of(leaves[:old]), root, proof)
    assert await tree.index_of(audit_store, leaves[20], 37) == 20
    assert await tree.index_of(audit_store, leaves[20], 20) is None  # not in the tree of 20
    # Every entry is found by the order its payload (and correlation id) names.
    assert await tree.indexes_naming(audit_store, "o-1-2", 100) == list(range(2, 37, 3))


async def test_an_entry_changed_before_it_is_integrated_is_refused(
    audit_store: EventStore,
) -> None:
    await append(audit_store, 4)
    async with audit_store.engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE audit_entries SET envelope = overlay(envelope placing '\\xff'::bytea"
                " from 9) WHERE idx = 2"
            )
        )
    with pytest.raises(tree.TreeCorrupt, match="audit entry 2 was changed after it was written"):
        await tree.integrate(audit_store)
    assert await tree.current_size(audit_store) == 0  # nothing integrated, not even 0 and 1


async def test_checkpoints_are_signed_in_vault_kept_and_never_inconsistent(
    audit_store: EventStore, signer: checkpoints.Signer
) -> None:
    data = await append(audit_store, 5)
    await tree.integrate(audit_store)
    first = await checkpoints.publish(audit_store, signer)
    keys = list((await signer.keys()).values())
    cp = open_checkpoint(first.note, keys)  # verifies with the public key Vault publishes
    assert (cp.origin, cp.size, cp.root) == (ORIGIN, 5, merkle.root_of(map(merkle.leaf_hash, data)))
    assert cp.timestamp == first.published_at
    assert await checkpoints.publish(audit_store, signer) == first  # nothing new: the same one
    await append(audit_store, 3)
    await tree.integrate(audit_store)
    second = await checkpoints.publish(audit_store, signer)
    assert second.tree_size == 8
    assert await checkpoints.at_size(audit_store, 5) == first  # history kept
    assert await checkpoints.latest(audit_store) == second
    # Someone rewrites the stored tree (a leaf node and the right edge of size 8, so the
    # tree stays self-consistent): the service refuses to sign what no longer extends size 8.
    await append(audit_store, 1)
    await tree.integrate(audit_store)
    async with audit_store.engine.begin() as conn:
        await conn.execute(
            text("UPDATE audit_tree_nodes SET hash = sha256(hash) WHERE level = 3 AND idx = 0")
        )
    with pytest.raises(checkpoints.CheckpointRefused, match="not consistent with the checkpoint"):
        await checkpoints.publish(audit_store, signer)
    assert await checkpoints.latest(audit_store) == second
