"""Memory models (#5): every equation of NTM addressing, MANN's LRUA and Kaiser et al.'s memory module on small
hand-computable cases; the mann and memory algorithms' gradients and batching; a short MANN training run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import prototype_episode
from metatrain.models import MANN, KeyEncoder, Memory, SequenceLSTM
from metatrain.models.mann import clear_least_used, least_used, lrua_write, lrua_write_weights, update_usage
from metatrain.models.ntm import (
    NTMHead,
    content_weights,
    cosine_similarity,
    erase_add,
    interpolate,
    read,
    sharpen,
    shift,
)
from metatrain.tasks.episode import SequenceEpisode

from metatrain.pipeline.algorithms import AlgorithmConfig, evaluate_tasks, meta_gradient_tasks
from metatrain.pipeline.algorithms import mann as mann_algo
from metatrain.pipeline.algorithms.errors import TaskMismatchError
from metatrain.pipeline.algorithms.memory import key_value as memory_algo
from metatrain.pipeline.config import ConfigError, load_config

# ---- NTM addressing ------------------------------------------------------------------------------------------------


def test_content_weights_are_a_softmax_of_scaled_cosines():
    memory = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]]])  # (1, 3, 2)
    key = torch.tensor([[2.0, 0.0]])
    assert torch.allclose(cosine_similarity(memory, key), torch.tensor([[1.0, 0.0, -1.0]]), atol=1e-6)
    w = content_weights(memory, key, beta=2.0)
    expected = torch.softmax(torch.tensor([[2.0, 0.0, -2.0]]), -1)
    assert torch.allclose(w, expected, atol=1e-6) and torch.allclose(w.sum(-1), torch.ones(1))
    # A strong key focuses on the most similar location.
    assert content_weights(memory, key, beta=100.0).argmax() == 0
    # A zeroed location (LRUA clears one) has similarity ~0, not NaN.
    assert torch.isfinite(cosine_similarity(torch.zeros(1, 2, 2), key)).all()


def test_interpolation_gate():
    wc, wp = torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([[0.0, 0.0, 1.0]])
    assert torch.equal(interpolate(wc, wp, 1.0), wc) and torch.equal(interpolate(wc, wp, 0.0), wp)
    assert torch.allclose(interpolate(wc, wp, 0.25), 0.25 * wc + 0.75 * wp)


def test_shift_rotates_circularly():
    w = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    assert torch.allclose(shift(w, torch.tensor([[0.0, 1.0, 0.0]])), w)
    assert torch.allclose(shift(w, torch.tensor([[0.0, 0.0, 1.0]])), torch.tensor([[0.4, 0.1, 0.2, 0.3]]))
    assert torch.allclose(shift(w, torch.tensor([[1.0, 0.0, 0.0]])), torch.tensor([[0.2, 0.3, 0.4, 0.1]]))
    half = shift(w, torch.tensor([[0.5, 0.0, 0.5]]))
    assert torch.allclose(half, 0.5 * torch.tensor([[0.4, 0.1, 0.2, 0.3]]) + 0.5 * torch.tensor([[0.2, 0.3, 0.4, 0.1]]))
    assert torch.allclose(half.sum(-1), torch.ones(1))
    with pytest.raises(ValueError, match="odd"):
        shift(w, torch.tensor([[0.5, 0.5]]))


def test_sharpening_with_gamma_one_is_the_identity_and_larger_gamma_focuses():
    w = torch.tensor([[0.5, 0.3, 0.2]])
    assert torch.allclose(sharpen(w, 1.0), w, atol=1e-6)
    sharp = sharpen(w, 3.0)
    expected = w ** 3 / (w ** 3).sum()
    assert torch.allclose(sharp, expected, atol=1e-5) and sharp[0, 0] > w[0, 0]


def test_erase_add_write_and_read():
    memory = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    w = torch.tensor([[1.0, 0.0]])
    out = erase_add(memory, w, erase=torch.tensor([[1.0, 0.0]]), add=torch.tensor([[5.0, 6.0]]))
    # Location 0: erase its first element, then add (5, 6); location 1 (weight 0) untouched.
    assert torch.equal(out, torch.tensor([[[5.0, 8.0], [3.0, 4.0]]]))
    assert torch.equal(read(memory, torch.tensor([[0.25, 0.75]])), torch.tensor([[2.5, 3.5]]))


def test_ntm_head_weights_sum_to_one():
    torch.manual_seed(0)
    head = NTMHead(controller_size=8, width=4, shifts=3, write=True)
    w, erase, add = head(torch.randn(2, 8), torch.randn(2, 6, 4), torch.full((2, 6), 1 / 6))
    assert w.shape == (2, 6) and torch.allclose(w.sum(-1), torch.ones(2), atol=1e-5) and (w >= 0).all()
    assert ((erase >= 0) & (erase <= 1)).all() and add.shape == (2, 4)


# ---- MANN: LRUA ------------------------------------------------------------------------------------------------------


def test_least_used_marks_the_n_smallest_usages():
    usage = torch.tensor([[0.5, 0.1, 0.9, 0.1, 0.3]])
    assert torch.equal(least_used(usage, 1), torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0]]))  # tie: lower index
    assert torch.equal(least_used(usage, 3), torch.tensor([[0.0, 1.0, 0.0, 1.0, 1.0]]))


def test_the_least_used_location_is_cleared_before_writing():
    memory = torch.arange(1.0, 7.0).view(1, 3, 2)
    cleared = clear_least_used(memory, torch.tensor([[0.4, 0.2, 0.7]]))
    assert torch.equal(cleared, torch.tensor([[[1.0, 2.0], [0.0, 0.0], [5.0, 6.0]]]))


def test_usage_decays_by_gamma_and_adds_read_and_write_weights():
    prev = torch.tensor([[1.0, 0.5, 0.0]])
    none = torch.zeros(1, 2, 3)
    assert torch.allclose(update_usage(prev, none, none, 0.95), 0.95 * prev)
    w_r = torch.tensor([[[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]])
    w_w = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    assert torch.allclose(update_usage(prev, w_r, w_w, 0.95), 0.95 * prev + torch.tensor([[1.2, 1.3, 1.5]]))


def test_lrua_write_weights_interpolate_between_last_read_and_least_used():
    w_r = torch.tensor([[[0.6, 0.4, 0.0]]])  # (B=1, R=1, N=3)
    w_lu = torch.tensor([[0.0, 0.0, 1.0]])
    assert torch.allclose(lrua_write_weights(torch.tensor([[30.0]]), w_r, w_lu), w_r, atol=1e-6)
    assert torch.allclose(lrua_write_weights(torch.tensor([[-30.0]]), w_r, w_lu), w_lu[:, None], atol=1e-6)
    s = torch.sigmoid(torch.tensor(0.3))
    assert torch.allclose(lrua_write_weights(torch.tensor([[0.3]]), w_r, w_lu), s * w_r + (1 - s) * w_lu[:, None])
    keys = torch.tensor([[[2.0, -1.0]]])
    written = lrua_write(torch.zeros(1, 3, 2), torch.tensor([[[0.0, 0.0, 1.0]]]), keys)
    assert torch.equal(written, torch.tensor([[[0.0, 0.0], [0.0, 0.0], [2.0, -1.0]]]))


def test_mann_is_causal_and_shapes_match():
    torch.manual_seed(0)
    net = MANN(classes=3, input_size=6, controller=16, memory_slots=8, memory_width=5, read_heads=2)
    x = torch.randn(2, 9, 9)
    out = net(x)
    assert out.shape == (2, 9, 3)
    later = x.clone()
    later[:, 5:] = torch.randn(2, 4, 9)
    # Outputs up to step 4 see nothing of steps 5+.
    assert torch.allclose(net(later)[:, :5], out[:, :5]) and not torch.allclose(net(later)[:, 5:], out[:, 5:])
    assert SequenceLSTM(classes=3, input_size=6, hidden=16)(x).shape == (2, 9, 3)


def mann_by_the_equations(net: MANN, inputs: torch.Tensor) -> torch.Tensor:
    """MANN's forward written out from the equation functions, one nn.LSTMCell and one layer call per term."""
    b, steps, _ = inputs.shape
    n, w, r = net.slots, net.width, net.heads
    h = inputs.new_zeros(b, net.controller.hidden_size)
    c = torch.zeros_like(h)
    memory, usage = inputs.new_full((b, n, w), 1e-6), inputs.new_zeros(b, n)
    w_read, reads = inputs.new_zeros(b, r, n), inputs.new_zeros(b, r * w)
    w_lu, outputs = least_used(usage, r), []
    for t in range(steps):
        h, c = net.controller(torch.cat([inputs[:, t], reads], dim=-1), (h, c))
        keys = torch.tanh(net.key(h)).view(b, r, w)
        w_write = lrua_write_weights(net.gate(h), w_read, w_lu)
        written = lrua_write(clear_least_used(memory, usage), w_write, keys)
        source = memory if net.read_before_write else written
        beta = F.softplus(net.strength(h)) if net.strength is not None else torch.ones(b, r)
        # One head at a time, each with the single-key content addressing.
        w_read = torch.stack([content_weights(source, keys[:, j], beta[:, j:j + 1]) for j in range(r)], dim=1)
        reads = torch.stack([read(source, w_read[:, j]) for j in range(r)], dim=1).reshape(b, r * w)
        memory = written
        usage = update_usage(usage, w_read, w_write, net.gamma)
        w_lu = least_used(usage, r)
        outputs.append(net.out(torch.cat([h, reads], dim=-1)))
    return torch.stack(outputs, dim=1)


@pytest.mark.parametrize("options", [{}, {"key_strength": False}, {"read_before_write": False}])
def test_mann_forward_is_the_equations_step_by_step(options):
    # The forward fuses products across steps and heads for speed; values and gradients must be the equations'.
    torch.manual_seed(0)
    net = MANN(classes=3, input_size=6, controller=16, memory_slots=8, memory_width=5, read_heads=2, **options)
    x = torch.randn(3, 12, 9)
    fast, slow = net(x), mann_by_the_equations(net, x)
    assert torch.allclose(fast, slow, atol=1e-6)
    grads = [torch.autograd.grad(out.square().sum(), list(net.parameters())) for out in (fast, slow)]
    assert all(torch.allclose(g1, g2, atol=1e-5) for g1, g2 in zip(*grads))


# ---- Kaiser et al. memory module ---------------------------------------------------------------------------------


def unit(*v):
    return F.normalize(torch.tensor(v, dtype=torch.float32), dim=0)


def test_a_miss_writes_to_the_oldest_slot_and_ages_the_rest():
    mem = Memory(keys=torch.stack([unit(1, 0), unit(0, 1), torch.zeros(2)]), values=torch.tensor([0, 1, -1]),
                 ages=torch.tensor([5, 9, 2]))
    q = unit(1, 1)
    new = mem.update(q, 7)  # nearest slot holds 0 or 1, not 7: a miss; the oldest is slot 1 (age 9)
    assert new.values.tolist() == [0, 7, -1] and new.ages.tolist() == [6, 0, 3]
    assert torch.allclose(new.keys[1], q) and torch.equal(new.keys[0], mem.keys[0])
    assert mem.values.tolist() == [0, 1, -1]  # the old memory is unchanged


def test_a_hit_averages_and_normalises_the_key():
    mem = Memory(keys=torch.stack([unit(1, 0), unit(0, 1)]), values=torch.tensor([3, 4]), ages=torch.tensor([4, 1]))
    q = unit(2, 1)
    new = mem.update(q, 3)  # nearest is slot 0 with value 3: a hit
    assert torch.allclose(new.keys[0], F.normalize(q + unit(1, 0), dim=0))
    assert new.values.tolist() == [3, 4] and new.ages.tolist() == [0, 2]


def test_oldest_ties_are_broken_at_random_but_reproducibly():
    picks = set()
    for seed in range(20):
        mem = Memory.empty(4, 2).update(unit(1, 0), 1, torch.Generator().manual_seed(seed))
        picks.add(int((mem.values == 1).nonzero()))
    assert len(picks) > 1  # all four empty slots are equally old
    a = Memory.empty(4, 2).update(unit(1, 0), 1, torch.Generator().manual_seed(3))
    b = Memory.empty(4, 2).update(unit(1, 0), 1, torch.Generator().manual_seed(3))
    assert torch.equal(a.values, b.values)


def test_memory_loss_and_prediction_by_hand():
    keys = torch.stack([unit(1, 0), unit(0, 1), unit(-1, 0)])
    mem = Memory(keys, torch.tensor([0, 1, 2]), torch.zeros(3, dtype=torch.long))
    q = unit(3, 4).unsqueeze(0)  # q.K = (0.6, 0.8, -0.6)
    assert mem.predict(q).tolist() == [1]
    # v = 0: p = slot 0 (0.6), b = slot 1 (0.8): max(0, 0.8 - 0.6 + 0.1) = 0.3
    assert torch.allclose(mem.loss(q, torch.tensor([0]), k=3, margin=0.1), torch.tensor([0.3]), atol=1e-6)
    # v = 1: p = slot 1 (0.8), b = slot 0 (0.6): max(0, 0.6 - 0.8 + 0.1) = 0
    assert mem.loss(q, torch.tensor([1]), k=3, margin=0.1).item() == pytest.approx(0.0, abs=1e-7)
    # k = 1: only slot 1 is searched; for v = 2 no positive among the k -> the slot anywhere with value 2 (-0.6);
    # b = slot 1: 0.8 + 0.6 + 0.1 = 1.5
    assert torch.allclose(mem.loss(q, torch.tensor([2]), k=1, margin=0.1), torch.tensor([1.5]), atol=1e-6)
    # A value no slot holds: no positive, no loss (and no NaN in the gradient).
    qg = q.clone().requires_grad_(True)
    loss = mem.loss(qg, torch.tensor([9]), k=3)
    loss.sum().backward()
    assert loss.item() == 0 and torch.isfinite(qg.grad).all()


# ---- the algorithms ------------------------------------------------------------------------------------------------


def sequence_episode(slot: int, classes=3, instances=4, size=6, gen_seed=0) -> SequenceEpisode:
    """A synthetic Santoro episode: each class a random +-1 prototype (nearly orthogonal to the others), each showing a
    noisy copy."""
    g = torch.Generator().manual_seed(gen_seed * 1000 + slot)
    protos = torch.randn(classes, 1, size, size, generator=g).sign()
    order = torch.randperm(classes * instances, generator=g)
    y = torch.arange(classes).repeat_interleave(instances)[order]
    x = protos[y] + 0.1 * torch.randn(len(y), 1, size, size, generator=g)
    prev = torch.zeros(len(y), classes)
    prev[1:] = F.one_hot(y[:-1], classes).float()
    onehot = F.one_hot(y, classes)
    instance = (onehot.cumsum(0) * onehot).sum(1)
    return SequenceEpisode(x, y, prev, instance, torch.arange(classes), torch.zeros(classes, dtype=torch.long),
                           (0, 0, slot))


def test_mann_meta_gradient_is_the_sequence_cross_entropy_gradient_and_batches_exactly():
    torch.manual_seed(0)
    net = MANN(classes=3, input_size=36, controller=16, memory_slots=8, memory_width=5, read_heads=2)
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    cfg = AlgorithmConfig(name="mann")
    eps = [sequence_episode(s) for s in range(3)]
    grads, metrics = mann_algo.meta_gradient(params, eps[0], cfg, net)
    net.zero_grad()
    logits = net(net.sequence_inputs(eps[0].x[None], eps[0].prev_label[None]))[0]
    F.cross_entropy(logits, eps[0].y).backward()
    for k, p in net.named_parameters():
        assert torch.allclose(grads[k], p.grad, atol=1e-6), k
    assert set(metrics) >= {"query_loss", "query_acc", "inst1_acc", "inst4_acc"}
    loop, n1, m_loop = meta_gradient_tasks(params, eps, cfg, net, batched=False)
    batch, n2, m_batch = meta_gradient_tasks(params, eps, cfg, net, batched=True)
    assert n1 == n2 == 3
    for k in loop:
        assert torch.allclose(loop[k], batch[k], atol=1e-5), k
    assert m_loop["inst2_acc"] == pytest.approx(m_batch["inst2_acc"])
    bad = SequenceEpisode(eps[0].x, eps[0].y + 5, eps[0].prev_label, eps[0].instance, eps[0].classes,
                          eps[0].rotations, (0, 0, 0))
    with pytest.raises(TaskMismatchError, match="do not fit the model's 3 outputs"):
        mann_algo.meta_gradient(params, bad, cfg, net)


def test_memory_meta_gradient_is_deterministic_and_batches_exactly():
    torch.manual_seed(0)
    enc = KeyEncoder(key_size=16, hidden=8)
    params = {k: v.detach().clone() for k, v in enc.named_parameters()}
    cfg = AlgorithmConfig(name="memory", memory_size=4)
    eps = [prototype_episode(s) for s in range(3)]
    g1, m1 = memory_algo.meta_gradient(params, eps[0], cfg, enc)
    g2, _ = memory_algo.meta_gradient(params, eps[0], cfg, enc)
    assert all(torch.equal(g1[k], g2[k]) for k in g1) and 0 <= m1["query_acc"] <= 1
    assert any(g.abs().sum() > 0 for g in g1.values())
    loop, _, _ = meta_gradient_tasks(params, eps, cfg, enc, batched=False)
    batch, _, _ = meta_gradient_tasks(params, eps, cfg, enc, batched=True)
    assert all(torch.allclose(loop[k], batch[k], atol=1e-6) for k in loop)
    with pytest.raises(Exception, match="memory_size: 2 slots cannot hold the episode's 3 support"):
        memory_algo.meta_gradient(params, eps[0], AlgorithmConfig(name="memory", memory_size=2), enc)


def test_memory_settings_and_model_pairs_are_checked():
    with pytest.raises(Exception, match="memory_size: must be an integer >= 1"):
        AlgorithmConfig(name="memory", memory_size=0)
    with pytest.raises(Exception, match="memory_margin"):
        AlgorithmConfig(name="memory", memory_margin=-1)
    with pytest.raises(ConfigError, match="model.name must be one of mann, lstm for algorithm.name=mann"):
        load_config("configs/omniglot_mann_5class.yaml", ["model.name=conv4"])
    with pytest.raises(ConfigError, match="model.name must be .conv4. for algorithm.name=maml"):
        load_config("configs/omniglot_maml_5w1s.yaml", ["model.name=mann"])
    with pytest.raises(ConfigError, match="model.read_heads"):
        load_config("configs/omniglot_mann_5class.yaml", ["model.read_heads=200"])


def test_mann_learns_to_use_its_memory():
    """A short run on synthetic sequences: accuracy at the 2nd showing of a class rises well above the 1st.

    Only what the network stored can tell the label of a class shown once before. (The 1st showing can beat chance
    too, by guessing a label not yet used in the episode, as in the paper's 36.4% for 5 classes; it cannot be sure.)
    Early in training the network learns exactly that heuristic (1st ~0.6 > 2nd ~0.48); the 2nd showing overtakes
    the 1st once it binds labels to classes in memory (~1,500 steps here, 0.88 vs 0.48 at 2,000).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float reductions, so the same trajectory, on every machine
    try:
        torch.manual_seed(0)
        net = MANN(classes=3, input_size=36, controller=64, memory_slots=16, memory_width=16, read_heads=1)
        params = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
        opt = torch.optim.Adam(params.values(), lr=3e-3)
        cfg = AlgorithmConfig(name="mann")
        for step in range(1, 2001):
            eps = [sequence_episode(s, gen_seed=step) for s in range(16)]
            grads, _, _ = meta_gradient_tasks(params, eps, cfg, net, batched=True)
            for k, p in params.items():
                p.grad = grads[k] / len(eps)
            torch.nn.utils.clip_grad_norm_(list(params.values()), 10.0)
            opt.step()
        test = [sequence_episode(s, gen_seed=10_000) for s in range(200)]
        m = evaluate_tasks(params, test, cfg, net, batched=True)
    finally:
        torch.set_num_threads(threads)
    assert m["inst2_acc"] > m["inst1_acc"] + 0.15 and m["inst2_acc"] > 0.7, m
    assert m["inst4_acc"] > m["inst1_acc"] + 0.15, m
