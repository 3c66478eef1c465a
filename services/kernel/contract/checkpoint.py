"""Signed checkpoints of the audit log: C2SP ``tlog-checkpoint`` bodies in C2SP ``signed-note``
envelopes, Ed25519, pure (no I/O; the signature itself comes from Vault transit).

A checkpoint is the note text::

    <origin>
    <tree size>
    <base64 root hash>
    Timestamp: <RFC 3339 UTC time it was signed>

followed by a blank line and one signature line per key, ``— <key name> base64(key ID ‖
signature)``, where the key ID is the first four bytes of SHA-256(key name ‖ 0x0A ‖ 0x01 ‖
public key) and the signature is Ed25519 over the note text (c2sp.org/signed-note@v1.0.0,
c2sp.org/tlog-checkpoint). The timestamp is an extension line, which the format allows and
tools of the transparency-log world carry along unread; the key name is the origin, as the
format recommends. An auditor pins the log's key as a verifier key (vkey),
``<key name>+<hex key ID>+base64(0x01 ‖ public key)``.

No maintained Python library reads and writes signed notes; the format is a few lines, written
here and checked against the examples of the C2SP specification and of Go's
``golang.org/x/mod/sumdb/note`` (tests/unit/test_checkpoint.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .merkle import HASH_SIZE

ED25519: Final = 0x01  # the signed-note signature type of plain Ed25519
EM_DASH: Final = "\u2014"
MAX_NOTE_BYTES: Final = 64 * 1024  # a checkpoint is ~200 bytes; refuse anything absurd
MAX_SIGNATURES: Final = 100  # the format asks verifiers to accept at least 16
_NAME = re.compile(r"^[^\s+]+$")  # non-empty, no Unicode space, no plus
_SIZE = re.compile(r"^(0|[1-9][0-9]{0,18})$")
_TIMESTAMP = "Timestamp: "


class NoteInvalid(ValueError):
    """A note or checkpoint is malformed, or not signed by a trusted key."""


def key_id(name: str, public_key: bytes) -> bytes:
    """The 4-byte key ID of an Ed25519 key: SHA-256(name ‖ 0x0A ‖ 0x01 ‖ key)[:4]."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([ED25519]) + public_key).digest()[:4]


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise NoteInvalid(f"{what} is not base64") from None


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise NoteInvalid(f"key name {name!r}: non-empty, no spaces and no '+'")


@dataclass(frozen=True)
class VerifierKey:
    """A trusted Ed25519 key: its name, ID and public key (a C2SP vkey)."""

    name: str
    public_key: bytes

    def __post_init__(self) -> None:
        _check_name(self.name)
        if len(self.public_key) != 32:
            raise NoteInvalid("an Ed25519 public key is 32 bytes")

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.public_key)

    def encode(self) -> str:
        """``<name>+<hex key ID>+base64(0x01 ‖ public key)``."""
        material = base64.b64encode(bytes([ED25519]) + self.public_key).decode()
        return f"{self.name}+{self.key_id.hex()}+{material}"

    @classmethod
    def parse(cls, text: str) -> VerifierKey:
        """A vkey as :meth:`encode` writes it; its ID must be the one its key gives."""
        parts = text.strip().split("+", 2)  # the base64 key may itself hold a "+"
        if len(parts) != 3 or not re.fullmatch(r"[0-9a-f]{8}", parts[1]):
            raise NoteInvalid("a verifier key is <name>+<8 hex digits>+<base64 key>")
        material = _b64decode(parts[2], "the verifier key")
        if len(material) != 33 or material[0] != ED25519:
            raise NoteInvalid("the verifier key is not an Ed25519 key (type 0x01, 32 bytes)")
        key = cls(parts[0], material[1:])
        if key.key_id.hex() != parts[1]:
            raise NoteInvalid(f"the verifier key's ID {parts[1]} is not its key's")
        return key

    def verifies(self, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is this key's Ed25519 signature of ``message``."""
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class Signature:
    """One signature line of a note."""

    name: str
    key_id: bytes
    signature: bytes

    def line(self) -> str:
        encoded = base64.b64encode(self.key_id + self.signature).decode()
        return f"{EM_DASH} {self.name} {encoded}\n"


def signed_note(text: str, signatures: Sequence[Signature]) -> str:
    """The note: its text (ending in a newline), a blank line, the signature lines."""
    if not text.endswith("\n"):
        raise NoteInvalid("a note's text ends with a newline")
    return text + "\n" + "".join(s.line() for s in signatures)


def split_note(note: str) -> tuple[str, list[Signature]]:
    """A note's text and its signature lines, unverified (what :func:`open_note` checks)."""
    if len(note.encode()) > MAX_NOTE_BYTES:
        raise NoteInvalid(f"the note is larger than {MAX_NOTE_BYTES} bytes")
    if any(ord(c) < 0x20 and c != "\n" for c in note):
        raise NoteInvalid("the note holds a control character")
    cut = note.rfind("\n\n")
    if cut < 0 or not note.endswith("\n"):
        raise NoteInvalid("no blank line between the note's text and its signatures")
    text, lines = note[: cut + 1], note[cut + 2 :].splitlines()
    if not lines or len(lines) > MAX_SIGNATURES:
        raise NoteInvalid(f"a note has 1..{MAX_SIGNATURES} signature lines")
    signatures = []
    for line in lines:
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != EM_DASH:
            raise NoteInvalid(f"not a signature line: {line[:80]!r}")
        _check_name(parts[1])
        raw = _b64decode(parts[2], "a signature")
        if len(raw) < 5:
            raise NoteInvalid("a signature is a key ID and at least one byte")
        signatures.append(Signature(parts[1], raw[:4], raw[4:]))
    return text, signatures


def open_note(note: str, keys: Sequence[VerifierKey]) -> tuple[str, list[VerifierKey]]:
    """The note's text and the trusted keys that signed it, as signed-note requires: a
    signature from a known key (name and ID) must verify, unknown keys are ignored, and at
    least one known key must have signed. Raises :class:`NoteInvalid` otherwise."""
    text, signatures = split_note(note)
    known = {(k.name, k.key_id): k for k in keys}
    signed: list[VerifierKey] = []
    for s in signatures:
        key = known.get((s.name, s.key_id))
        if key is None:
            continue
        if not key.verifies(text.encode(), s.signature):
            raise NoteInvalid(f"the signature of {s.name} ({s.key_id.hex()}) does not verify")
        signed.append(key)
    if not signed:
        raise NoteInvalid("the note is signed by no key you trust")
    return text, signed


@dataclass(frozen=True)
class Checkpoint:
    """A tree head: which log, how many leaves, the root, and when it was signed."""

    origin: str
    size: int
    root: bytes
    timestamp: datetime | None = None

    def body(self) -> str:
        """The note text, as c2sp.org/tlog-checkpoint lays it out (one extension line)."""
        _check_name(self.origin)
        if len(self.root) != HASH_SIZE or self.size < 0:
            raise NoteInvalid("a checkpoint has a size ≥ 0 and a 32-byte root")
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode()]
        if self.timestamp is not None:
            at = self.timestamp.astimezone(UTC).replace(microsecond=0)
            lines.append(_TIMESTAMP + at.isoformat().replace("+00:00", "Z"))
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """A checkpoint's note text; unknown extension lines are ignored, as the format says."""
        lines = text.split("\n")
        if len(lines) < 4 or lines[-1] != "" or any(not line for line in lines[:-1]):
            raise NoteInvalid("a checkpoint is at least three non-empty lines")
        origin, size, root, *extensions = lines[:-1]
        if not origin:
            raise NoteInvalid("the checkpoint has no origin")
        if not _SIZE.fullmatch(size):
            raise NoteInvalid("the checkpoint's tree size is not a decimal number")
        digest = _b64decode(root, "the checkpoint's root hash")
        if len(digest) != HASH_SIZE:
            raise NoteInvalid("the checkpoint's root hash is not 32 bytes")
        timestamp = None
        for line in extensions:
            if line.startswith(_TIMESTAMP):
                try:
                    timestamp = datetime.fromisoformat(line.removeprefix(_TIMESTAMP))
                except ValueError:
                    raise NoteInvalid("the checkpoint's timestamp is not RFC 3339") from None
        return cls(origin, int(size), digest, timestamp)


def open_checkpoint(note: str, keys: Sequence[VerifierKey]) -> Checkpoint:
    """The checkpoint a signed note carries, once a trusted key's signature verified; the key
    name must be the checkpoint's origin (a key for another log proves nothing here)."""
    text, signed = open_note(note, keys)
    checkpoint = Checkpoint.parse(text)
    if not any(k.name == checkpoint.origin for k in signed):
        raise NoteInvalid(f"no trusted key named {checkpoint.origin!r} signed this checkpoint")
    return checkpoint
