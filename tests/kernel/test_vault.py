"""The Vault client against a real OpenBao: sealing, blind indexes, signing, token renewal."""

from __future__ import annotations

import hvac
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from services.kernel import vault
from tests.conftest import Infra


def test_seal_round_trip_and_a_wrong_key_or_context_fails(infra: Infra) -> None:
    v = vault.connect(infra.bao.addr, token=infra.bao.token)
    key, wrapped = v.new_data_key_sync()
    sealed = vault.seal(key, "张三", b"c-1")
    assert "张三".encode() not in sealed
    assert vault.unseal(v.unwrap_sync(wrapped), sealed, b"c-1") == "张三"
    other, _ = v.new_data_key_sync()
    for bad_key, aad in ((other, b"c-1"), (key, b"c-2")):
        try:
            vault.unseal(bad_key, sealed, aad)
        except Exception:
            continue
        raise AssertionError("decrypted with the wrong key or context")


def test_blind_index_is_stable_keyed_and_separated_by_purpose(infra: Infra) -> None:
    v = vault.connect(infra.bao.addr, token=infra.bao.token)
    a = v.blind_index_sync("phone", "13800000000")
    assert a == v.blind_index_sync("phone", "13800000000")
    assert a != v.blind_index_sync("id_number", "13800000000")
    assert "13800000000" not in a


def test_a_batch_of_blind_indexes_is_one_call_equal_to_one_call_each(infra: Infra) -> None:
    v = vault.connect(infra.bao.addr, token=infra.bao.token)
    items = [("device_id", "dev-123456"), ("ip", "10.0.0.1"), ("device_id", "dev-654321")]
    batch = v.blind_indexes_sync(items)
    assert batch == [v.blind_index_sync(purpose, value) for purpose, value in items]
    assert len(set(batch)) == 3 and not any("dev-" in b or "10.0" in b for b in batch)
    assert v.blind_indexes_sync([]) == []


def test_tree_head_signature_verifies_and_detects_tampering(infra: Infra) -> None:
    v = vault.connect(infra.bao.addr, token=infra.bao.token)
    sig = v.sign_sync(b"size=3 root=abc")
    assert v.verify_sync(b"size=3 root=abc", sig)
    assert not v.verify_sync(b"size=4 root=abc", sig)


def test_a_tree_head_signature_is_plain_ed25519_under_the_published_public_key(
    infra: Infra,
) -> None:
    """What lets an auditor check a checkpoint offline: transit signs the message itself (no
    prehash), so the public key Vault publishes verifies it with any Ed25519 library."""
    v = vault.connect(infra.bao.addr, token=infra.bao.token)
    version, signature = v.sign_tree_head_sync(b"subsidy.example/audit\n3\nAAAA\n")
    public = Ed25519PublicKey.from_public_bytes(v.tree_head_public_keys_sync()[version])
    public.verify(signature, b"subsidy.example/audit\n3\nAAAA\n")
    with pytest.raises(InvalidSignature):
        public.verify(signature, b"subsidy.example/audit\n4\nAAAA\n")


def test_a_short_lived_token_is_renewed(infra: Infra) -> None:
    root = hvac.Client(url=infra.bao.addr, token=infra.bao.token)
    short = root.auth.token.create(policies=["root"], ttl="30s", renewable=True)["auth"]
    v = vault.connect(infra.bao.addr, token=short["client_token"])
    next_check = v.keep_token_fresh_sync()
    assert 5.0 <= next_check <= 15.0  # renewed for its 30 s period: check again at half of it
    ttl = root.auth.token.lookup(short["client_token"])["data"]["ttl"]
    assert ttl > 20


def test_a_token_without_expiry_needs_no_renewal(infra: Infra) -> None:
    v = vault.connect(infra.bao.addr, token=infra.bao.token)
    assert v.keep_token_fresh_sync() == 3600.0
