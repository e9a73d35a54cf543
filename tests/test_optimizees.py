"""Optimizee task families: deterministic in (seed, step, slot), the protocol, the losses, the data, bad input."""

from __future__ import annotations

import gzip
import itertools
import math
import pickle
import struct

import numpy as np
import pytest
import torch
from metatrain.tasks.digit_images import load_digits_data, load_mnist, read_idx
from metatrain.tasks.errors import DataError, EpisodeError
from metatrain.tasks.optimizees import (
    OPTIMIZEE_FAMILIES,
    MLPSampler,
    OptimizeeTask,
    QuadraticSampler,
    QuadraticTask,
    _example_part,
    make_optimizee_sampler,
)
from metatrain.tasks.sources import iter_omniglot, omniglot_inputs, unit_pixels
from metatrain.tasks.store import TaskStore, write_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_quadratic_task_is_a_pure_function_of_seed_step_slot():
    a, b = QuadraticSampler(dim=10, seed=3), QuadraticSampler(dim=10, seed=3)
    t = a.task(5, 2)
    assert t.W.shape == (10, 10) and t.y.shape == (10,) and t.key == (3, 5, 2)
    assert torch.equal(t.W, b.task(5, 2).W) and torch.equal(t.y, b.task(5, 2).y)
    assert torch.equal(a.initial_point(5, 2), b.initial_point(5, 2))
    others = [a.task(5, 3), a.task(6, 2), QuadraticSampler(dim=10, seed=4).task(5, 2)]
    assert all(not torch.equal(t.W, o.W) for o in others)
    # N(0, 1) entries: over 200 tasks the mean and variance are close to 0 and 1.
    w = torch.stack([a.task(0, s).W for s in range(200)])
    assert abs(w.mean().item()) < 0.02 and abs(w.var().item() - 1) < 0.03


def test_quadratic_loss_values_and_minimum():
    t = QuadraticSampler(dim=4, seed=0).task(0, 0)
    theta = torch.arange(4.0)
    assert torch.allclose(t.loss(theta), ((t.W @ theta - t.y) ** 2).sum())
    assert torch.allclose(t.loss(torch.zeros(4)), (t.y ** 2).sum())
    assert t.loss(t.minimum()).item() < 1e-8
    batch = torch.stack([theta, torch.zeros(4)])
    assert torch.allclose(t.loss(batch), torch.stack([t.loss(theta), t.loss(torch.zeros(4))]))
    with pytest.raises(EpisodeError, match="theta has 3 coordinates; this quadratic has 4"):
        t.loss(torch.zeros(3))


@pytest.mark.parametrize("kw, message", [({"dim": 0}, "dim must be a positive integer"),
                                         ({"seed": -1}, "seed must be a non-negative integer")])
def test_bad_sampler_settings_name_the_field(kw, message):
    with pytest.raises(EpisodeError, match=message):
        QuadraticSampler(**kw)


# --------------------------------------------------------------------------------------------------------------
# The optimizee protocol on the quadratic
# --------------------------------------------------------------------------------------------------------------

def test_a_quadratic_task_follows_the_optimizee_protocol():
    sampler = QuadraticSampler(dim=5, seed=1)
    q = sampler.task(2, 7)
    assert isinstance(q, OptimizeeTask) and q.key == (1, 2, 7)
    params = q.init_params()
    assert list(params) == ["theta"] and torch.equal(params["theta"], sampler.initial_point(2, 7))
    params["theta"].add_(1.0)  # a fresh copy each call: the task's theta0 is untouched
    assert torch.equal(q.init_params()["theta"], sampler.initial_point(2, 7))
    theta = q.init_params()["theta"].requires_grad_()
    assert torch.equal(q.loss({"theta": theta}, 0), q.loss(theta))
    assert torch.equal(q.loss({"theta": theta}, 9), q.loss(theta))  # t does not matter
    assert torch.equal(q.eval_loss({"theta": theta}), q.loss(theta))
    (grad,) = torch.autograd.grad(q.loss({"theta": theta}, 3), [theta])
    assert torch.allclose(grad, 2 * q.W.T @ (q.W @ theta.detach() - q.y), atol=1e-4)
    hand = QuadraticTask(q.W, q.y, (0, 0, 0))  # built by hand, as before: no theta0
    assert torch.equal(hand.loss(theta), q.loss(theta))
    with pytest.raises(EpisodeError, match="has no theta0"):
        hand.init_params()
    with pytest.raises(EpisodeError, match=r"a quadratic's params are \{'theta'\}, got keys \['x'\]"):
        q.loss({"x": theta}, 0)


# --------------------------------------------------------------------------------------------------------------
# MLP optimizees
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    return MLPSampler(source="digits", seed=0)


def test_digits_are_the_1797_8x8_images_scaled_to_unit_range(digits):
    x, y = load_digits_data()
    assert x.shape == (1797, 64) and x.dtype == torch.float32 and y.shape == (1797,) and y.dtype == torch.int64
    assert x.min().item() == 0.0 and x.max().item() == 1.0 and torch.equal(torch.unique(y), torch.arange(10))
    assert torch.equal((x * 16).round(), x * 16)  # pixel / 16, exactly
    t = digits.task(0, 0)
    assert isinstance(t, OptimizeeTask) and torch.equal(t.x, x) and torch.equal(t.y, y)
    assert t.num_classes == 10 and t.hidden == (20,) and t.activation == "sigmoid" and t.batch_size == 128


def test_an_mlp_task_is_a_pure_function_of_seed_step_slot(digits):
    other = MLPSampler(source="digits", seed=0)
    t, u = digits.task(4, 2), other.task(4, 2)
    assert t.key == (0, 4, 2)
    a, b = t.init_params(), u.init_params()
    assert list(a) == ["w0", "b0", "w1", "b1"] and all(torch.equal(a[k], b[k]) for k in a)
    for step in (0, 13, 14, 100):  # within the first epoch, its last batch, the next epoch
        assert torch.equal(t.batch_rows(step), u.batch_rows(step))
        xa, ya = t.batch(step)
        xb, yb = u.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for o in (digits.task(4, 3), digits.task(5, 2), MLPSampler(source="digits", seed=1).task(4, 2)):
        assert not torch.equal(o.init_params()["w0"], a["w0"]) and not torch.equal(o.batch_rows(0), t.batch_rows(0))
    # init like torch.nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), per layer.
    assert a["w0"].abs().max() <= 1 / 8 and a["w1"].abs().max() <= 1 / 20**0.5 and a["w0"].std() > 0.05


def test_minibatches_walk_epochs_without_repeats(digits):
    t = digits.task(0, 0)
    assert t.batches_per_epoch == 1797 // 128 == 14
    epoch = torch.cat([t.batch_rows(i) for i in range(14)])
    assert len(epoch) == 14 * 128 and len(torch.unique(epoch)) == len(epoch)
    assert not torch.equal(t.batch_rows(14), t.batch_rows(0))  # the next epoch is a new permutation
    with pytest.raises(EpisodeError, match=r"t \(the optimisation step\) must be a non-negative integer, got -1"):
        t.loss(t.init_params(), -1)


@pytest.mark.parametrize("hidden, activation", [((20,), "sigmoid"), ((40,), "relu"), ((20, 20), "sigmoid")])
def test_mlp_loss_is_log_10_at_zero_weights_and_gradients_reach_every_param(hidden, activation):
    t = MLPSampler(hidden=hidden, activation=activation, seed=0).task(0, 1)
    widths = (64, *hidden, 10)
    assert t.shapes == {k: v for i in range(len(widths) - 1)
                        for k, v in ((f"w{i}", (widths[i + 1], widths[i])), (f"b{i}", (widths[i + 1],)))}
    zero = {k: torch.zeros(s) for k, s in t.shapes.items()}
    assert t.loss(zero, 0).item() == pytest.approx(math.log(10), abs=1e-6)
    assert t.eval_loss(zero).item() == pytest.approx(math.log(10), abs=1e-6)
    params = {k: p.requires_grad_() for k, p in t.init_params().items()}
    loss = t.loss(params, 3)
    assert loss.shape == () and t.eval_loss(params).shape == ()
    # The same number as torch.nn layers give on minibatch 3.
    net = torch.nn.Sequential(*[m for i in range(len(widths) - 1) for m in (
        [torch.nn.Linear(widths[i], widths[i + 1])] + ([torch.nn.Sigmoid() if activation == "sigmoid"
                                                        else torch.nn.ReLU()] if i < len(hidden) else []))])
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for i, m in enumerate(linears):
            m.weight.copy_(params[f"w{i}"])
            m.bias.copy_(params[f"b{i}"])
    x, y = t.batch(3)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(net(x), y), atol=1e-6)
    grads = torch.autograd.grad(loss, list(params.values()))
    assert all(g.shape == p.shape and g.abs().sum() > 0 for g, p in zip(grads, params.values()))


def test_sgd_on_a_digits_task_lowers_its_loss(digits):
    t = digits.task(0, 0)
    params = t.init_params()
    start = t.eval_loss(params).item()
    for step in range(150):
        params = {k: p.requires_grad_() for k, p in params.items()}
        grads = torch.autograd.grad(t.loss(params, step), list(params.values()))
        params = {k: (p - 2.0 * g).detach() for (k, p), g in zip(params.items(), grads)}
    assert t.eval_loss(params).item() < 0.6 < start and t.accuracy(params) > 0.8


def test_train_and_heldout_examples_split_the_source_the_same_way_for_every_seed():
    parts = {p: _example_part(1797, p, 0, "digits") for p in ("train", "heldout")}
    assert len(parts["train"]) == 1797 - 359 and len(parts["heldout"]) == 359
    assert np.array_equal(np.sort(np.concatenate(list(parts.values()))), np.arange(1797))
    x, y = load_digits_data()
    for seed in (0, 5):
        held = MLPSampler(examples="heldout", seed=seed, batch_size=64).task(0, 0)
        assert torch.equal(held.x, x[parts["heldout"]]) and torch.equal(held.y, y[parts["heldout"]])
    assert len(MLPSampler(examples="train", seed=0).task(0, 0).y) == 1438


def _idx(magic: int, array: np.ndarray) -> bytes:
    """An IDX file as LeCun's format spells it, written independently of the reader under test."""
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(">u1").tobytes()


def test_mnist_idx_files_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    labels = np.arange(20, dtype=np.uint8) % 10
    raw = tmp_path / "MNIST" / "raw"  # torchvision's layout; images gzipped, labels plain
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(2051, images)))
    (raw / "train-labels-idx1-ubyte").write_bytes(_idx(2049, labels))
    magic, back = read_idx(raw / "train-images-idx3-ubyte.gz")
    assert magic == 2051 and back.dtype == np.uint8 and np.array_equal(back, images)
    x, y = load_mnist(tmp_path)
    assert x.shape == (20, 784) and torch.equal(x, torch.from_numpy(images).reshape(20, -1).float() / 255)
    assert torch.equal(y, torch.from_numpy(labels).long())
    sampler = MLPSampler(source="mnist", path=tmp_path, batch_size=8, seed=0)
    t = sampler.task(0, 0)
    assert t.shapes["w0"] == (20, 784) and torch.equal(t.x, x) and t.batches_per_epoch == 2
    again = pickle.loads(pickle.dumps(sampler))  # leaves the data behind, reloads them from path
    assert again._data is None and torch.equal(again.task(0, 0).init_params()["w0"], t.init_params()["w0"])
    with pytest.raises(DataError, match=r"MNIST file t10k-images-idx3-ubyte not found in .*torchvision"):
        MLPSampler(source="mnist", path=tmp_path, split="test")


def test_bad_mnist_files_name_the_file(tmp_path):
    images = np.zeros((4, 28, 28), dtype=np.uint8)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx(2051, images))
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(_idx(2051, images))  # an image file under the label file's name
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte is not an MNIST label file \(magic number 2051, "
                                        r"expected 2049\)"):
        load_mnist(tmp_path)
    labels.write_bytes(b"\x12\x34\x56\x78" + bytes(8))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte is not an IDX file \(magic bytes 12345678"):
        load_mnist(tmp_path)
    labels.write_bytes(_idx(2049, np.zeros(4, dtype=np.uint8))[:-1])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte has 11 bytes; its header \(shape \[4\], uint8\) "
                                        r"needs 12"):
        load_mnist(tmp_path)
    labels.write_bytes(_idx(2049, np.zeros(3, dtype=np.uint8)))
    with pytest.raises(DataError, match=r"holds 4 images but .*train-labels-idx1-ubyte holds 3 labels"):
        load_mnist(tmp_path)
    labels.unlink()
    with pytest.raises(DataError, match="MNIST file train-labels-idx1-ubyte not found in"):
        MLPSampler(source="mnist", path=tmp_path)


@pytest.mark.parametrize("kw, message", [
    ({"source": "digit"}, r"unknown source 'digit' \(did you mean 'digits'\?\); known: digits, omniglot, mnist"),
    ({"activation": "tanh"}, r"unknown activation 'tanh'; known: sigmoid, relu"),
    ({"examples": "test"}, r"unknown examples 'test'; known: all, train, heldout"),
    ({"hidden": 20}, r"hidden must be a non-empty tuple of layer widths, e.g. \(20,\), got 20"),
    ({"hidden": ()}, r"hidden must be a non-empty tuple of layer widths"),
    ({"hidden": (20, 0)}, r"hidden\[1\] must be a positive integer, got 0"),
    ({"hidden": (2.5,)}, r"hidden\[0\] must be a positive integer, got 2.5"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"batch_size": 2000}, r"batch_size = 2000 exceeds the 1797 examples of a task on source 'digits'"),
    ({"examples": "heldout", "batch_size": 360}, "batch_size = 360 exceeds the 359 examples"),
    ({"path": "x"}, "path is not an option of source 'digits'"),
    ({"ways": 5}, "ways is an option of source 'omniglot' only, not 'digits'"),
    ({"source": "mnist"}, r"source 'mnist' needs path= \(the folder of the MNIST IDX files\)"),
    ({"source": "omniglot"}, r"source 'omniglot' needs path= \(the prepared store folder\)"),
    ({"seed": -1}, "seed must be a non-negative integer"),
])
def test_bad_mlp_settings_name_the_field(kw, message):
    with pytest.raises(EpisodeError, match=message):
        MLPSampler(**kw)


def test_bad_params_and_a_missing_store_name_what_is_wrong(digits, tmp_path):
    t = digits.task(0, 0)
    params = t.init_params()
    with pytest.raises(EpisodeError, match=r"MLP params must be \['b0', 'b1', 'w0', 'w1'\]; missing \['b1'\]"):
        t.loss({k: v for k, v in params.items() if k != "b1"}, 0)
    with pytest.raises(EpisodeError, match=r"MLP param w0 has shape \[20, 63\], expected \[20, 64\]"):
        t.eval_loss({**params, "w0": params["w0"][:, :63]})
    with pytest.raises(DataError, match=f"no prepared store at {tmp_path / 'none'}"):
        MLPSampler(source="omniglot", path=tmp_path / "none")


def test_the_registry_makes_each_family_and_names_unknown_ones():
    assert OPTIMIZEE_FAMILIES == ("quadratic", "mlp")
    q = make_optimizee_sampler("quadratic", seed=2, dim=3)
    assert isinstance(q, QuadraticSampler) and q.dim == 3 and q.seed == 2
    m = make_optimizee_sampler("mlp", seed=2, hidden=(40,), activation="relu")
    assert isinstance(m, MLPSampler) and m.task(0, 0).shapes["w0"] == (40, 64)
    with pytest.raises(EpisodeError, match=r"unknown optimizee family 'mpl' \(did you mean 'mlp'\?\); known "
                                           r"families: quadratic, mlp"):
        make_optimizee_sampler("mpl", seed=0)
    with pytest.raises(EpisodeError, match=r"optimizee family 'quadratic' has no option 'dims' \(did you mean "
                                           r"'dim'\?\); its options: dim"):
        make_optimizee_sampler("quadratic", seed=0, dims=3)


@pytest.fixture(scope="module")
def omniglot_subset(omniglot_dir, tmp_path_factory):
    """A store of the first 12 characters of each real Omniglot split (about 1 s; the whole store takes far longer)."""
    inputs = omniglot_inputs(omniglot_dir)
    out = tmp_path_factory.mktemp("stores") / "omniglot-subset"
    classes = [raw for split, path in inputs.items() for raw in itertools.islice(iter_omniglot(split, path), 12)]
    write_store(out, classes, dataset="omniglot", size=28, channels=1, invert=True, sources={}, prepare_command="test")
    return out


@pytest.mark.data
def test_omniglot_tasks_are_10_class_subsets_of_a_split(omniglot_subset):
    store = TaskStore.open(omniglot_subset)
    background, evaluation = (set(store.classes_of(s).tolist()) for s in ("background", "evaluation"))
    train = MLPSampler(source="omniglot", path=omniglot_subset, seed=0)
    t = train.task(0, 0)
    assert isinstance(t, OptimizeeTask) and t.num_classes == 10 and len(set(t.classes.tolist())) == 10
    assert t.x.shape == (200, 14 * 14) and t.shapes["w0"] == (20, 196)  # all 20 drawings, pooled 28 -> 14
    assert torch.equal(t.y, torch.arange(10).repeat_interleave(20)) and set(t.classes.tolist()) <= background
    first = unit_pixels(store.images[int(store.class_offsets[t.classes[0]])])  # label 0's first drawing, 28x28
    assert torch.allclose(t.x[0], torch.nn.functional.avg_pool2d(first, 2).flatten())
    assert t.loss(t.init_params(), 0).item() == pytest.approx(math.log(10), abs=0.3)
    again = MLPSampler(source="omniglot", path=omniglot_subset, seed=0).task(0, 0)
    assert torch.equal(again.x, t.x) and torch.equal(again.init_params()["w0"], t.init_params()["w0"])
    assert torch.equal(again.batch_rows(5), t.batch_rows(5))
    assert any(not torch.equal(train.task(0, s).classes, t.classes) for s in range(1, 6))
    held = MLPSampler(source="omniglot", path=omniglot_subset, split="evaluation", image_size=28, batch_size=32,
                      examples="heldout", seed=0).task(0, 0)
    assert held.x.shape == (40, 784) and set(held.classes.tolist()) <= evaluation  # the last 4 drawings of each
    with pytest.raises(EpisodeError, match=r"ways = 13 exceeds the 12 classes of split 'evaluation'"):
        MLPSampler(source="omniglot", path=omniglot_subset, split="evaluation", ways=13)
    with pytest.raises(EpisodeError, match=r"batch_size = 128 exceeds the 40 examples of a task on 10 classes"):
        MLPSampler(source="omniglot", path=omniglot_subset, examples="heldout")
    with pytest.raises(EpisodeError, match=r"image_size = 29 exceeds the 28x28 images"):
        MLPSampler(source="omniglot", path=omniglot_subset, image_size=29)
    with pytest.raises(EpisodeError, match=r"unknown split 'evaluaton' \(did you mean 'evaluation'\?\)"):
        MLPSampler(source="omniglot", path=omniglot_subset, split="evaluaton")
