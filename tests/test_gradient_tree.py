"""The fixed reduction tree: covers, node sums, and bit-identical totals for every split of the blocks."""

from __future__ import annotations

import pytest
import torch

from metatrain.pipeline.config import OptimConfig
from metatrain.pipeline.distributed.gradient_tree import combine, cover, is_node, leaves_of, node_sum, span, tree_sums
from metatrain.pipeline.distributed.parameter_server import ParameterServerCore


def leaves(n, seed=0):
    """Block gradients whose magnitudes differ by orders, so a different addition order changes the float32 sum."""
    gen = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(5, generator=gen) * 10.0 ** (i % 7 - 3)} for i in range(n)]


def splits(n):
    """Every way of cutting [0, n) into 1, 2, 3 contiguous parts (and the near-equal cut for 4..n)."""
    yield [(0, n)]
    for a in range(1, n):
        yield [(0, a), (a, n)]
        for b in range(a + 1, n):
            yield [(0, a), (a, b), (b, n)]
    for k in range(4, n + 1):
        edges = [round(i * n / k) for i in range(k + 1)]
        yield list(zip(edges[:-1], edges[1:]))


def test_span_and_nodes():
    assert [span(n) for n in (1, 2, 3, 4, 5, 32, 33)] == [1, 2, 4, 4, 8, 32, 64]
    assert is_node((16, 16), 32) and is_node((4, 4), 5) and is_node((0, 8), 5)
    assert not is_node((8, 8), 5)  # no real leaf under it
    assert not is_node((2, 4), 8) and not is_node((0, 3), 8) and not is_node((0, 64), 32) and not is_node("x", 4)
    with pytest.raises(ValueError, match="at least one leaf"):
        span(0)


@pytest.mark.parametrize("first, count, n, expected", [
    (0, 32, 32, [(0, 32)]),
    (16, 16, 32, [(16, 16)]),
    (0, 11, 32, [(0, 8), (8, 2), (10, 1)]),
    (11, 11, 32, [(11, 1), (12, 4), (16, 4), (20, 2)]),
    (0, 5, 5, [(0, 8)]),  # the root's real leaves are 0..4
    (4, 1, 5, [(4, 4)]),
])
def test_cover_is_the_maximal_nodes_left_to_right(first, count, n, expected):
    nodes = cover(first, count, n)
    assert nodes == expected
    assert [i for node in nodes for i in leaves_of(node, n)] == list(range(first, first + count))


def test_cover_refuses_ranges_outside_the_tree():
    with pytest.raises(ValueError, match=r"leaves \[30, 34\) are not inside \[0, 32\)"):
        cover(30, 4, 32)


def test_node_sum_visits_each_leaf_once_in_order_and_skips_the_empty_half():
    seen = []
    grads = leaves(5)

    def leaf(i):
        seen.append(i)
        return grads[i]

    total = node_sum((0, 8), 5, leaf)
    assert seen == [0, 1, 2, 3, 4]
    # ((g0 + g1) + (g2 + g3)) + g4: the right half [4, 8) holds only leaf 4, so nothing is added to it.
    expected = ((grads[0]["w"] + grads[1]["w"]) + (grads[2]["w"] + grads[3]["w"])) + grads[4]["w"]
    assert torch.equal(total["w"], expected)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 11])
def test_every_split_gives_the_bit_identical_total(n):
    grads = leaves(n, seed=n)
    reference = combine({(0, span(n)): node_sum((0, span(n)), n, grads.__getitem__)}, n)["w"]
    plain_order = grads[0]["w"].clone()
    for g in grads[1:]:
        plain_order += g["w"]
    assert torch.allclose(reference, plain_order, rtol=1e-5, atol=1e-6)  # the same sum, up to rounding
    for parts in splits(n):
        received = {}
        for lo, hi in reversed(parts):  # arrival order does not matter either
            nodes = cover(lo, hi - lo, n)
            received.update(zip(nodes, tree_sums(nodes, n, grads.__getitem__)))
        assert torch.equal(combine(received, n)["w"], reference), parts


def test_a_missing_subtree_counts_as_empty():
    grads = leaves(8)
    got = combine({(0, 4): node_sum((0, 4), 8, grads.__getitem__), (6, 2): node_sum((6, 2), 8, grads.__getitem__)}, 8)
    expected = node_sum((0, 4), 8, grads.__getitem__)["w"] + (grads[6]["w"] + grads[7]["w"])
    assert torch.equal(got["w"], expected)
    assert combine({}, 8) is None


# ---- through the parameter server ---------------------------------------------------------------------------------

def tree_contribution(grads, lo, hi, n, worker):
    nodes = cover(lo, hi - lo, n)
    sums = tree_sums(nodes, n, grads.__getitem__)
    meta = {"worker": worker, "step": 1, "version": 0, "n_tasks": hi - lo, "blocks": [[i] for i in range(lo, hi)],
            "tree": {"leaves": n, "nodes": [list(x) for x in nodes]}}
    return meta, {"w": torch.stack([s["w"] for s in sums])}


def server():
    return ParameterServerCore({"w": torch.zeros(5)}, OptimConfig(name="adam", lr=0.1), total_steps=10,
                               checkpoint_dir=None, checkpoint_every=10)


def test_the_server_finishes_the_tree_identically_for_any_worker_count():
    n = 11
    grads = leaves(n, seed=3)
    results = []
    for parts in ([(0, 11)], [(0, 6), (6, 11)], [(0, 4), (4, 8), (8, 11)], [(i, i + 1) for i in range(11)]):
        ps = server()
        contributions = [tree_contribution(grads, lo, hi, n, w) for w, (lo, hi) in enumerate(parts)]
        out = ps.apply_gradients(1, [m for m, _ in contributions[::-1]], [g for _, g in contributions[::-1]])
        assert out["applied"] and out["tasks"] == 11 and not out["rejected"]
        results.append(ps.get_weights()[1]["w"])
    assert all(torch.equal(r, results[0]) for r in results[1:])


def test_the_server_refuses_a_block_sent_twice_and_bad_trees():
    grads = leaves(4)
    ps = server()
    a, b = tree_contribution(grads, 0, 2, 4, 0), tree_contribution(grads, 2, 4, 4, 1)
    again = tree_contribution(grads, 1, 2, 4, 2)
    out = ps.apply_gradients(1, [a[0], b[0], again[0]], [a[1], b[1], again[1]])
    assert out["applied"] and out["tasks"] == 4
    assert out["rejected"] == ["worker 2, step 1: block 1 was already sent by worker 0"]

    ps = server()
    meta, g = tree_contribution(grads, 0, 4, 4, 0)
    meta["tree"]["nodes"] = [[1, 2]]  # not a node: starts off its alignment
    out = ps.apply_gradients(1, [meta], [g])
    assert not out["applied"] and "meta['tree'] must give 'leaves'" in out["rejected"][0]
    meta, g = tree_contribution(grads, 0, 2, 4, 0)
    meta["blocks"] = [[0], [1], [2]]
    meta["n_tasks"] = 3
    out = ps.apply_gradients(1, [meta], [g])
    assert not out["applied"] and "nodes cover leaves [0, 1]" in out["rejected"][0]
    meta, g = tree_contribution(grads, 0, 2, 4, 0)
    out = ps.apply_gradients(1, [meta], [{"w": torch.cat([g["w"], g["w"]])}])
    assert not out["applied"] and "packed gradients need 1 tree nodes" in out["rejected"][0]


def test_tree_and_leaf_contributions_are_not_mixed_in_one_step():
    grads = leaves(4)
    ps = server()
    tree = tree_contribution(grads, 0, 2, 4, 0)
    leaf = ({"worker": 1, "step": 1, "version": 0, "n_tasks": 2, "blocks": [[2], [3]]}, [grads[2], grads[3]])
    out = ps.apply_gradients(1, [tree[0], leaf[0]], [tree[1], leaf[1]])
    assert not out["applied"] and "must all be tree-form or all leaf-form" in out["reason"]
    assert ps.version == 0 and ps.counters["rejected"] == 1
