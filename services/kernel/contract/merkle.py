"""The audit log's Merkle tree (RFC 6962 §2.1, RFC 9162 §2.1), pure: hashing, proofs, checks.

No maintained Python library computes and verifies RFC 9162 inclusion and consistency proofs
(the transparency-log world writes them in Go, Rust and C++), so this module is written here,
from the RFCs' definitions, and checked against the published test vectors of Go's
``transparency-dev/merkle`` (commit 417fb0c: the leaves, node hashes and roots of
``testonly/constants.go``, every probe under ``testdata/inclusion`` and
``testdata/consistency``, and the node layouts of ``proof/proof_test.go``): see
``tests/unit/test_merkle.py``. The audit service stores the tree with it, ``subsidyctl audit
verify`` recomputes it, and ``subsidyctl/verify_proof.py`` re-implements the two checks with the
standard library alone for an auditor offline.

The tree is stored as its *complete subtrees*: node ``(level, index)`` is the hash of the
``2**level`` leaves from ``index * 2**level``. A node never changes once the log is long enough
to complete it, so the nodes stored for today's tree also answer every proof for every size the
log has had: a proof element is either one such node or a right edge that
:func:`range_nodes` tiles with a few of them and :func:`fold` hashes together.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

HASH_SIZE: Final = 32
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()  # RFC 6962: MTH({}) = SHA-256()
_LEAF: Final = b"\x00"
_NODE: Final = b"\x01"

NodeId = tuple[int, int]  # (level, index): the complete subtree of leaves [i·2^l, (i+1)·2^l)
Range = tuple[int, int]  # [begin, end) of leaf indexes


class ProofInvalid(ValueError):
    """A proof does not prove what it claims (or its parameters are impossible)."""


def leaf_hash(data: bytes) -> bytes:
    """SHA-256(0x00 ‖ data): the leaf of one entry."""
    return hashlib.sha256(_LEAF + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 ‖ left ‖ right): an interior node."""
    return hashlib.sha256(_NODE + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n > 1): where RFC 6962 splits a tree."""
    return 1 << ((n - 1).bit_length() - 1)


def range_nodes(begin: int, end: int) -> list[NodeId]:
    """The complete subtrees that tile leaves ``[begin, end)``, left to right, each as large as
    its position allows. For the ranges a proof or a root needs (the whole tree, or the right
    part of an RFC 6962 split), the range's hash is :func:`fold` of these nodes' hashes."""
    nodes: list[NodeId] = []
    while begin < end:
        level = (begin & -begin).bit_length() - 1 if begin else (end - begin).bit_length() - 1
        while 1 << level > end - begin:
            level -= 1
        nodes.append((level, begin >> level))
        begin += 1 << level
    return nodes


def fold(hashes: Sequence[bytes]) -> bytes:
    """The hash of a range from its :func:`range_nodes` hashes: each node is the left child of
    everything to its right (RFC 6962 puts the incomplete part of a tree on the right)."""
    if not hashes:
        return EMPTY_ROOT
    acc = hashes[-1]
    for h in reversed(hashes[:-1]):
        acc = node_hash(h, acc)
    return acc


def inclusion_ranges(index: int, size: int) -> list[Range]:
    """The ranges whose hashes are the inclusion proof of leaf ``index`` in the tree of
    ``size`` leaves, from the leaf up (RFC 9162 §2.1.3.1, PATH)."""
    if not 0 <= index < size:
        raise ProofInvalid(f"leaf {index} is not in a tree of {size} leaves")
    path: list[Range] = []
    begin, end = 0, size
    while end - begin > 1:
        k = _split(end - begin)
        if index < begin + k:
            path.append((begin + k, end))
            end = begin + k
        else:
            path.append((begin, begin + k))
            begin += k
    return path[::-1]


def consistency_ranges(old_size: int, new_size: int) -> list[Range]:
    """The ranges whose hashes are the consistency proof from the tree of ``old_size`` leaves to
    the tree of ``new_size`` (RFC 9162 §2.1.4.1, SUBPROOF); empty when the sizes are equal."""
    if not 0 < old_size <= new_size:
        raise ProofInvalid(f"no consistency proof from {old_size} to {new_size} leaves")
    path: list[Range] = []
    begin, end, m, whole = 0, new_size, old_size, True
    while m != end - begin:
        k = _split(end - begin)
        if m <= k:
            path.append((begin + k, end))
            end = begin + k
        else:
            path.append((begin, begin + k))
            begin, m, whole = begin + k, m - k, False
    if not whole:  # the old tree's root is not a node the verifier already has
        path.append((begin, end))
    return path[::-1]


def proof_nodes(ranges: Iterable[Range]) -> list[NodeId]:
    """Every stored node a proof of these ranges needs (to fetch them in one query)."""
    return [node for r in ranges for node in range_nodes(*r)]


def proof_hashes(ranges: Sequence[Range], node: Callable[[NodeId], bytes]) -> list[bytes]:
    """The proof itself: each range's hash, from the stored complete subtrees ``node``."""
    return [fold([node(n) for n in range_nodes(*r)]) for r in ranges]


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    """RFC 9162 §2.1.3.2: ``proof`` shows the leaf hash ``leaf`` at ``index`` in the tree of
    ``size`` leaves whose root is ``root``; raises :class:`ProofInvalid` otherwise."""
    if not 0 <= index < size:
        raise ProofInvalid(f"leaf {index} is not in a tree of {size} leaves")
    _check_hashes([leaf, root, *proof])
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofInvalid("the inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofInvalid("the inclusion proof is shorter than the tree is deep")
    if r != root:
        raise ProofInvalid(f"leaf {index} and its proof lead to another root than the tree's")


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """RFC 9162 §2.1.4.2: ``proof`` shows that the tree of ``old_size`` leaves with root
    ``old_root`` is a prefix of the tree of ``new_size`` with root ``new_root``; raises
    :class:`ProofInvalid` otherwise. Equal sizes need equal roots and an empty proof; a proof
    from the empty tree proves nothing and is refused (both as transparency-dev/merkle's
    probes expect)."""
    if old_size > new_size:
        raise ProofInvalid(f"the tree shrank from {old_size} to {new_size} leaves")
    if old_size == 0:
        raise ProofInvalid("a consistency proof from the empty tree proves nothing")
    if old_size == new_size:
        if proof:
            raise ProofInvalid("a consistency proof between equal sizes must be empty")
        if old_root != new_root:
            raise ProofInvalid(f"two different roots for the same size {old_size}")
        return
    _check_hashes([old_root, new_root, *proof])
    if not proof:
        raise ProofInvalid("the consistency proof is empty")
    path = [old_root, *proof] if old_size & (old_size - 1) == 0 else list(proof)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofInvalid("the consistency proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofInvalid("the consistency proof is shorter than the tree is deep")
    if fr != old_root:
        raise ProofInvalid(f"the proof does not lead to the old root (size {old_size})")
    if sr != new_root:
        raise ProofInvalid(f"the proof does not lead to the new root (size {new_size})")


def _check_hashes(proof: Sequence[bytes]) -> None:
    if any(len(h) != HASH_SIZE for h in proof):
        raise ProofInvalid(f"every hash (leaf, root, proof) is {HASH_SIZE} bytes")


@dataclass
class CompactRange:
    """The right edge of a tree: the roots of the complete subtrees that tile ``[0, size)``
    (:func:`range_nodes` of it, largest first). Enough to append leaves and to compute the
    root, in O(log n) memory: how the audit service integrates new entries and how the
    auditor recomputes the root of a log it downloads."""

    size: int = 0
    hashes: list[bytes] = field(default_factory=list)

    def append(
        self, leaf: bytes, completed: Callable[[int, int, bytes], None] | None = None
    ) -> None:
        """Add one leaf hash; ``completed(level, index, hash)`` is told the leaf and every
        node it completes (the nodes the audit service stores)."""
        index, level, h, s = self.size, 0, leaf, self.size
        if completed is not None:
            completed(0, index, h)
        while s & 1:
            h = node_hash(self.hashes.pop(), h)
            s, index, level = s >> 1, index >> 1, level + 1
            if completed is not None:
                completed(level, index, h)
        self.hashes.append(h)
        self.size += 1

    def extend(self, leaves: Iterable[bytes]) -> None:
        """Add many leaf hashes (no node is reported: the verifier's fast path)."""
        hashes, size = self.hashes, self.size
        for h in leaves:
            s = size
            while s & 1:
                h = node_hash(hashes.pop(), h)
                s >>= 1
            hashes.append(h)
            size += 1
        self.size = size

    def root(self) -> bytes:
        """The tree's root hash (RFC 6962 MTH of the leaves so far)."""
        return fold(self.hashes)

    def nodes(self) -> list[NodeId]:
        """Which stored nodes these hashes are."""
        return range_nodes(0, self.size)


def root_of(leaves: Iterable[bytes]) -> bytes:
    """MTH of the tree with these leaf hashes."""
    tree = CompactRange()
    tree.extend(leaves)
    return tree.root()
