"""The audit log's Merkle tree against published RFC 6962 test vectors, and properties.

Vectors: Go's transparency-dev/merkle at commit 417fb0c — the eight leaf inputs, every complete
subtree's hash and the roots of sizes 0..8 (``testonly/constants.go``, transcribed below), every
inclusion and consistency probe of ``testdata/`` (``vectors/transparency_dev_merkle.json``,
unchanged, with their expected verdicts), and the node layouts of inclusion proofs in
``proof/proof_test.go`` (transcribed below). The properties compare the stored-node proofs with
a reference written straight from RFC 9162's recursive definitions.
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.kernel.contract import merkle
from services.kernel.contract.merkle import (
    CompactRange,
    NodeId,
    ProofInvalid,
    consistency_ranges,
    inclusion_ranges,
    leaf_hash,
    node_hash,
    proof_hashes,
    range_nodes,
    verify_consistency,
    verify_inclusion,
)

VECTORS = json.loads(
    (Path(__file__).parent / "vectors" / "transparency_dev_merkle.json").read_text()
)

# testonly/constants.go: LeafInputs, NodeHashes (by level, then index), RootHashes (by size).
LEAF_INPUTS = [
    bytes.fromhex(h)
    for h in (
        *("", "00", "10", "2021", "3031", "40414243", "5051525354555657"),
        "606162636465666768696a6b6c6d6e6f",
    )
]
NODE_HASHES = [
    [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
        "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
        "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
        "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
    ],
    [
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
    ],
    [
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    ["5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"],
]
ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def b64(value: str | None) -> bytes:
    return base64.b64decode(value or "")


def stored(leaves: list[bytes]) -> dict[NodeId, bytes]:
    """Every node the audit service stores for a log of these leaf hashes."""
    nodes: dict[NodeId, bytes] = {}
    tree = CompactRange()
    for leaf in leaves:
        tree.append(leaf, lambda level, index, h: nodes.__setitem__((level, index), h))
    return nodes


# -- the reference: RFC 9162 §2.1.1, §2.1.3.1, §2.1.4.1, recursively ---------------------------
def ref_root(leaves: list[bytes]) -> bytes:
    if not leaves:
        return merkle.EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return node_hash(ref_root(leaves[:k]), ref_root(leaves[k:]))


def ref_path(m: int, leaves: list[bytes]) -> list[bytes]:
    if len(leaves) == 1:
        return []
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    if m < k:
        return [*ref_path(m, leaves[:k]), ref_root(leaves[k:])]
    return [*ref_path(m - k, leaves[k:]), ref_root(leaves[:k])]


def ref_subproof(m: int, leaves: list[bytes], whole: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if whole else [ref_root(leaves)]
    k = 1 << ((n - 1).bit_length() - 1)
    if m <= k:
        return [*ref_subproof(m, leaves[:k], whole), ref_root(leaves[k:])]
    return [*ref_subproof(m - k, leaves[k:], False), ref_root(leaves[:k])]


# -- the vectors ------------------------------------------------------------------------------
def test_leaves_nodes_and_roots_of_the_published_tree() -> None:
    leaves = [leaf_hash(d) for d in LEAF_INPUTS]
    nodes = stored(leaves)
    expected = {
        (level, index): bytes.fromhex(h)
        for level, row in enumerate(NODE_HASHES)
        for index, h in enumerate(row)
    }
    assert nodes == expected  # exactly the complete subtrees, keyed as the vectors key them
    for size, root in enumerate(ROOTS):
        tree = CompactRange()
        tree.extend(leaves[:size])
        assert tree.root().hex() == root, size
        assert merkle.root_of(leaves[:size]).hex() == root
        # ...and from the stored nodes of the *whole* tree, for every past size
        assert merkle.fold([nodes[n] for n in range_nodes(0, size)]).hex() == root


@pytest.mark.parametrize("name", sorted(VECTORS["inclusion"]))
def test_published_inclusion_probes(name: str) -> None:
    p: dict[str, Any] = VECTORS["inclusion"][name]
    proof = [b64(h) for h in p["proof"] or []]
    args = (p["leafIdx"], p["treeSize"], b64(p["leafHash"]), proof, b64(p["root"]))
    if p["wantErr"]:
        with pytest.raises(ProofInvalid):
            verify_inclusion(*args)
    else:
        verify_inclusion(*args)


@pytest.mark.parametrize("name", sorted(VECTORS["consistency"]))
def test_published_consistency_probes(name: str) -> None:
    p: dict[str, Any] = VECTORS["consistency"][name]
    proof = [b64(h) for h in p["proof"] or []]
    args = (p["size1"], p["size2"], b64(p["root1"]), b64(p["root2"]), proof)
    if p["wantErr"]:
        with pytest.raises(ProofInvalid):
            verify_consistency(*args)
    else:
        verify_consistency(*args)


def test_proofs_generated_from_stored_nodes_are_the_published_ones() -> None:
    """Every happy-path probe is over the published 8-leaf tree: our proofs, built from the
    nodes stored for all 8 leaves, are byte for byte the published proofs, at every size."""
    nodes = stored([leaf_hash(d) for d in LEAF_INPUTS])
    happy = 0
    for name, p in VECTORS["inclusion"].items():
        if name.endswith("/happy-path.json"):
            ranges = inclusion_ranges(p["leafIdx"], p["treeSize"])
            assert proof_hashes(ranges, nodes.__getitem__) == [b64(h) for h in p["proof"] or []]
            happy += 1
    for name, p in VECTORS["consistency"].items():
        if name.endswith("/happy-path.json"):
            ranges = consistency_ranges(p["size1"], p["size2"])
            assert proof_hashes(ranges, nodes.__getitem__) == [b64(h) for h in p["proof"] or []]
            happy += 1
    assert happy == 10


# proof/proof_test.go TestInclusion: which stored nodes an inclusion proof is made of. Each
# element lists its nodes left to right (the Go table lists a rehashed element bottom-up).
NODE_LAYOUTS: list[tuple[int, int, list[list[NodeId]]]] = [
    (1, 0, []),
    (2, 0, [[(0, 1)]]),
    (2, 1, [[(0, 0)]]),
    (3, 1, [[(0, 0)], [(0, 2)]]),
    (7, 0, [[(0, 1)], [(1, 1)], [(1, 2), (0, 6)]]),
    (7, 2, [[(0, 3)], [(1, 0)], [(1, 2), (0, 6)]]),
    (7, 4, [[(0, 5)], [(0, 6)], [(2, 0)]]),
    (7, 6, [[(1, 2)], [(2, 0)]]),
    (4, 2, [[(0, 3)], [(1, 0)]]),
    (5, 3, [[(0, 2)], [(1, 0)], [(0, 4)]]),
    (6, 3, [[(0, 2)], [(1, 0)], [(1, 2)]]),
    (6, 4, [[(0, 5)], [(2, 0)]]),
    (15, 10, [[(0, 11)], [(1, 4)], [(1, 6), (0, 14)], [(3, 0)]]),
    (31, 24, [[(0, 25)], [(1, 13)], [(1, 14), (0, 30)], [(3, 2)], [(4, 0)]]),
    (95, 81, [[(0, 80)], [(1, 41)], [(2, 21)], [(2, 22), (1, 46), (0, 94)], [(4, 4)], [(6, 0)]]),
]


@pytest.mark.parametrize(("size", "index", "layout"), NODE_LAYOUTS)
def test_inclusion_proofs_are_made_of_the_published_nodes(
    size: int, index: int, layout: list[list[NodeId]]
) -> None:
    assert [range_nodes(*r) for r in inclusion_ranges(index, size)] == layout


def test_impossible_parameters_are_refused() -> None:
    for index, size in ((0, 0), (1, 0), (2, 1), (3, 0), (8, 7)):  # proof_test.go's errors
        with pytest.raises(ProofInvalid):
            inclusion_ranges(index, size)
    for old, new in ((0, 1), (0, 0), (5, 4)):
        with pytest.raises(ProofInvalid):
            consistency_ranges(old, new)


# -- properties -------------------------------------------------------------------------------
def random_leaves(seed: int, n: int) -> list[bytes]:
    rnd = random.Random(seed)
    return [leaf_hash(rnd.randbytes(rnd.randrange(0, 40))) for _ in range(n)]


def flip(data: bytes, rnd: random.Random) -> bytes:
    """``data`` with one byte changed."""
    i = rnd.randrange(len(data))
    return data[:i] + bytes([data[i] ^ (1 << rnd.randrange(8))]) + data[i + 1 :]


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 600), st.data())
def test_every_inclusion_proof_verifies_and_any_changed_byte_breaks_it(
    n: int, data: st.DataObject
) -> None:
    leaves = random_leaves(n, n)
    nodes = stored(leaves)  # the tree as the audit service stores it at size n
    size = data.draw(st.integers(1, n), label="size")  # any size the log has had
    index = data.draw(st.integers(0, size - 1), label="index")
    root = ref_root(leaves[:size])
    proof = proof_hashes(inclusion_ranges(index, size), nodes.__getitem__)
    assert proof == ref_path(index, leaves[:size])
    verify_inclusion(index, size, leaves[index], proof, root)
    rnd = random.Random(data.draw(st.integers(0, 2**32), label="rnd"))
    if proof:
        k = rnd.randrange(len(proof))
        broken = [*proof[:k], flip(proof[k], rnd), *proof[k + 1 :]]
        with pytest.raises(ProofInvalid):
            verify_inclusion(index, size, leaves[index], broken, root)
    with pytest.raises(ProofInvalid):
        verify_inclusion(index, size, flip(leaves[index], rnd), proof, root)
    with pytest.raises(ProofInvalid):
        verify_inclusion(index, size, leaves[index], proof, flip(root, rnd))
    if size > 1:  # the same proof does not prove another position
        other = (index + 1 + rnd.randrange(size - 1)) % size
        if leaves[other] != leaves[index]:
            with pytest.raises(ProofInvalid):
                verify_inclusion(other, size, leaves[other], proof, root)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 600), st.data())
def test_every_consistency_proof_verifies_and_any_changed_byte_breaks_it(
    n: int, data: st.DataObject
) -> None:
    leaves = random_leaves(n + 7, n)
    nodes = stored(leaves)
    new = data.draw(st.integers(1, n), label="new")
    old = data.draw(st.integers(1, new), label="old")
    old_root, new_root = ref_root(leaves[:old]), ref_root(leaves[:new])
    proof = proof_hashes(consistency_ranges(old, new), nodes.__getitem__)
    assert proof == (ref_subproof(old, leaves[:new], True) if old < new else [])
    verify_consistency(old, new, old_root, new_root, proof)
    rnd = random.Random(data.draw(st.integers(0, 2**32), label="rnd"))
    if proof:
        k = rnd.randrange(len(proof))
        broken = [*proof[:k], flip(proof[k], rnd), *proof[k + 1 :]]
        with pytest.raises(ProofInvalid):
            verify_consistency(old, new, old_root, new_root, broken)
    with pytest.raises(ProofInvalid):
        verify_consistency(old, new, flip(old_root, rnd), new_root, proof)
    with pytest.raises(ProofInvalid):
        verify_consistency(old, new, old_root, flip(new_root, rnd), proof)
    # A forked history: the old tree with one leaf changed is not a prefix of the new one.
    forked = list(leaves[:old])
    forked[rnd.randrange(old)] = flip(forked[0], rnd) if old == 1 else leaf_hash(b"forged")
    if ref_root(forked) != old_root:
        with pytest.raises(ProofInvalid):
            verify_consistency(old, new, ref_root(forked), new_root, proof)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 3000))
def test_the_compact_range_is_the_root_and_the_right_edge(n: int) -> None:
    leaves = random_leaves(n, n)
    tree = CompactRange()
    tree.extend(leaves)
    assert tree.root() == ref_root(leaves)
    nodes = stored(leaves)
    assert [nodes[node] for node in tree.nodes()] == tree.hashes
