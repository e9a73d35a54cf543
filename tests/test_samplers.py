"""Episode samplers on the real Omniglot store: layout, determinism across processes, rotations, splits, bad input."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, write_tiny_omniglot
from metatrain.tasks import sources
from metatrain.tasks.errors import EpisodeError
from metatrain.tasks.prepare import prepare_omniglot
from metatrain.tasks.samplers import EpisodeSampler, PairSampler, SequenceEpisodeSampler, SinusoidSampler
from metatrain.tasks.sources import unit_pixels
from metatrain.tasks.splits import resolve_split
from metatrain.tasks.store import TaskStore

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def store(omniglot_store):
    return TaskStore.open(omniglot_store)


def _digest(ep) -> str:
    h = hashlib.sha256()
    for t in (ep.support_x, ep.support_y, ep.query_x, ep.query_y, ep.classes, ep.rotations):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def test_episode_layout_and_content(store):
    s = EpisodeSampler(store, ways=5, shots=2, queries=3, split="evaluation")
    ep = s.episode(step=7, slot=1)
    assert ep.support_x.shape == (10, 1, 28, 28) and ep.query_x.shape == (15, 1, 28, 28)
    assert ep.support_x.dtype == torch.float32 and 0.0 <= ep.support_x.min() and ep.support_x.max() <= 1.0
    assert ep.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert ep.query_y.tolist() == sum(([i] * 3 for i in range(5)), [])
    assert (ep.rotations == 0).all()  # evaluation split: no rotations by default
    assert len(set(ep.classes.tolist())) == 5
    assert all(store.class_split[c] == "evaluation" for c in ep.classes.tolist())
    # Every image of label l is a distinct drawing of class classes[l].
    for label, c in enumerate(ep.classes.tolist()):
        own = store.images[store.class_offsets[c]:store.class_offsets[c + 1]].float() / 255
        imgs = torch.cat([ep.support_x[ep.support_y == label], ep.query_x[ep.query_y == label]])
        matches = [int(((own - img).abs().flatten(1).amax(1) == 0).nonzero()[0]) for img in imgs]
        assert len(set(matches)) == 5
    assert ep.key == (0, 7, 1)


def test_pixels_are_value_over_255_correctly_rounded():
    """Every uint8 value maps to the float32 nearest v / 255 (what the CPU's division gives; tests/test_gpu.py checks
    that a GPU gets the same floats), in any shape; anything but uint8 is refused."""
    x = torch.arange(256, dtype=torch.uint8).reshape(4, 1, 8, 8)
    got = unit_pixels(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert got.flatten().tolist() == [float(np.float32(v / 255)) for v in range(256)]
    assert torch.equal(got, x.float() / 255)
    assert torch.equal(sources._UNIT, got.flatten())  # the table a GPU gathers from holds the same floats
    with pytest.raises(TypeError, match="uint8"):
        unit_pixels(x.float())


def test_same_key_same_episode_other_keys_differ(store):
    a = EpisodeSampler(store, ways=5, shots=1, queries=15, split="background", seed=3)
    b = EpisodeSampler(store, ways=5, shots=1, queries=15, split="background", seed=3)
    assert _digest(a.episode(4, 2)) == _digest(b.episode(4, 2))
    digests = {_digest(a.episode(step, slot)) for step in range(3) for slot in range(3)}
    assert len(digests) == 9
    other_seed = EpisodeSampler(store, ways=5, shots=1, queries=15, split="background", seed=4)
    assert _digest(other_seed.episode(4, 2)) != _digest(a.episode(4, 2))


def test_episode_is_identical_in_another_process(store, omniglot_store):
    """The engine's fault recovery relies on this: another process rebuilds the same episode bit for bit, augmented
    (the distortions drawn from the episode key) or not."""
    from metatrain.tasks.augment import Affine

    code = (
        "import hashlib, sys\n"
        "from tasks.store import TaskStore\nfrom tasks.samplers import EpisodeSampler\n"
        "from tasks.augment import Affine\n"
        "for augment in (None, Affine(p=0.5)):\n"
        f"    s = EpisodeSampler(TaskStore.open({str(omniglot_store)!r}), ways=20, shots=5, queries=5, "
        "split='background', seed=11, augment=augment)\n"
        "    ep = s.episode(123, 9)\n    h = hashlib.sha256()\n"
        "    for t in (ep.support_x, ep.support_y, ep.query_x, ep.query_y, ep.classes, ep.rotations):\n"
        "        h.update(t.contiguous().numpy().tobytes())\n    print(h.hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    local = [_digest(EpisodeSampler(store, ways=20, shots=5, queries=5, split="background", seed=11,
                                    augment=augment).episode(123, 9)) for augment in (None, Affine(p=0.5))]
    assert out.stdout.split() == local and local[0] != local[1]


def test_label_order_is_a_fresh_permutation_per_episode(store):
    s = EpisodeSampler(store, ways=5, shots=1, queries=1, split="evaluation", seed=0)
    position_of_smallest = []
    for slot in range(200):
        classes = s.episode(0, slot).classes
        position_of_smallest.append(int(classes.argmin()))
    counts = np.bincount(position_of_smallest, minlength=5)
    assert (counts > 20).all(), counts  # uniform over the 5 labels, ~40 each


def test_rotations_make_four_classes_on_training_splits_only(store):
    train = EpisodeSampler(store, ways=5, shots=1, queries=1, split="background")
    test = EpisodeSampler(store, ways=5, shots=1, queries=1, split="evaluation")
    assert train.num_classes == 4 * 964 and test.num_classes == 659
    assert EpisodeSampler(store, ways=5, shots=1, queries=1, split="maml/train").num_classes == 4 * 1200
    assert EpisodeSampler(store, ways=5, shots=1, queries=1, split="background", rotations=False).num_classes == 964
    assert EpisodeSampler(store, ways=5, shots=1, queries=1, split="evaluation", rotations=True).num_classes == 4 * 659
    turns = torch.cat([train.episode(0, s).rotations for s in range(100)])
    assert set(turns.tolist()) == {0, 1, 2, 3}
    # A rotated class's images are the stored drawings turned by 90 degrees * k.
    ep = next(e for e in (train.episode(1, s) for s in range(50)) if (e.rotations == 1).any())
    label = int((ep.rotations == 1).nonzero()[0])
    c = int(ep.classes[label])
    own = store.images[store.class_offsets[c]:store.class_offsets[c + 1]].float() / 255
    turned = torch.rot90(own, 1, dims=(-2, -1))
    img = ep.support_x[ep.support_y == label][0]
    assert ((turned - img).abs().flatten(1).amax(1) == 0).any()


def test_class_splits(store):
    maml_train, maml_test = resolve_split(store, "maml/train"), resolve_split(store, "maml/test")
    assert len(maml_train) == 1200 and len(maml_test) == 423
    assert set(maml_train).isdisjoint(maml_test) and len(set(maml_train) | set(maml_test)) == 1623
    v = [resolve_split(store, f"vinyals/{p}") for p in ("train", "val", "test")]
    assert [len(x) for x in v] == [1028, 172, 423]
    assert len(set(np.concatenate(v))) == 1623
    assert np.array_equal(resolve_split(store, "maml/train"), maml_train)  # stable
    assert not np.array_equal(resolve_split(store, "maml/train", split_seed=1), maml_train)
    assert np.array_equal(resolve_split(store, "background"), np.arange(964))
    bg_train, bg_val = resolve_split(store, "background/train"), resolve_split(store, "background/val")
    assert len(bg_train) == 864 and len(bg_val) == 100 and set(bg_train).isdisjoint(bg_val)
    assert set(bg_train) | set(bg_val) == set(range(964))  # held out of background; evaluation untouched


def test_shuffled_splits_need_omniglot(tmp_path):
    small = TaskStore.open(prepare_omniglot(write_tiny_omniglot(tmp_path / "src"), tmp_path / "s").path)
    with pytest.raises(EpisodeError, match="defined for Omniglot \\(1623 classes in the store\\)"):
        resolve_split(small, "maml/train")
    with pytest.raises(EpisodeError, match="964 classes in the 'background' partition"):
        resolve_split(small, "background/val")


@pytest.mark.parametrize("kwargs, message", [
    (dict(ways=700, split="evaluation"), "ways = 700 exceeds the 659 classes of split 'evaluation'"),
    (dict(ways=5, shots=10, queries=11, split="evaluation"), "shots \\+ queries = 21 exceeds the 20 images"),
    (dict(ways=0), "ways must be a positive integer"),
    (dict(shots=-1), "shots must be a positive integer"),
    (dict(queries=0), "queries must be a positive integer"),
    (dict(ways=2.5), "ways must be a positive integer"),
    (dict(split="evalution"), "unknown split 'evalution' \\(did you mean 'evaluation'\\?\\)"),
    (dict(seed=-1), "seed must be a non-negative integer"),
])
def test_bad_episode_settings(store, kwargs, message):
    settings = dict(ways=5, shots=1, queries=15, split="background") | kwargs
    with pytest.raises(EpisodeError, match=message):
        EpisodeSampler(store, **settings)


def test_bad_step_or_slot(store):
    s = EpisodeSampler(store, ways=5, shots=1, queries=1, split="background")
    with pytest.raises(EpisodeError, match="step must be a non-negative integer"):
        s.episode(-1, 0)
    with pytest.raises(EpisodeError, match="slot must be a non-negative integer"):
        s.episode(0, "3")


def test_sequence_episodes(store):
    s = SequenceEpisodeSampler(store, classes=5, instances=10, split="background", seed=1)
    ep = s.episode(2, 0)
    assert ep.x.shape == (50, 1, 28, 28) and ep.y.shape == (50,)
    assert torch.bincount(ep.y, minlength=5).tolist() == [10] * 5
    assert ep.prev_label[0].sum() == 0
    assert torch.equal(ep.prev_label[1:].argmax(1), ep.y[:-1]) and (ep.prev_label[1:].sum(1) == 1).all()
    for label in range(5):
        assert ep.instance[ep.y == label].tolist() == list(range(1, 11))
    assert not torch.equal(ep.y, torch.arange(5).repeat_interleave(10))  # shuffled
    assert torch.equal(s.episode(2, 0).x, ep.x)
    with pytest.raises(EpisodeError, match="instances = 21 exceeds"):
        SequenceEpisodeSampler(store, classes=5, instances=21, split="background")
    with pytest.raises(EpisodeError, match="classes = 3857 exceeds the 3856 classes"):
        SequenceEpisodeSampler(store, classes=3857, instances=2, split="background")


def test_sinusoid_tasks():
    s = SinusoidSampler(shots=10, queries=7, seed=5)
    ep = s.episode(3, 1)
    a, p = ep.task_params.tolist()
    assert 0.1 <= a <= 5.0 and 0.0 <= p <= math.pi
    assert ep.support_x.shape == (10, 1) and ep.query_x.shape == (7, 1)
    assert ((ep.support_x >= -5) & (ep.support_x <= 5)).all()
    assert torch.allclose(ep.support_y, a * torch.sin(ep.support_x - p), atol=1e-5)
    assert torch.allclose(ep.query_y, a * torch.sin(ep.query_x - p), atol=1e-5)
    assert torch.equal(SinusoidSampler(shots=10, queries=7, seed=5).episode(3, 1).support_x, ep.support_x)
    amps = torch.stack([s.episode(0, i).task_params[0] for i in range(300)])
    assert amps.min() < 0.5 and amps.max() > 4.5
    with pytest.raises(EpisodeError, match="amplitude must be an interval"):
        SinusoidSampler(amplitude=(5.0, 0.1))


# --------------------------------------------------------------------------------------------------- within alphabets


def _alphabet(store, c: int) -> str:
    return store.class_names[c].split("/")[0]


def test_within_alphabet_episodes_draw_every_class_from_one_alphabet(store):
    s = EpisodeSampler(store, ways=20, shots=1, queries=1, split="evaluation", within_alphabet=True, seed=5)
    seen = set()
    for slot in range(40):
        ep = s.episode(step=3, slot=slot)
        alphabets = {_alphabet(store, c) for c in ep.classes.tolist()}
        assert len(alphabets) == 1 and len(set(ep.classes.tolist())) == 20
        seen |= alphabets
    assert len(seen) >= 10  # the alphabet is chosen per episode, not fixed (20 evaluation alphabets)
    again = EpisodeSampler(store, ways=20, shots=1, queries=1, split="evaluation", within_alphabet=True, seed=5)
    assert _digest(again.episode(3, 7)) == _digest(s.episode(3, 7))  # a pure function of (seed, step, slot)
    assert s.pool.skipped == {}  # the smallest evaluation alphabet has 20 characters


def test_within_alphabet_with_rotations_keeps_turns_and_skips_small_alphabets(store):
    train = EpisodeSampler(store, ways=60, shots=1, queries=1, split="background", within_alphabet=True)
    assert train.pool.rotations
    # 14-character alphabets x 4 turns = 56 classes < 60: skipped and named, the others drawn from.
    assert train.pool.skipped and all(n < 60 for n in train.pool.skipped.values())
    ep = train.episode(0, 0)
    assert len({_alphabet(store, c) for c in ep.classes.tolist()}) == 1
    assert _alphabet(store, int(ep.classes[0])) not in train.pool.skipped
    pairs = set(zip(ep.classes.tolist(), ep.rotations.tolist()))
    assert len(pairs) == 60  # distinct (character, turn) classes


def test_within_alphabet_refuses_ways_no_alphabet_has(store):
    with pytest.raises(EpisodeError, match=r"ways = 60 with data.within_alphabet: no alphabet of split "
                                           r"'evaluation' has that many classes \(the largest has 47\)"):
        EpisodeSampler(store, ways=60, shots=1, queries=1, split="evaluation", within_alphabet=True)


def test_within_alphabet_sequences(store):
    s = SequenceEpisodeSampler(store, classes=5, instances=3, split="evaluation", within_alphabet=True)
    ep = s.episode(1, 2)
    assert len({_alphabet(store, c) for c in ep.classes.tolist()}) == 1


# --------------------------------------------------------------------------------------------------- augmentation


def test_augmentation_keeps_the_episode_and_distorts_each_image_deterministically(store):
    from metatrain.tasks.augment import Affine

    plain = EpisodeSampler(store, ways=5, shots=1, queries=5, split="background", seed=2)
    aug = EpisodeSampler(store, ways=5, shots=1, queries=5, split="background", seed=2, augment=Affine(p=1.0))
    a, b = plain.episode(4, 1), aug.episode(4, 1)
    assert torch.equal(a.classes, b.classes) and torch.equal(a.rotations, b.rotations)  # same classes, drawings
    assert torch.equal(a.support_y, b.support_y)
    changed = (a.query_x - b.query_x).flatten(1).abs().amax(1) > 0
    assert bool(changed.all())  # p = 1: every image distorted
    assert 0.0 <= float(b.query_x.min()) and float(b.query_x.max()) <= 1.0
    assert _digest(aug.episode(4, 1)) == _digest(b)  # same key, same distortion
    assert _digest(aug.episode(4, 2)) != _digest(aug.episode(4, 1))
    zero = EpisodeSampler(store, ways=5, shots=1, queries=5, split="background", seed=2,
                          augment=Affine(rotation=0, shear=0, scale=0, translate=0))
    assert _digest(zero.episode(4, 1)) == _digest(a)  # zero strength: the identity, exactly


def test_affine_parameters_respect_their_bounds_and_probability():
    from metatrain.tasks.augment import Affine

    aug = Affine(rotation=10, shear=0.3, scale=0.2, translate=2, p=0.5)
    params = aug.draw(np.random.default_rng(0), 20_000)
    angle, sx, sy, scale, tx, ty = params.T
    assert np.abs(angle).max() <= 10 and np.abs(sx).max() <= 0.3 and np.abs(sy).max() <= 0.3
    assert 0.8 <= scale.min() and scale.max() <= 1.2 and np.abs(np.r_[tx, ty]).max() <= 2
    for applied in (angle != 0, sx != 0, scale != 1, tx != 0):
        assert abs(applied.mean() - 0.5) < 0.02  # each component with probability p
    assert ((sx != 0) == (sy != 0)).all() and ((tx != 0) == (ty != 0)).all()  # x and y share one coin
    with pytest.raises(EpisodeError, match="augment scale must be < 1"):
        Affine(scale=1.0)
    with pytest.raises(EpisodeError, match="augment p must be in"):
        Affine(p=1.5)


def test_a_translation_moves_the_image_by_whole_pixels():
    from metatrain.tasks.augment import Affine

    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1.0
    aug = Affine(rotation=0, shear=0, scale=0, translate=2, p=1.0)
    params = aug.draw(np.random.default_rng(1), 1)
    tx, ty = params[0, 4:]
    moved = aug.apply(x, np.random.default_rng(1))
    # Bilinear: the dot's mass is kept (nothing crosses the border) and its centre moves by (tx, ty).
    ys, xs = torch.meshgrid(torch.arange(9.0), torch.arange(9.0), indexing="ij")
    mass = moved[0, 0].sum()
    assert abs(float(mass) - 1.0) < 1e-5
    assert abs(float((moved[0, 0] * xs).sum() / mass) - (4 + tx)) < 1e-4
    assert abs(float((moved[0, 0] * ys).sum() / mass) - (4 + ty)) < 1e-4


def test_the_run_augments_training_episodes_only_and_names_skipped_alphabets(omniglot_store):
    from metatrain.pipeline.components import build_sampler, open_store
    from metatrain.pipeline.config import load_config
    from metatrain.pipeline.jobs.train import summarize

    cfg = load_config(None, [f"data.path={omniglot_store}", "data.augment=true", "data.within_alphabet=true",
                             "data.ways=20", "data.val_split=evaluation", "data.test_split=background",
                             "data.rotations=off"])
    store = open_store(cfg)
    samplers = {split: build_sampler(cfg, store, split) for split in ("train", "val", "test")}
    assert samplers["train"].pool.augment == cfg.data.affine() is not None
    assert samplers["val"].pool.augment is None and samplers["test"].pool.augment is None
    summary = summarize([{"query_acc": 1.0}, {"query_acc": 0.5}], cfg, cfg.data.test_split)
    # 20-way within alphabets of the background split without rotations: the 14- to 19-character alphabets skipped.
    assert summary["within_alphabet"] is True and summary["alphabets_skipped"]
    assert all(n < 20 for n in summary["alphabets_skipped"].values())
    assert summary["alphabets_skipped"] == samplers["test"].pool.skipped


# --------------------------------------------------------------------------------------------------- verification pairs


def test_verification_pairs_are_balanced_and_drawn_within_and_across_alphabets(store):
    s = PairSampler(store, pairs=64, split="background", within=0.5, seed=1)
    within = across = 0
    for slot in range(20):
        t = s.episode(step=2, slot=slot)
        assert t.pairs and t.support_x.shape == t.query_x.shape == (64, 1, 28, 28)
        assert t.query_y.tolist() == [1] * 32 + [0] * 32 and torch.equal(t.support_y, t.query_y)
        same, diff = slice(0, 32), slice(32, 64)
        assert torch.equal(t.classes[same, 0], t.classes[same, 1]) and torch.equal(t.rotations[same, 0],
                                                                                   t.rotations[same, 1])
        # Two drawings of one class: never the same image (pixels differ, before any rotation).
        assert bool(((t.support_x[same] - t.query_x[same]).flatten(1).abs().amax(1) > 0).all())
        assert bool(((t.classes[diff, 0] != t.classes[diff, 1]) | (t.rotations[diff, 0] != t.rotations[diff, 1]))
                    .all())
        for a, b in t.classes[diff].tolist():
            one = _alphabet(store, a) == _alphabet(store, b)
            within, across = within + one, across + (not one)
    assert abs(within / (within + across) - 0.5) < 0.1  # 640 different pairs, half within one alphabet
    again = PairSampler(store, pairs=64, split="background", within=0.5, seed=1)
    assert _digest(again.episode(2, 5)) == _digest(s.episode(2, 5))
    with pytest.raises(EpisodeError, match="pairs must be even"):
        PairSampler(store, pairs=7, split="background")
    with pytest.raises(EpisodeError, match="needs two alphabets"):
        PairSampler(store, pairs=8, split="evaluation:Kannada")
