"""The auditor's offline script (subsidyctl/verify_proof.py), run with the standard library
only: its Ed25519 against RFC 8032's test vector, the C2SP and sumdb notes and `cryptography`,
its inclusion check against transparency-dev/merkle's probes, and a whole proof file."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from services.kernel.contract import merkle
from services.kernel.contract.checkpoint import Checkpoint, Signature, VerifierKey, signed_note
from subsidyctl import verify_proof
from tests.unit.test_checkpoint import C2SP_NOTE, C2SP_VKEY, GO_NOTE, GO_VKEY
from tests.unit.test_merkle import VECTORS

SCRIPT = Path(verify_proof.__file__)
# RFC 8032 §7.1, TEST 1 (the empty message).
RFC8032_PUBLIC = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
RFC8032_SIGNATURE = (
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
    "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


def test_ed25519_of_rfc8032_and_of_the_published_notes() -> None:
    assert verify_proof.ed25519_verify(
        bytes.fromhex(RFC8032_PUBLIC), b"", bytes.fromhex(RFC8032_SIGNATURE)
    )
    assert not verify_proof.ed25519_verify(
        bytes.fromhex(RFC8032_PUBLIC), b"x", bytes.fromhex(RFC8032_SIGNATURE)
    )
    for vkey, note in ((C2SP_VKEY, C2SP_NOTE), (GO_VKEY, GO_NOTE)):
        _, key_id, public = verify_proof.parse_vkey(vkey)
        text, line = note[: note.rfind("\n\n") + 1], note[note.rfind("\n\n") + 2 :]
        raw = base64.b64decode(line.split(" ")[2])
        assert raw[:4] == key_id
        assert verify_proof.ed25519_verify(public, text.encode(), raw[4:])
        assert not verify_proof.ed25519_verify(public, text.encode() + b" ", raw[4:])


def test_ed25519_agrees_with_cryptography() -> None:
    for i in range(20):
        private = Ed25519PrivateKey.generate()
        public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        message = bytes(range(i * 7 % 256)) * (i + 1)
        signature = private.sign(message)
        assert verify_proof.ed25519_verify(public, message, signature)
        broken = bytearray(signature)
        broken[i % 64] ^= 1 << (i % 8)
        assert not verify_proof.ed25519_verify(public, message, bytes(broken))


@pytest.mark.parametrize("name", sorted(VECTORS["inclusion"]))
def test_its_inclusion_check_on_the_published_probes(name: str) -> None:
    p: dict[str, Any] = VECTORS["inclusion"][name]
    args = (
        p["leafIdx"],
        p["treeSize"],
        base64.b64decode(p["leafHash"]),
        [base64.b64decode(h) for h in p["proof"] or []],
        base64.b64decode(p["root"]),
    )
    assert verify_proof.verify_inclusion(*args) is not p["wantErr"]


def proof_file(tmp_path: Path, n: int = 11) -> tuple[dict[str, Any], Path]:
    """A proof of three entries of an 11-entry log under a signed checkpoint, and the vkey."""
    private = Ed25519PrivateKey.generate()
    key = VerifierKey(
        "test.example/audit", private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    )
    envelopes = [f"envelope {i}".encode() for i in range(n)]
    leaves = [merkle.leaf_hash(e) for e in envelopes]
    nodes: dict[merkle.NodeId, bytes] = {}
    tree = merkle.CompactRange()
    for leaf in leaves:
        tree.append(leaf, lambda level, index, h: nodes.__setitem__((level, index), h))
    body = Checkpoint(key.name, n, tree.root()).body()
    note = signed_note(body, [Signature(key.name, key.key_id, private.sign(body.encode()))])
    entries = [
        {
            "index": i,
            "event_type": "subsidy.v1.SubsidyCaptured",
            "envelope_b64": base64.b64encode(envelopes[i]).decode(),
            "proof_b64": [
                base64.b64encode(h).decode()
                for h in merkle.proof_hashes(merkle.inclusion_ranges(i, n), nodes.__getitem__)
            ],
        }
        for i in (0, 6, 10)
    ]
    vkey = tmp_path / "log.vkey"
    vkey.write_text(key.encode() + "\n")
    return {"checkpoint": note, "entries": entries, "tree_size": n}, vkey


def run(proof: dict[str, Any], vkey: Path, tmp_path: Path) -> tuple[int, list[str]]:
    """The script as an auditor runs it: isolated (-I) and without site-packages (-S), so
    nothing but the standard library is importable."""
    path = tmp_path / "proof.json"
    path.write_text(json.dumps(proof))
    proc = subprocess.run(
        [sys.executable, "-I", "-S", str(SCRIPT), str(path), "--key", str(vkey)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stderr == ""
    return proc.returncode, proc.stdout.splitlines()


def test_a_proof_file_verifies_offline_and_every_kind_of_change_fails(tmp_path: Path) -> None:
    proof, vkey = proof_file(tmp_path)
    code, lines = run(proof, vkey, tmp_path)
    assert code == 0, lines
    assert lines[0].startswith("OK   checkpoint test.example/audit size 11 root ")
    assert lines[1:] == [
        "OK   entry 0 subsidy.v1.SubsidyCaptured",
        "OK   entry 6 subsidy.v1.SubsidyCaptured",
        "OK   entry 10 subsidy.v1.SubsidyCaptured",
    ]
    # One byte of one entry's envelope changed: that entry, and only it, fails.
    changed = json.loads(json.dumps(proof))
    raw = bytearray(base64.b64decode(changed["entries"][1]["envelope_b64"]))
    raw[3] ^= 1
    changed["entries"][1]["envelope_b64"] = base64.b64encode(bytes(raw)).decode()
    code, lines = run(changed, vkey, tmp_path)
    assert (code, lines[2]) == (1, "FAIL entry 6 subsidy.v1.SubsidyCaptured")
    assert lines[1].startswith("OK") and lines[3].startswith("OK")
    # The checkpoint's size changed (its signature no longer holds).
    resized = dict(proof, checkpoint=proof["checkpoint"].replace("\n11\n", "\n12\n"))
    code, lines = run(resized, vkey, tmp_path)
    assert (code, lines) == (1, ["FAIL the signature of test.example/audit does not verify"])
    # Another key pinned: nothing is trusted.
    (tmp_path / "other").mkdir()
    _, other = proof_file(tmp_path / "other")
    code, lines = run(proof, other, tmp_path)
    assert (code, lines) == (
        1,
        ["FAIL no trusted key named 'test.example/audit' signed the checkpoint"],
    )
