"""A fixed binary reduction tree over a step's gradient blocks: the same float32 sum for any number of workers.

Why. A sync step's gradient is the sum of ``n`` block gradients (a block = a fixed run of slots). Float addition is
not associative, so if each worker summed its own blocks and the parameter server added the partial sums, the
result would depend on how the blocks were split, and Adam amplifies those rounding differences in gradients
that are ~0. Sending every block to the server keeps one order but moves ``n`` gradients per step (14 MiB for
Conv4 at meta-batch 32), which measured as the server's whole share of a step. The way out, as in deterministic
all-reduce: fix the *tree* of additions, not the list. Leaves are the blocks ``0 .. n-1`` placed in a complete
binary tree over ``P = next_pow2(n)`` positions; a node's sum is ``left + right`` (or just ``left`` when the right
half lies beyond ``n``). A worker owning the contiguous leaves ``[first, first + count)`` computes the sums of the
few maximal nodes inside its range (at most ``2 log2 n``; one when the range is an aligned power of two, as for
2 workers and 32 blocks) and the server finishes the same tree. Every addition is then the same pair of the same
float32 tensors whoever does it, so 1 and 16 workers give bit-identical parameters.

    nodes = cover(first=16, count=16, n=32)                       # [(16, 16)]
    sums = tree_sums(nodes, n=32, leaf=lambda i: grads_of_block(i))
    total = combine(dict(zip(nodes, sums)), n=32)                  # on the server, with the other workers' nodes

A node is ``(start, size)`` in leaf units: ``size`` a power of two, ``start`` a multiple of ``size``, ``start < n``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Params = dict[str, torch.Tensor]
Node = tuple[int, int]


def span(n: int) -> int:
    """The tree's width: the smallest power of two >= n."""
    if n < 1:
        raise ValueError(f"a reduction tree needs at least one leaf, got {n}")
    return 1 << (n - 1).bit_length()


def is_node(node, n: int) -> bool:
    """Whether ``node`` is a node of the tree over ``n`` leaves (with at least one real leaf under it)."""
    try:
        start, size = (int(x) for x in node)
    except (TypeError, ValueError):
        return False
    return 0 < size <= span(n) and size & (size - 1) == 0 and start % size == 0 and 0 <= start < n


def cover(first: int, count: int, n: int) -> list[Node]:
    """The maximal tree nodes whose real leaves lie in ``[first, first + count)``, left to right."""
    if count < 1 or first < 0 or first + count > n:
        raise ValueError(f"leaves [{first}, {first + count}) are not inside [0, {n})")
    hi = first + count
    out: list[Node] = []

    def visit(start: int, size: int) -> None:
        end = min(start + size, n)  # a node's real leaves stop at n
        if start >= hi or end <= first:
            return
        if first <= start and end <= hi:
            out.append((start, size))
            return
        visit(start, size // 2)
        visit(start + size // 2, size // 2)

    visit(0, span(n))
    return out


def add(a: Params, b: Params) -> Params:
    """``a + b`` per key, out of place (the inputs may be read-only views from Ray's object store)."""
    return {k: a[k] + b[k] for k in a}


def node_sum(node: Node, n: int, leaf: Callable[[int], Params]) -> Params:
    """The sum under ``node``, computing leaves left to right through ``leaf(i)``; O(log n) partial sums held."""
    start, size = node
    if size == 1:
        return leaf(start)
    half = size // 2
    left = node_sum((start, half), n, leaf)
    if start + half >= n:
        return left
    return add(left, node_sum((start + half, half), n, leaf))


def tree_sums(nodes: list[Node], n: int, leaf: Callable[[int], Params]) -> list[Params]:
    """``node_sum`` of each node, in order (the leaves are visited once each, left to right)."""
    return [node_sum(node, n, leaf) for node in nodes]


def combine(received: dict[Node, Params], n: int) -> Params | None:
    """The root's sum from the nodes received; a subtree nobody sent (a rejected contribution) counts as empty.

    Returns None when nothing was received. Overlapping nodes are the caller's to refuse (``leaves_of`` lists a
    node's leaves).
    """

    def visit(start: int, size: int) -> Params | None:
        if (start, size) in received:
            return received[(start, size)]
        if size == 1 or start >= n:
            return None
        half = size // 2
        left, right = visit(start, half), visit(start + half, half)
        if left is None or right is None:
            return left if right is None else right
        return add(left, right)

    return visit(0, span(n))


def leaves_of(node: Node, n: int) -> range:
    start, size = node
    return range(start, min(start + size, n))
