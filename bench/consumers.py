"""Preparation for the benchmarks: many registered consumers, fast, and honestly.

Registering through ``RegisterConsumer`` costs three Vault transit calls, the identity
authority's check and one transaction per person: about 70 a second on these 2 cores, so
50,000 would take twelve minutes before a benchmark could start. :func:`seed` registers them
through the same pipeline in this process, in batches:

- each person's blind indexes come from Vault's transit HMAC key and their data key is wrapped
  by Vault's key-encryption key, as ``services.kernel.vault`` does, but a batch per Vault call
  (transit's ``batch_input``) instead of a call per value;
- their fields are sealed under their own key (``vault.seal``, the consumer id as associated
  data) and masked (``personal_data``), and the ``domain.Register`` command is decided by
  ``domain.register`` and appended and projected by ``Pipeline.run_many`` on the ``CONSUMER``
  aggregate (``services/eligibility/handlers.py``), with the wrapped key in ``person_keys``, in
  one transaction per batch. The events are the ones a registration appends, so the relay
  publishes them and the audit log records them as usual.

What it skips is the identity authority's three-factor check (the people are made up; the
simulator would confirm each one it was told about) and the gRPC edge. :func:`check_sample`
then proves the seeded consumers are what a registration would have made: a sample registers
again over gRPC (the full use case, with the authority) and must be found as the same consumer
by its blind index, and their personal data must decrypt through ``Eligibility.reveal``.
"""

from __future__ import annotations

import asyncio
import base64
import os
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import hvac

from services.eligibility import domain
from services.eligibility.authority import Verdict
from services.eligibility.handlers import CONSUMER, SERVICE, Eligibility
from services.eligibility.projections import apply_event, person_keys
from services.kernel import vault
from services.kernel.contract import personal_data
from services.kernel.events import Context
from services.kernel.eventstore import EventStore, make_engine
from services.kernel.identity import Role
from services.kernel.pipeline import Pipeline
from subsidy.v1 import eligibility_pb2, identity_pb2
from subsidyctl import demo
from subsidyctl.localstack import LocalStack

BATCH = 1000  # consumers per transaction
VAULT_BATCH = 200  # values per transit call: OpenBao refuses JSON with too many strings


class SeedMismatch(Exception):
    """A seeded consumer is not what a registration would have made."""


def _blind_indexes(client: hvac.Client, purpose: str, values: Sequence[str]) -> list[str]:
    """``vault.Vault.blind_index`` for many values, VAULT_BATCH per transit call."""
    out: list[str] = []
    for start in range(0, len(values), VAULT_BATCH):
        batch = [
            {"input": base64.b64encode(f"{purpose}:{v}".encode()).decode()}
            for v in values[start : start + VAULT_BATCH]
        ]
        res = client.adapter.post(
            f"/v1/transit/hmac/{vault.BLIND_INDEX_KEY}/sha2-256", json={"batch_input": batch}
        )
        out += [str(r["hmac"]).split(":")[-1] for r in res["data"]["batch_results"]]
    return out


def _data_keys(client: hvac.Client, count: int) -> list[tuple[bytes, vault.WrappedKey]]:
    """``vault.Vault.new_data_key`` for many people, VAULT_BATCH per transit call: a fresh
    256-bit key each, wrapped by the key-encryption key (what transit's datakey endpoint does
    for one key per call)."""
    keys = [os.urandom(32) for _ in range(count)]
    wrapped: list[vault.WrappedKey] = []
    for start in range(0, count, VAULT_BATCH):
        res = client.secrets.transit.encrypt_data(
            name=vault.KEK_KEY,
            batch_input=[
                {"plaintext": base64.b64encode(k).decode()}
                for k in keys[start : start + VAULT_BATCH]
            ],
        )
        wrapped += [vault.WrappedKey(str(r["ciphertext"])) for r in res["data"]["batch_results"]]
    return list(zip(keys, wrapped, strict=True))


def _command(
    person: demo.Person,
    platform_id: str,
    key: bytes,
    id_index: str,
    phone_index: str,
) -> domain.Register:
    """The command ``Eligibility.register`` builds for a new, confirmed person."""
    consumer_id = f"c-{uuid.uuid4().hex}"
    aad = consumer_id.encode()
    return domain.Register(
        consumer_id=consumer_id,
        platform_id=platform_id,
        name_sealed=vault.seal(key, person.name, aad),
        id_number_sealed=vault.seal(key, person.id_number, aad),
        phone_sealed=vault.seal(key, person.phone, aad),
        id_number_index=id_index,
        phone_index=phone_index,
        id_number_masked=personal_data.mask_id_number(person.id_number),
        phone_masked=personal_data.mask_phone(person.phone),
    )


async def seed(
    stack: LocalStack,
    client: demo.Client,
    persons: Sequence[demo.Person],
    progress: Callable[[int], None] = lambda done: None,
) -> list[str]:
    """Register ``persons`` with the demo platform, a batch per transaction; their consumer ids
    in order. ``progress(done)`` after each batch."""
    assert stack.pg is not None and stack.bao is not None
    bao = stack.bao.client()
    store = EventStore(make_engine(stack.pg.url("eligibility"), pool_size=1))
    pipeline = Pipeline(store, SERVICE, apply_event)
    ctx = Context(client.identities.caller(Role.PLATFORM).actor())
    ids: list[str] = []
    try:
        for start in range(0, len(persons), BATCH):
            chunk = persons[start : start + BATCH]
            id_idx, phone_idx, keys = await asyncio.gather(
                asyncio.to_thread(_blind_indexes, bao, "id_number", [p.id_number for p in chunk]),
                asyncio.to_thread(_blind_indexes, bao, "phone", [p.phone for p in chunk]),
                asyncio.to_thread(_data_keys, bao, len(chunk)),
            )
            commands = [
                _command(p, client.platform_id, key, i, ph)
                for p, (key, _), i, ph in zip(chunk, keys, id_idx, phone_idx, strict=True)
            ]
            async with store.transaction() as tx:
                await tx.conn.execute(
                    person_keys.insert(),
                    [
                        {"consumer_id": c.consumer_id, "wrapped_key": w.ciphertext}
                        for c, (_, w) in zip(commands, keys, strict=True)
                    ],
                )
                await pipeline.run_many(
                    CONSUMER,
                    [(c.consumer_id, _decide(c)) for c in commands],
                    ctx,
                    tx=tx,
                )
            ids += [c.consumer_id for c in commands]
            progress(len(ids))
    finally:
        await store.engine.dispose()
    return ids


class _NoAuthority:
    """The sample check only calls ``reveal``, which never asks the authority."""

    async def verify(self, name: str, id_number: str, phone: str) -> Verdict:
        raise AssertionError("reveal() does not ask the identity authority")


def _decide(command: domain.Register) -> Callable[[Any], Any]:
    return lambda existing: domain.register(existing, command)


async def check_sample(
    stack: LocalStack,
    client: demo.Client,
    persons: Sequence[demo.Person],
    ids: Sequence[str],
    size: int = 20,
) -> None:
    """A sample of seeded people registers again over gRPC and is found as the same consumer
    (the blind indexes match the service's), and their data decrypts as the service reads it
    (the wrapped keys are the service's). Raises :class:`SeedMismatch` otherwise."""
    assert stack.pg is not None
    step = max(1, len(persons) // size)
    sample = list(range(0, len(persons), step))[:size]
    for i in sample:
        person = persons[i]
        await client.authority.Enroll(
            identity_pb2.EnrollRequest(
                name=person.name, id_number=person.id_number, phone=person.phone
            )
        )
        again = await client.eligibility.RegisterConsumer(
            eligibility_pb2.RegisterConsumerRequest(
                name=person.name,
                id_number=person.id_number,
                phone=person.phone,
                platform_id=client.platform_id,
            )
        )
        if not again.already_registered or again.consumer_id != ids[i]:
            raise SeedMismatch("a seeded person registering again was not found as themselves")
    store = EventStore(make_engine(stack.pg.url("eligibility"), pool_size=1))
    assert stack.bao is not None
    keys = vault.connect(stack.bao.addr, token=stack.bao.token)
    try:
        e = Eligibility(store, keys, _NoAuthority())
        for i in sample:
            revealed = await e.reveal(ids[i])
            person = persons[i]
            if revealed != {
                "name": person.name,
                "id_number": person.id_number,
                "phone": person.phone,
            }:
                raise SeedMismatch("a seeded consumer's data does not decrypt as registered")
    finally:
        await store.engine.dispose()
