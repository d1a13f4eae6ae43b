"""Merkle tree hashes as RFC 6962 (Certificate Transparency) defines them, over SHA-256.

A leaf hashes as SHA-256(0x00 || data) and an inner node as SHA-256(0x01 || left || right),
so no leaf can pass for a node. A tree of n > 1 leaves splits at k, the largest power of two
below n: its left subtree contains the first k leaves and its right subtree the rest. The tree
of no leaves hashes as SHA-256 of the empty string.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


class MerkleRoot:
    """Computes the root of a tree fed one leaf hash at a time, in O(log n) memory.

    It keeps the roots of the perfect subtrees found so far, one per set bit of the leaf
    count, largest first. Under the RFC 6962 split those subtrees are exactly the left
    parts of the tree, so folding them from the right gives the root without holding the
    leaves.
    """

    def __init__(self) -> None:
        self.count = 0
        # (leaf count, root) of each perfect subtree, sizes strictly decreasing.
        self._subtrees: list[tuple[int, bytes]] = []

    def add(self, leaf: bytes) -> None:
        """Add the next leaf, given as its leaf hash (see `leaf_hash`)."""
        size, node = 1, leaf
        while self._subtrees and self._subtrees[-1][0] == size:
            _, left = self._subtrees.pop()
            node = node_hash(left, node)
            size *= 2
        self._subtrees.append((size, node))
        self.count += 1

    def root(self) -> bytes:
        if not self._subtrees:
            return EMPTY_ROOT
        node = self._subtrees[-1][1]
        for _, left in reversed(self._subtrees[:-1]):
            node = node_hash(left, node)
        return node


def merkle_root(leaves: Iterable[bytes]) -> bytes:
    """Return the RFC 6962 root of the leaves, given as leaf data (not yet hashed)."""
    tree = MerkleRoot()
    for data in leaves:
        tree.add(leaf_hash(data))
    return tree.root()
