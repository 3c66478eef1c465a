"""The audit log's rules, pure: how an entry is hashed and chained. No I/O.

leaf = SHA-256(0x00 ‖ envelope bytes) (RFC 6962 leaf hashing, so the Merkle tree that comes
next reuses the leaves); chain_i = SHA-256(chain_{i-1} ‖ leaf_i), from 32 zero bytes. Hashing
the ciphertext-bearing envelope, never plaintext, keeps every hash valid after a person's key is
shredded. The audit service is not an aggregate of its own: it records other services' events,
so it has no commands; ``log.py`` stores entries with these hashes and ``verify.py`` replays them.
"""

from __future__ import annotations

import hashlib
from typing import Final

GENESIS: Final = b"\x00" * 32


def leaf_hash(envelope_bytes: bytes) -> bytes:
    """The entry's leaf: SHA-256 over a 0x00 prefix and the envelope's deterministic bytes."""
    return hashlib.sha256(b"\x00" + envelope_bytes).digest()


def chain_hash(previous: bytes, leaf: bytes) -> bytes:
    """The chain after appending ``leaf`` to a chain whose head is ``previous``."""
    return hashlib.sha256(previous + leaf).digest()
