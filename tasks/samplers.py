"""Episode samplers: every episode is a pure function of (seed, step, slot).

``EpisodeSampler`` draws N-way K-shot classification episodes with Q queries per class from a prepared store;
``SequenceEpisodeSampler`` draws Santoro et al. sequences for memory models; ``SinusoidSampler`` draws the MAML
paper's regression tasks. None of them keeps state between calls: the random generator of an episode is seeded from
(seed, stream, step, slot) through numpy's SeedSequence, so any process, given those integers, rebuilds the same
episode bit for bit. The distributed engine relies on this to hand a dead worker's slots to another worker.

Usage::

    store = TaskStore.open("data/omniglot")
    train = EpisodeSampler(store, ways=5, shots=1, queries=15, split="background", seed=0)
    ep = train.episode(step=0, slot=3)          # ep.support_x: (5, 1, 28, 28), ep.query_y: (75,)

Benchmark: ``python bench/sampler.py`` (episodes/s on one core).
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch
from metatrain.tasks.augment import Affine
from metatrain.tasks.episode import Episode, SequenceEpisode
from metatrain.tasks.errors import EpisodeError
from metatrain.tasks.sources import unit_pixels
from metatrain.tasks.splits import is_training_split, resolve_split
from metatrain.tasks.store import TaskStore


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise EpisodeError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _stream(*parts: str) -> int:
    """A stable 32-bit id for a sampler's stream, so train and validation episodes of one seed differ."""
    return zlib.crc32("|".join(parts).encode())


def episode_rng(seed: int, stream: int, step: int, slot: int) -> np.random.Generator:
    """The generator of one episode. SeedSequence hashes the four integers, so neighbouring keys are unrelated."""
    for name, v in (("seed", seed), ("step", step), ("slot", slot)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise EpisodeError(f"{name} must be a non-negative integer, got {v!r}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), stream, int(step), int(slot)])))


class _ClassPool:
    """The classes of a split, optionally x4 by rotation; draws classes and drawings for one episode."""

    def __init__(self, store: TaskStore, split: str, rotations: bool | None, split_seed: int, per_class: int,
                 per_class_field: str, augment: Affine | None = None):
        self.store, self.augment = store, augment
        self.split = split
        self.rotations = is_training_split(split) if rotations is None else bool(rotations)
        self.base = torch.from_numpy(resolve_split(store, split, split_seed))
        self.turns = 4 if self.rotations else 1
        self.size = len(self.base) * self.turns
        sizes = store.class_sizes[self.base]
        fewest = int(sizes.min())
        if per_class > fewest:
            raise EpisodeError(f"{per_class_field} = {per_class} exceeds the {fewest} images of the smallest class in "
                               f"split {split!r}")
        self.offsets = store.class_offsets[self.base]
        self.sizes = sizes
        self.uniform = bool((sizes == sizes[0]).all())
        self.groups: list[np.ndarray] | None = None  # within_alphabet(): each alphabet's pool indices
        self.skipped: dict[str, int] = {}

    def check_ways(self, field: str, ways: int) -> None:
        if ways > self.size:
            rot = " with rotations" if self.rotations else ""
            raise EpisodeError(f"{field} = {ways} exceeds the {self.size} classes of split {self.split!r}{rot}")

    def alphabet_groups(self) -> dict[str, np.ndarray]:
        """Alphabet -> the pool indices of its classes (index = position * turns + turn; "" for a flat folder)."""
        names = np.array([n.split("/")[0] if "/" in n else "" for n in (self.store.class_names[int(c)]
                                                                           for c in self.base)])
        index = np.arange(self.size).reshape(len(self.base), self.turns)
        return {a: index[names == a].ravel() for a in dict.fromkeys(names)}

    def within_alphabet(self, field: str, ways: int) -> None:
        """Draw every episode's classes from one alphabet (Lake et al.'s one-shot protocol), the alphabet chosen
        uniformly per episode. Alphabets with fewer than ``ways`` classes (x4 with rotations) are skipped and
        listed in ``skipped``; none large enough is an error naming ``field``."""
        groups = self.alphabet_groups()
        self.groups = [g for g in groups.values() if len(g) >= ways]
        self.skipped = {a: len(g) for a, g in groups.items() if len(g) < ways}
        if not self.groups:
            rot = " with rotations" if self.rotations else ""
            raise EpisodeError(f"{field} = {ways} with data.within_alphabet: no alphabet of split {self.split!r} has "
                               f"that many classes{rot} (the largest has {max(map(len, groups.values()))})")

    def draw(self, rng: np.random.Generator, ways: int, per_class: int):
        """(classes, rotations, rows): store class ids (ways,), quarter turns (ways,), image rows (ways, per_class)."""
        if self.groups is None:
            pick = rng.choice(self.size, ways, replace=False)  # random order = random label order
        else:
            group = self.groups[int(rng.integers(len(self.groups)))]
            pick = group[rng.choice(len(group), ways, replace=False)]
        pick = torch.from_numpy(pick)
        pos, turns = pick // self.turns, pick % self.turns
        n = self.sizes[pos]
        width = int(n.max())
        keys = torch.from_numpy(rng.random((ways, width)))
        if not self.uniform:  # classes with fewer images: their missing columns sort last
            keys[torch.arange(width) >= n[:, None]] = math.inf
        drawings = keys.argsort(dim=1)[:, :per_class]
        return self.base[pos], turns, self.offsets[pos, None] + drawings

    def pixels(self, rows: torch.Tensor, turns: torch.Tensor, key: tuple[int, int, int]) -> torch.Tensor:
        """Images of ``rows`` (ways, m) as float32 in [0, 1], each class rotated by its quarter turns, then each
        image distorted (``augment``) by a generator of the episode's ``key`` of its own: the classes and drawings
        of an episode are the same with augmentation on or off."""
        x = self.store.images[rows]  # (ways, m, C, H, W) uint8
        if self.rotations:
            for k in (1, 2, 3):
                sel = turns == k
                if bool(sel.any()):
                    x[sel] = torch.rot90(x[sel], k, dims=(-2, -1))
        x = unit_pixels(x)
        if self.augment is not None:
            rng = episode_rng(key[0], _stream("augment", self.split), key[1], key[2])
            x = self.augment.apply(x.flatten(0, 1), rng).view_as(x)
        return x


class EpisodeSampler:
    """N-way K-shot episodes with Q queries per class from one split of a store.

    Support and query are grouped by label (``support_y = [0]*K + [1]*K + ...``); the mapping of labels to classes
    is a fresh random permutation per episode. Rotations (when on) make each (class, quarter turn) a class of its own.
    ``within_alphabet`` draws each episode's classes from one alphabet; ``augment`` distorts every image.
    """

    def __init__(self, store: TaskStore, *, ways: int, shots: int, queries: int, split: str,
                 rotations: bool | None = None, seed: int = 0, split_seed: int = 0, within_alphabet: bool = False,
                 augment: Affine | None = None):
        self.ways = _positive_int("ways", ways)
        self.shots = _positive_int("shots", shots)
        self.queries = _positive_int("queries", queries)
        self.seed = seed
        self.pool = _ClassPool(store, split, rotations, split_seed, self.shots + self.queries, "shots + queries",
                               augment)
        self.pool.check_ways("ways", self.ways)
        if within_alphabet:
            self.pool.within_alphabet("ways", self.ways)
        self.stream = _stream("episode", split)
        episode_rng(seed, self.stream, 0, 0)  # validates seed now rather than at the first episode

    @property
    def num_classes(self) -> int:
        """Classes available to an episode (x4 with rotations)."""
        return self.pool.size

    def episode(self, step: int, slot: int) -> Episode:
        rng = episode_rng(self.seed, self.stream, step, slot)
        classes, turns, rows = self.pool.draw(rng, self.ways, self.shots + self.queries)
        x = self.pool.pixels(rows, turns, (self.seed, step, slot))
        k, q = self.shots, self.queries
        shape = x.shape[2:]
        labels = torch.arange(self.ways)
        return Episode(
            support_x=x[:, :k].reshape(-1, *shape),
            support_y=labels.repeat_interleave(k),
            query_x=x[:, k:].reshape(-1, *shape),
            query_y=labels.repeat_interleave(q),
            classes=classes,
            rotations=turns,
            key=(int(self.seed), int(step), int(slot)),
        )

    def episodes(self, step: int, slots) -> list[Episode]:
        return [self.episode(step, s) for s in slots]


class PairSampler:
    """Koch et al.'s (2015) verification tasks: ``pairs`` (left, right) image pairs, half of one class (two distinct
    drawings) and half of two classes; of the latter a share ``within`` from one alphabet (characters that look
    alike), the rest from two alphabets. Each task is an :class:`Episode` with ``pairs=True``."""

    def __init__(self, store: TaskStore, *, pairs: int, split: str, within: float = 0.5,
                 rotations: bool | None = None, seed: int = 0, split_seed: int = 0, augment: Affine | None = None):
        self.pairs = _positive_int("pairs", pairs)
        if self.pairs % 2:
            raise EpisodeError(f"pairs must be even (half same, half different), got {pairs}")
        if not 0 <= within <= 1:
            raise EpisodeError(f"within must be in [0, 1] (the share of different pairs from one alphabet), "
                               f"got {within}")
        self.within, self.seed = within, seed
        self.pool = _ClassPool(store, split, rotations, split_seed, 2, "a same pair's two drawings", augment)
        groups = list(self.pool.alphabet_groups().values())
        self.alike = [g for g in groups if len(g) >= 2]  # alphabets a within-alphabet pair can come from
        if len(groups) < 2 or (within > 0 and not self.alike):
            raise EpisodeError(f"split {split!r} needs two alphabets, and one of two classes or more, for "
                               f"verification pairs (it has {len(groups)} alphabets)")
        self.alphabet_of = np.empty(self.pool.size, dtype=np.int64)
        for i, g in enumerate(groups):
            self.alphabet_of[g] = i
        self.stream = _stream("pairs", split)
        episode_rng(seed, self.stream, 0, 0)

    def _different(self, rng: np.random.Generator) -> tuple[int, int]:
        if rng.random() < self.within:
            group = self.alike[int(rng.integers(len(self.alike)))]
            a, b = rng.choice(len(group), 2, replace=False)
            return int(group[a]), int(group[b])
        while True:  # two alphabets: rejection is cheap, an alphabet holds a small share of the classes
            a, b = rng.choice(self.pool.size, 2, replace=False)
            if self.alphabet_of[a] != self.alphabet_of[b]:
                return int(a), int(b)

    def episode(self, step: int, slot: int) -> Episode:
        rng = episode_rng(self.seed, self.stream, step, slot)
        half = self.pairs // 2
        same = rng.choice(self.pool.size, half)  # a class may come twice; its pairs still differ in drawings
        picks = torch.tensor([(int(c), int(c)) for c in same] + [self._different(rng) for _ in range(half)])
        pos, turns = picks // self.pool.turns, picks % self.pool.turns
        n = self.pool.sizes[pos]  # (pairs, 2) drawings per class
        first = torch.from_numpy(rng.integers(0, n[:, 0].numpy()))
        # The right image of a same pair is another drawing: an offset of 1..n-1 from the left one.
        shift = torch.from_numpy(rng.integers(1, n[:half, 1].numpy()))
        second = torch.cat([(first[:half] + shift) % n[:half, 1],
                            torch.from_numpy(rng.integers(0, n[half:, 1].numpy()))])
        rows = self.pool.offsets[pos] + torch.stack([first, second], 1)
        x = self.pool.pixels(rows, turns, (self.seed, step, slot))
        target = torch.cat([torch.ones(half, dtype=torch.int64), torch.zeros(half, dtype=torch.int64)])
        return Episode(x[:, 0], target, x[:, 1], target.clone(), self.pool.base[pos], turns,
                       (int(self.seed), int(step), int(slot)), pairs=True)

    def episodes(self, step: int, slots) -> list[Episode]:
        return [self.episode(step, s) for s in slots]


class SequenceEpisodeSampler:
    """Santoro et al. (2016) episodes: ``classes`` x ``instances`` images shuffled into one labelled sequence."""

    def __init__(self, store: TaskStore, *, classes: int = 5, instances: int = 10, split: str,
                 rotations: bool | None = None, seed: int = 0, split_seed: int = 0, within_alphabet: bool = False,
                 augment: Affine | None = None):
        self.classes = _positive_int("classes", classes)
        self.instances = _positive_int("instances", instances)
        self.seed = seed
        self.pool = _ClassPool(store, split, rotations, split_seed, self.instances, "instances", augment)
        self.pool.check_ways("classes", self.classes)
        if within_alphabet:
            self.pool.within_alphabet("classes", self.classes)
        self.stream = _stream("sequence", split)
        episode_rng(seed, self.stream, 0, 0)

    def episode(self, step: int, slot: int) -> SequenceEpisode:
        rng = episode_rng(self.seed, self.stream, step, slot)
        n, m = self.classes, self.instances
        classes, turns, rows = self.pool.draw(rng, n, m)
        x = self.pool.pixels(rows, turns, (self.seed, step, slot)).reshape(n * m, *self.pool.store.images.shape[1:])
        order = torch.from_numpy(rng.permutation(n * m))
        x = x[order]
        y = torch.arange(n).repeat_interleave(m)[order]
        prev = torch.zeros(n * m, n)
        prev[1:] = torch.nn.functional.one_hot(y[:-1], n).float()
        # instance[t] = 1 + number of earlier steps with the same label.
        onehot = torch.nn.functional.one_hot(y, n)
        instance = (onehot.cumsum(0) * onehot).sum(1)
        return SequenceEpisode(x, y, prev, instance, classes, turns, (int(self.seed), int(step), int(slot)))


class SinusoidSampler:
    """MAML-paper regression tasks: y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5].

    ``shots`` support points and ``queries`` query points per task (both drawn from the same sinusoid).
    ``task_params`` holds (amplitude, phase).
    """

    def __init__(self, *, shots: int = 10, queries: int = 10, seed: int = 0, amplitude=(0.1, 5.0),
                 phase=(0.0, math.pi), x_range=(-5.0, 5.0)):
        self.shots = _positive_int("shots", shots)
        self.queries = _positive_int("queries", queries)
        for name, (lo, hi) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not lo < hi:
                raise EpisodeError(f"{name} must be an interval (low, high) with low < high, got {(lo, hi)}")
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range
        self.seed = seed
        self.stream = _stream("sinusoid")
        episode_rng(seed, self.stream, 0, 0)

    def episode(self, step: int, slot: int) -> Episode:
        rng = episode_rng(self.seed, self.stream, step, slot)
        a = rng.uniform(*self.amplitude)
        p = rng.uniform(*self.phase)
        x = torch.from_numpy(rng.uniform(*self.x_range, size=(self.shots + self.queries, 1))).float()
        y = a * torch.sin(x - p)
        k = self.shots
        empty = torch.empty(0, dtype=torch.int64)
        return Episode(x[:k], y[:k], x[k:], y[k:], empty, empty, (int(self.seed), int(step), int(slot)),
                       torch.tensor([a, p], dtype=torch.float32))

    def episodes(self, step: int, slots) -> list[Episode]:
        return [self.episode(step, s) for s in slots]
