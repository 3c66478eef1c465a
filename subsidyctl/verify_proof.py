"""Check `subsidyctl audit prove` output offline, with nothing but Python's standard library.

    python verify_proof.py PROOF.json --key LOG.vkey

PROOF.json is what ``subsidyctl audit prove --order ORDER --out PROOF.json`` wrote; LOG.vkey the
log's verifier key (``subsidyctl audit key --out LOG.vkey``, a C2SP vkey line), which the auditor
pinned when they got it. The script trusts nothing else in the file: it checks the checkpoint's
Ed25519 signature with the pinned key (C2SP signed-note), reads the tree size and root from the
signed checkpoint (C2SP tlog-checkpoint), recomputes each entry's leaf from its envelope bytes
(SHA-256(0x00 ‖ bytes), RFC 6962) and checks its inclusion proof (RFC 9162 §2.1.3.2). Exit 0 when
every entry is proved, 1 otherwise, with one line per entry either way.

It is deliberately a second implementation, independent of the platform's code: Ed25519
verification as RFC 8032 §5.1.7 describes it (Python has no Ed25519 in its standard library),
and the inclusion check as RFC 9162 writes it. Copy this one file to wherever you check proofs.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from typing import Any

# -- Ed25519 verification (RFC 8032 §5.1) ------------------------------------------------------
_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)
Point = tuple[int, int, int, int]  # extended coordinates (X, Y, Z, T), x = X/Z, y = Y/Z


def _add(p: Point, q: Point) -> Point:
    a = (p[1] - p[0]) * (q[1] - q[0]) % _P
    b = (p[1] + p[0]) * (q[1] + q[0]) % _P
    c = 2 * p[3] * q[3] * _D % _P
    d = 2 * p[2] * q[2] % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _multiply(s: int, p: Point) -> Point:
    q: Point = (0, 1, 1, 0)  # the neutral element
    while s:
        if s & 1:
            q = _add(q, p)
        p, s = _add(p, p), s >> 1
    return q


def _equal(p: Point, q: Point) -> bool:
    return (p[0] * q[2] - q[0] * p[2]) % _P == 0 and (p[1] * q[2] - q[1] * p[2]) % _P == 0


def _decode_point(data: bytes) -> Point | None:
    y = int.from_bytes(data, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    if y >= _P:
        return None
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P) % _P
    if x2 == 0:
        if sign:
            return None
        x = 0
    else:
        x = pow(x2, (_P + 3) // 8, _P)
        if (x * x - x2) % _P:
            x = x * _SQRT_M1 % _P
        if (x * x - x2) % _P:
            return None
        if x & 1 != sign:
            x = _P - x
    return (x, y, 1, x * y % _P)


_G = _decode_point((4 * pow(5, _P - 2, _P) % _P).to_bytes(32, "little"))


def ed25519_verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s Ed25519 signature of ``message``."""
    if len(public_key) != 32 or len(signature) != 64 or _G is None:
        return False
    a, r = _decode_point(public_key), _decode_point(signature[:32])
    s = int.from_bytes(signature[32:], "little")
    if a is None or r is None or s >= _L:
        return False
    k = int.from_bytes(hashlib.sha512(signature[:32] + public_key + message).digest(), "little")
    return _equal(_multiply(s, _G), _add(r, _multiply(k % _L, a)))


# -- signed note and checkpoint (C2SP signed-note, tlog-checkpoint) -----------------------------
def parse_vkey(line: str) -> tuple[str, bytes, bytes]:
    """(name, key ID, public key) of ``<name>+<hex id>+base64(0x01 ‖ key)``."""
    name, key_id, material = line.strip().split("+", 2)
    raw = base64.b64decode(material, validate=True)
    if len(raw) != 33 or raw[0] != 1:
        raise ValueError("not an Ed25519 verifier key")
    expected = hashlib.sha256(name.encode() + b"\n\x01" + raw[1:]).digest()[:4]
    if expected.hex() != key_id:
        raise ValueError("the verifier key's ID is not its key's")
    return name, expected, raw[1:]


def open_checkpoint(note: str, vkeys: list[tuple[str, bytes, bytes]]) -> tuple[str, int, bytes]:
    """(origin, tree size, root) of a checkpoint signed by one of ``vkeys``."""
    cut = note.rfind("\n\n")
    if cut < 0:
        raise ValueError("the checkpoint has no signature")
    text, lines = note[: cut + 1], note[cut + 2 :].splitlines()
    known = {(name, key_id): key for name, key_id, key in vkeys}
    signed_by = set()
    for line in lines:
        dash, name, b64 = line.split(" ")
        raw = base64.b64decode(b64, validate=True)
        key = known.get((name, raw[:4]))
        if dash != "\u2014" or key is None:
            continue  # not a signature line of a key we trust: ignored, as the format says
        if not ed25519_verify(key, text.encode(), raw[4:]):
            raise ValueError(f"the signature of {name} does not verify")
        signed_by.add(name)
    origin, size, root = text.split("\n")[:3]
    if origin not in signed_by:
        raise ValueError(f"no trusted key named {origin!r} signed the checkpoint")
    return origin, int(size), base64.b64decode(root, validate=True)


# -- RFC 9162 inclusion -------------------------------------------------------------------------
def verify_inclusion(index: int, size: int, leaf: bytes, proof: list[bytes], root: bytes) -> bool:
    """RFC 9162 §2.1.3.2."""
    if not 0 <= index < size or any(len(h) != 32 for h in (leaf, root, *proof)):
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = hashlib.sha256(b"\x01" + p + r).digest()
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = hashlib.sha256(b"\x01" + r + p).digest()
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == root


def check(proof_file: dict[str, Any], vkeys: list[tuple[str, bytes, bytes]]) -> list[str]:
    """One line per entry, each starting with OK or FAIL (the first line: the checkpoint)."""
    origin, size, root = open_checkpoint(proof_file["checkpoint"], vkeys)
    lines = [f"OK   checkpoint {origin} size {size} root {root.hex()} (signature verified)"]
    for e in proof_file["entries"]:
        envelope = base64.b64decode(e["envelope_b64"], validate=True)
        leaf = hashlib.sha256(b"\x00" + envelope).digest()
        proof = [base64.b64decode(h, validate=True) for h in e["proof_b64"]]
        good = verify_inclusion(int(e["index"]), size, leaf, proof, root)
        label = f"entry {e['index']} {e.get('event_type', '')} {e.get('event_id', '')}".rstrip()
        lines.append(f"{'OK  ' if good else 'FAIL'} {label}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("proof", help="the JSON `subsidyctl audit prove` printed")
    parser.add_argument("--key", required=True, help="file with the log's vkey line(s)")
    args = parser.parse_args(argv)
    try:
        with open(args.key, encoding="utf-8") as f:
            vkeys = [parse_vkey(ln) for ln in f if ln.strip() and not ln.startswith("#")]
        with open(args.proof, encoding="utf-8") as f:
            lines = check(json.load(f), vkeys)
    except (OSError, ValueError, KeyError) as exc:
        print(f"FAIL {exc}")
        return 1
    print("\n".join(lines))
    proved = all(line.startswith("OK") for line in lines) and len(lines) > 1
    return 0 if proved else 1


if __name__ == "__main__":
    sys.exit(main())
