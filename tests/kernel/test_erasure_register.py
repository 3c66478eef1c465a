"""The erasure register (services/eligibility/erasures.py) in a real OpenBao: an erasure is
recorded in Vault's KV v2 outside every database and listed back; a Vault that will not record
it refuses the erasure (``UNAVAILABLE``), so no erasure commits unregistered."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from services.eligibility import erasures
from services.kernel import vault
from services.kernel.errors import Unavailable
from tests.conftest import Infra


def test_an_erasure_is_registered_and_listed_back(infra: Infra) -> None:
    keys = vault.connect(infra.bao.addr, token=infra.bao.token)
    consumers = [str(uuid.uuid4()) for _ in range(3)]
    for consumer in consumers:
        asyncio.run(erasures.record(keys, consumer))
    registered = erasures.registered_sync(keys)
    assert set(consumers) <= set(registered)
    entry = keys.read_secret_sync(erasures.path_of(consumers[0]))
    assert entry is not None and set(entry) == {"requested_at"}  # a time, nothing personal
    assert keys.list_secrets_sync("secret/nothing-here") == []


def test_a_vault_that_will_not_record_the_erasure_refuses_it(infra: Infra) -> None:
    client = infra.bao.client()
    # Eligibility's transit rights, but not the register's.
    client.sys.create_or_update_policy(
        "no-register", 'path "transit/*" { capabilities = ["update"] }'
    )
    token = client.auth.token.create(policies=["no-register"], ttl="10m")["auth"]["client_token"]
    keys = vault.connect(infra.bao.addr, token=token)
    consumer = str(uuid.uuid4())
    with pytest.raises(Unavailable) as refused:
        asyncio.run(erasures.record(keys, consumer))
    assert refused.value.reason == "VAULT_UNAVAILABLE"
    assert "secret/erasures/" in refused.value.message
    root = vault.connect(infra.bao.addr, token=infra.bao.token)
    assert consumer not in erasures.registered_sync(root)
