"""The RFC 6962 Merkle tree hash: reference vectors and properties."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.merkle import EMPTY_ROOT, MerkleRoot, leaf_hash, merkle_root, node_hash

# Leaf inputs and the root of each tree of the first n of them, n = 0..8, from the test
# data of the transparency-dev/merkle Go module (testonly/constants.go), which implements
# RFC 6962 for Certificate Transparency logs.
VECTOR_LEAVES = [
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
]
VECTOR_ROOTS = [
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


def reference_root(leaves: list[bytes]) -> bytes:
    """The tree hash exactly as RFC 6962 section 2.1 defines it, recursively."""
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    left, right = reference_root(leaves[:k]), reference_root(leaves[k:])
    return hashlib.sha256(b"\x01" + left + right).digest()


@pytest.mark.parametrize("size", range(len(VECTOR_ROOTS)))
def test_root_matches_reference_vector(size: int) -> None:
    leaves = [bytes.fromhex(leaf) for leaf in VECTOR_LEAVES[:size]]

    assert merkle_root(leaves).hex() == VECTOR_ROOTS[size]


def test_empty_tree_is_hash_of_nothing() -> None:
    assert MerkleRoot().root() == EMPTY_ROOT
    assert MerkleRoot().count == 0


def test_leaf_and_node_hashes_differ() -> None:
    # The 0x00 and 0x01 prefixes keep a leaf from passing for the node above two leaves.
    left, right = leaf_hash(b"a"), leaf_hash(b"b")

    assert leaf_hash(left + right) != node_hash(left, right)


leaf_lists = st.lists(st.binary(max_size=40), max_size=140)


@given(leaves=leaf_lists)
def test_streamed_root_matches_recursive_definition(leaves: list[bytes]) -> None:
    tree = MerkleRoot()
    for leaf in leaves:
        tree.add(leaf_hash(leaf))

    assert tree.root() == reference_root(leaves)
    assert tree.count == len(leaves)


@given(leaves=leaf_lists.filter(bool), data=st.data())
def test_changing_any_leaf_changes_root(leaves: list[bytes], data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(leaves) - 1), label="index")
    replacement = data.draw(
        st.binary(max_size=40).filter(lambda value: value != leaves[index]), label="new leaf"
    )
    changed = [*leaves[:index], replacement, *leaves[index + 1 :]]

    assert merkle_root(changed) != merkle_root(leaves)


@given(leaves=leaf_lists.filter(bool), data=st.data())
def test_dropping_or_adding_a_leaf_changes_root(leaves: list[bytes], data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(leaves) - 1), label="index")
    extra = data.draw(st.binary(max_size=40), label="extra leaf")

    assert merkle_root([*leaves[:index], *leaves[index + 1 :]]) != merkle_root(leaves)
    assert merkle_root([*leaves[:index], extra, *leaves[index:]]) != merkle_root(leaves)


@given(leaves=st.lists(st.binary(max_size=40), min_size=2, max_size=60, unique=True))
def test_swapping_two_leaves_changes_root(leaves: list[bytes]) -> None:
    swapped = [leaves[1], leaves[0], *leaves[2:]]

    assert merkle_root(swapped) != merkle_root(leaves)
