"""Signed notes and checkpoints against the published examples, and what a verifier refuses.

Vectors: the verifier key and note of c2sp.org/signed-note@v1.0.0 ("Example"), the checkpoint
body of c2sp.org/tlog-checkpoint, and the PeterNeumann key and note of Go's
golang.org/x/mod/sumdb/note documentation.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from services.kernel.contract.checkpoint import (
    Checkpoint,
    NoteInvalid,
    Signature,
    VerifierKey,
    open_checkpoint,
    open_note,
    signed_note,
    split_note,
)

C2SP_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
C2SP_NOTE = (
    "This is an example message.\n\n"
    "\u2014 example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3"
    "mFXmRKuwHjG1Yu72IneyaQM=\n"
)
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_NOTE = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n\n"
    "\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngot"
    "pRZb6KE6RyyBwJnAM=\n"
)
C2SP_CHECKPOINT = (
    "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
)


def test_the_published_notes_verify_with_their_published_keys() -> None:
    for vkey, note in ((C2SP_VKEY, C2SP_NOTE), (GO_VKEY, GO_NOTE)):
        key = VerifierKey.parse(vkey)
        assert key.encode() == vkey  # the key ID is recomputed from name and key
        text, signed = open_note(note, [key])
        assert note.startswith(text) and signed == [key]


def test_a_changed_text_or_signature_is_refused_and_unknown_keys_are_ignored() -> None:
    key = VerifierKey.parse(C2SP_VKEY)
    with pytest.raises(NoteInvalid, match="does not verify"):
        open_note(C2SP_NOTE.replace("example message", "example massage"), [key])
    other = VerifierKey.parse(GO_VKEY)
    with pytest.raises(NoteInvalid, match="no key you trust"):
        open_note(C2SP_NOTE, [other])
    # Another key's signature line beside a good one is ignored, as the format requires.
    text, sigs = split_note(C2SP_NOTE)
    stranger = Signature("example.com/foo", b"\x00\x00\x00\x01", b"\x00" * 64)
    assert open_note(signed_note(text, [stranger, *sigs]), [key])[1] == [key]
    # A known key whose signature fails rejects the whole note, even beside a good one.
    forged = Signature(sigs[0].name, sigs[0].key_id, bytes(64))
    with pytest.raises(NoteInvalid):
        open_note(signed_note(text, [*sigs, forged]), [key])


def test_the_published_checkpoint_body_parses_and_is_written_back_byte_for_byte() -> None:
    cp = Checkpoint.parse(C2SP_CHECKPOINT)
    assert (cp.origin, cp.size) == ("example.com/behind-the-sofa", 20852163)
    assert cp.root == base64.b64decode("CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=")
    assert cp.body() == C2SP_CHECKPOINT


def keypair(name: str) -> tuple[Ed25519PrivateKey, VerifierKey]:
    private = Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return private, VerifierKey(name, public)


def test_a_verifier_key_whose_base64_holds_a_plus_is_read_back() -> None:
    """The key is the third part: everything after the second "+" (base64 has "+" too)."""
    for _ in range(200):
        _, key = keypair("subsidy.example/audit")
        if "+" in key.encode().split("+", 2)[2]:
            assert VerifierKey.parse(key.encode()) == key
            return
    raise AssertionError("no key with a '+' in 200 tries")


def test_a_checkpoint_signed_and_opened() -> None:
    private, key = keypair("subsidy.example/audit")
    at = datetime(2026, 12, 1, 10, 0, 5, tzinfo=UTC)
    cp = Checkpoint("subsidy.example/audit", 42, bytes(range(32)), at)
    body = cp.body()
    assert body.endswith("\nTimestamp: 2026-12-01T10:00:05Z\n")
    note = signed_note(body, [Signature(key.name, key.key_id, private.sign(body.encode()))])
    assert open_checkpoint(note, [key]) == cp
    # Signed by a trusted key, but one named for another log: not this log's checkpoint.
    private2, key2 = keypair("elsewhere.example/log")
    note2 = signed_note(body, [Signature(key2.name, key2.key_id, private2.sign(body.encode()))])
    with pytest.raises(NoteInvalid, match="no trusted key named"):
        open_checkpoint(note2, [key2])
    # The size, the root and the timestamp are all signed.
    for changed in (
        note.replace("\n42\n", "\n43\n"),
        note.replace("10:00:05Z", "10:00:06Z"),
    ):
        with pytest.raises(NoteInvalid):
            open_checkpoint(changed, [key])


@pytest.mark.parametrize(
    "text",
    [
        "origin\n",  # too few lines
        "origin\n012\nAAAA\n",  # leading zero
        "origin\n-1\n" + base64.b64encode(bytes(32)).decode() + "\n",
        "origin\n1\nnot base64!\n",
        "origin\n1\n" + base64.b64encode(bytes(31)).decode() + "\n",
        "origin\n1\n" + base64.b64encode(bytes(32)).decode(),  # no final newline
        "origin\n1\n" + base64.b64encode(bytes(32)).decode() + "\n\nextension\n",  # empty line
    ],
)
def test_malformed_checkpoints_are_refused(text: str) -> None:
    with pytest.raises(NoteInvalid):
        Checkpoint.parse(text)


@pytest.mark.parametrize(
    "vkey",
    [
        "example.com/foo+530d903b+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k",  # wrong ID
        "example.com/foo+530d903a+AgkyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k",  # not type 1
        "example.com/foo+530d903a",
        "ex ample+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k",
    ],
)
def test_malformed_verifier_keys_are_refused(vkey: str) -> None:
    with pytest.raises(NoteInvalid):
        VerifierKey.parse(vkey)


def test_notes_with_control_characters_or_without_signatures_are_refused() -> None:
    with pytest.raises(NoteInvalid):
        split_note("text\x07\n\n\u2014 a AAAAAAA=\n")
    with pytest.raises(NoteInvalid):
        split_note("text\n")
    with pytest.raises(NoteInvalid):
        split_note("text\n\nnot a signature\n")
