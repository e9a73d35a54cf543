"""Optimizee task families for learned optimizers: each task is a pure function of (seed, step, slot).

Two families of Andrychowicz et al. 2016 ("Learning to learn by gradient descent by gradient descent"):

- ``quadratic`` (``QuadraticSampler``): f(theta) = ||W theta - y||^2 with W (d x d) and y (d) entries N(0, 1), d = 10
  in the paper, and theta_0 N(0, 1).
- ``mlp`` (``MLPSampler``): a small MLP classifier (one hidden layer of 20 sigmoid units in the paper; other widths,
  depths and ReLU are its generalisation tests) trained by cross-entropy on minibatches of 128 of a real image set:
  scikit-learn's 8x8 ``digits``, 10-class subsets of an ``omniglot`` store, or ``mnist`` from local IDX files
  (the two digit sets are read by ``tasks.digit_images``).

Like the episode samplers they keep no state: every random draw of a task (its data, its initial parameters, its
minibatch order) comes from a generator seeded from (seed, stream, step, slot) (``samplers.episode_rng``), each kind
of draw on its own stream, so a worker that takes over a dead worker's slot rebuilds the same task bit for bit.
Training optimizees and held-out ones are simply different ``seed``s (and for ``omniglot`` a different class split).

Every task implements :class:`OptimizeeTask`, which is all a learned optimizer needs::

    >>> task = make_optimizee_sampler("mlp", seed=0, source="digits").task(step=0, slot=3)
    >>> params = {k: p.requires_grad_() for k, p in task.init_params().items()}  # {"w0", "b0", "w1", "b1"}
    >>> for t in range(100):                                   # t: the optimisation step, picks minibatch t
    ...     grads = torch.autograd.grad(task.loss(params, t), list(params.values()))
    >>> task.eval_loss(params)                                 # cross-entropy on all the task's examples

    >>> q = QuadraticSampler(dim=10, seed=0).task(step=0, slot=3)   # q.W: (10, 10), q.y: (10,)
    >>> q.loss(torch.zeros(10))                                      # ||y||^2; also q.loss({"theta": ...}, t)
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from metatrain.tasks.digit_images import cached_digits, load_mnist
from metatrain.tasks.errors import EpisodeError, did_you_mean
from metatrain.tasks.samplers import _positive_int, _stream, episode_rng
from metatrain.tasks.sources import unit_pixels
from metatrain.tasks.splits import resolve_split
from metatrain.tasks.store import TaskStore

OPTIMIZEE_FAMILIES = ("quadratic", "mlp")
MLP_SOURCES = ("digits", "omniglot", "mnist")
ACTIVATIONS = ("sigmoid", "relu")
EXAMPLE_PARTS = ("all", "train", "heldout")
HELDOUT_FRACTION = 0.2
"""Share of a source's examples in the ``heldout`` part (``examples="heldout"``); the rest is ``train``."""


@runtime_checkable
class OptimizeeTask(Protocol):
    """What a learned optimizer sees of a task: initial parameters, a per-step loss and a final evaluation loss.

    Parameters are a dict of named tensors (not an ``nn.Module``) so that an optimizer can update them functionally
    and differentiate through its own updates (the paper's truncated backpropagation through time).
    """

    key: tuple[int, int, int]
    """(seed, step, slot) the task was drawn from."""

    def init_params(self) -> dict[str, torch.Tensor]:
        """The optimizee's initial parameters: fresh tensors (the caller may ``requires_grad_`` them), same values
        on every call."""
        ...

    def loss(self, params: Mapping[str, torch.Tensor], t: int) -> torch.Tensor:
        """The scalar loss at optimisation step ``t`` (a pure function of the key and ``t``), differentiable in
        ``params``."""
        ...

    def eval_loss(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The scalar loss of the whole task (all its examples), for reporting how far an optimizer got."""
        ...


class OptimizeeSampler(Protocol):
    """A family of optimizee tasks: ``task(step, slot)`` is a pure function of (seed, step, slot)."""

    seed: int

    def task(self, step: int, slot: int) -> OptimizeeTask: ...


def _check_t(t) -> int:
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0:
        raise EpisodeError(f"t (the optimisation step) must be a non-negative integer, got {t!r}")
    return int(t)


def _choice(name: str, value, known) -> str:
    if value not in known:
        raise EpisodeError(f"unknown {name} {value!r}{did_you_mean(value, known)}; known: {', '.join(known)}")
    return value


# --------------------------------------------------------------------------------------------------------------
# Quadratic
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuadraticTask:
    """One quadratic optimizee f(theta) = ||W theta - y||^2 (``theta`` of shape (dim,) or (batch, dim))."""

    W: torch.Tensor
    """(dim, dim) matrix, entries N(0, 1)."""
    y: torch.Tensor
    """(dim,) target, entries N(0, 1)."""
    key: tuple[int, int, int]
    """(seed, step, slot) the task was drawn from."""
    theta0: torch.Tensor | None = None
    """(dim,) initial point, N(0, 1) (``QuadraticSampler.initial_point``); None for a task built by hand, which then
    has no ``init_params``."""

    def loss(self, theta: torch.Tensor | Mapping[str, torch.Tensor], t: int = 0) -> torch.Tensor:
        """f(theta); ``theta`` a tensor or the protocol's ``{"theta": tensor}``. ``t`` is ignored: the quadratic is
        deterministic, every step sees the same function."""
        if isinstance(theta, Mapping):
            if set(theta) != {"theta"}:
                raise EpisodeError(f"a quadratic's params are {{'theta'}}, got keys {sorted(theta)}")
            theta = theta["theta"]
        if theta.shape[-1] != self.y.shape[0]:
            raise EpisodeError(f"theta has {theta.shape[-1]} coordinates; this quadratic has {self.y.shape[0]}")
        return ((theta @ self.W.T - self.y) ** 2).sum(-1)

    def eval_loss(self, params: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The same f: a quadratic has no minibatches, so the evaluation loss is the loss."""
        return self.loss(params)

    def init_params(self) -> dict[str, torch.Tensor]:
        if self.theta0 is None:
            raise EpisodeError("this QuadraticTask has no theta0 (draw it with QuadraticSampler.task, or pass theta0)")
        return {"theta": self.theta0.clone()}

    def to(self, device: torch.device | str) -> QuadraticTask:
        """The same task with its tensors on ``device`` (what a GPU worker does with every task it draws)."""
        moved = {k: None if v is None else v.to(device) for k, v in (("W", self.W), ("y", self.y),
                                                                      ("theta0", self.theta0))}
        return dataclasses.replace(self, **moved)

    def minimum(self) -> torch.Tensor:
        """The least-squares minimiser (what an optimizer should approach; W is almost surely invertible)."""
        return torch.linalg.lstsq(self.W, self.y.unsqueeze(-1)).solution.squeeze(-1)


class QuadraticSampler:
    """Quadratic optimizees of ``dim`` coordinates; ``theta_0`` of a task is drawn with it (N(0, 1), as the paper)."""

    def __init__(self, *, dim: int = 10, seed: int = 0):
        self.dim = _positive_int("dim", dim)
        self.seed = seed
        self.stream = _stream("quadratic", str(self.dim))
        episode_rng(seed, self.stream, 0, 0)  # a bad seed fails here, not in a worker

    def task(self, step: int, slot: int) -> QuadraticTask:
        rng = episode_rng(self.seed, self.stream, step, slot)
        w = torch.from_numpy(rng.standard_normal((self.dim, self.dim))).float()
        y = torch.from_numpy(rng.standard_normal(self.dim)).float()
        return QuadraticTask(w, y, (int(self.seed), int(step), int(slot)), self.initial_point(step, slot))

    def episode(self, step: int, slot: int) -> QuadraticTask:
        """The engine's name for :meth:`task` (every sampler a worker holds answers ``episode(step, slot)``)."""
        return self.task(step, slot)

    def initial_point(self, step: int, slot: int) -> torch.Tensor:
        """theta_0 of the task at (step, slot): its own stream, so it does not shift when the task's draw changes."""
        rng = episode_rng(self.seed, _stream("quadratic-theta0", str(self.dim)), step, slot)
        return torch.from_numpy(rng.standard_normal(self.dim)).float()


# --------------------------------------------------------------------------------------------------------------
# Image sources of the MLP family
# --------------------------------------------------------------------------------------------------------------

def _example_part(n: int, part: str, split_seed: int, source: str) -> np.ndarray | None:
    """Rows of ``part`` of a fixed pool of ``n`` examples (None for all): one shuffle by ``split_seed``, the last
    ``HELDOUT_FRACTION`` of it held out; the same for every task and seed, so held-out examples stay held out."""
    if part == "all":
        return None
    order = episode_rng(split_seed, _stream("mlp-examples", source), 0, 0).permutation(n)
    cut = n - int(n * HELDOUT_FRACTION)
    return np.sort(order[:cut] if part == "train" else order[cut:])


# --------------------------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class MLPTask:
    """One MLP optimizee: cross-entropy of ``inputs -> hidden... -> num_classes`` on the task's examples.

    Parameters are ``{"w0": (h1, d), "b0": (h1,), "w1": (h2, h1), ..., "wL": (classes, hL), "bL": (classes,)}``
    (``torch.nn.Linear``'s layout). ``x`` and ``y`` may be shared with other tasks of the same sampler: treat them
    as read-only.
    """

    x: torch.Tensor
    """(n, features) float32 inputs in [0, 1], flattened images."""
    y: torch.Tensor
    """(n,) int64 labels in ``0..num_classes-1``."""
    num_classes: int
    hidden: tuple[int, ...]
    """Widths of the hidden layers."""
    activation: str
    """``sigmoid`` or ``relu``, after every hidden layer."""
    batch_size: int
    key: tuple[int, int, int]
    """(seed, step, slot) the task was drawn from."""
    classes: torch.Tensor
    """(num_classes,) source class of each label (digits/MNIST: the digit; Omniglot: the store's class id)."""
    streams: tuple[int, int] = field(repr=False)
    """(initial parameters, minibatch order) stream ids for ``episode_rng``."""

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every parameter, in layer order."""
        widths = (self.x.shape[1], *self.hidden, self.num_classes)
        out = {}
        for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
            out[f"w{i}"], out[f"b{i}"] = (d_out, d_in), (d_out,)
        return out

    @property
    def batches_per_epoch(self) -> int:
        if self.batch_size > len(self.y):
            raise EpisodeError(f"batch_size = {self.batch_size} exceeds the {len(self.y)} examples of this task")
        return len(self.y) // self.batch_size

    def init_params(self) -> dict[str, torch.Tensor]:
        """Random per task (the paper), like ``torch.nn.Linear``: weights and biases U(-1/sqrt(fan_in), +...)."""
        rng = episode_rng(self.key[0], self.streams[0], self.key[1], self.key[2])
        shapes = self.shapes
        out = {}
        for i in range(len(self.hidden) + 1):
            bound = 1.0 / math.sqrt(shapes[f"w{i}"][1])  # fan_in
            for name in (f"w{i}", f"b{i}"):
                out[name] = torch.from_numpy(rng.uniform(-bound, bound, shapes[name])).float()
        return out

    def batch_rows(self, t: int) -> torch.Tensor:
        """Rows of minibatch ``t``: epochs of ``batches_per_epoch`` batches, each epoch a fresh permutation seeded by
        (key, epoch) (the remainder of an epoch is dropped, so every batch has ``batch_size`` examples)."""
        epoch, i = divmod(_check_t(t), self.batches_per_epoch)
        seed, step, slot = self.key
        ss = np.random.SeedSequence([seed, self.streams[1], step, slot, epoch])
        perm = np.random.Generator(np.random.PCG64(ss)).permutation(len(self.y))
        return torch.from_numpy(perm[i * self.batch_size:(i + 1) * self.batch_size])

    def batch(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of minibatch ``t``."""
        rows = self.batch_rows(t)
        return self.x[rows], self.y[rows]

    def logits(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        shapes = self.shapes
        if set(params) != set(shapes):
            raise EpisodeError(f"MLP params must be {sorted(shapes)}; missing {sorted(set(shapes) - set(params))}, "
                               f"unexpected {sorted(set(params) - set(shapes))}")
        for name, shape in shapes.items():
            if tuple(params[name].shape) != shape:
                raise EpisodeError(f"MLP param {name} has shape {list(params[name].shape)}, expected {list(shape)}")
        act = torch.sigmoid if self.activation == "sigmoid" else torch.relu
        h = x.to(params["w0"].device)
        last = len(self.hidden)
        for i in range(last + 1):
            h = F.linear(h, params[f"w{i}"], params[f"b{i}"])
            if i < last:
                h = act(h)
        return h

    def loss(self, params: Mapping[str, torch.Tensor], t: int) -> torch.Tensor:
        """Mean cross-entropy on minibatch ``t``."""
        x, y = self.batch(t)
        return F.cross_entropy(self.logits(params, x), y.to(params["w0"].device))

    def eval_loss(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy on all the task's examples."""
        return F.cross_entropy(self.logits(params, self.x), self.y.to(params["w0"].device))

    def to(self, device: torch.device | str) -> MLPTask:
        """The same task with its examples on ``device`` (initial parameters are drawn on the CPU, then moved)."""
        return dataclasses.replace(self, x=self.x.to(device), y=self.y.to(device))

    def accuracy(self, params: Mapping[str, torch.Tensor]) -> float:
        """Share of the task's examples classified right."""
        with torch.no_grad():
            return (self.logits(params, self.x).argmax(1).cpu() == self.y.cpu()).float().mean().item()


class MLPSampler:
    """MLP optimizees of the paper's second experiment, on one of ``MLP_SOURCES``.

    ``source``:

    - ``digits`` (default): scikit-learn's 1,797 8x8 digits (64 inputs, 10 classes). Every task has the same data;
      what differs per task (per seed, step, slot) is its initial parameters and its minibatch order, exactly the
      paper's setting (one dataset, random initialisation).
    - ``mnist``: the IDX files of ``split`` ('train' default, or 'test') in folder ``path`` (784 inputs); as digits.
    - ``omniglot``: the prepared store at ``path``; each task draws its own ``ways`` (10) classes of ``split``
      ('background' default: train optimizers there and hold out 'evaluation'; any ``splits.resolve_split`` name),
      with all the drawings of each (20, so 200 examples), labels in random order. Images are average-pooled to
      ``image_size`` (14: 196 inputs, keeping the MLP at the paper's scale; pass the store's side to keep it). No
      rotation augmentation: a class here is a label of one small classification problem, not a few-shot class.

    ``examples``: 'all' (default), or 'train' / 'heldout', a fixed split of the data that is the same for every
    seed (``HELDOUT_FRACTION`` held out: a shuffle by ``split_seed`` for digits and MNIST; the last drawings of
    each class for Omniglot), to test an optimizer on examples none of its training tasks saw.

    ``hidden``: widths of the hidden layers ((20,) the paper; (40,) or (20, 20) its generalisation tests);
    ``activation``: 'sigmoid' (paper) or 'relu'; ``batch_size``: 128 (paper), at most a task's example count.
    The data are loaded (and checked) by the constructor, so a missing file fails at once, not in a worker; a
    pickled sampler leaves them behind and reloads them from ``path`` once per process.
    """

    def __init__(self, *, source: str = "digits", path: str | os.PathLike | None = None, split: str | None = None,
                 hidden: tuple[int, ...] = (20,), activation: str = "sigmoid", batch_size: int = 128,
                 examples: str = "all", ways: int | None = None, image_size: int | None = None, split_seed: int = 0,
                 seed: int = 0):
        self.source = _choice("source", source, MLP_SOURCES)
        self.activation = _choice("activation", activation, ACTIVATIONS)
        self.examples = _choice("examples", examples, EXAMPLE_PARTS)
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, (tuple, list)) or not hidden:
            raise EpisodeError(f"hidden must be a non-empty tuple of layer widths, e.g. (20,), got {hidden!r}")
        self.hidden = tuple(_positive_int(f"hidden[{i}]", h) for i, h in enumerate(hidden))
        self.batch_size = _positive_int("batch_size", batch_size)
        omniglot = self.source == "omniglot"
        if self.source == "digits":
            for name, v in (("path", path), ("split", split)):
                if v is not None:
                    raise EpisodeError(f"{name} is not an option of source 'digits' (its data ship with scikit-learn)")
        elif path is None:
            raise EpisodeError(f"source {self.source!r} needs path= (the " +
                               ("prepared store folder)" if omniglot else "folder of the MNIST IDX files)"))
        for name, v in (("ways", ways), ("image_size", image_size)):
            if v is not None and not omniglot:
                raise EpisodeError(f"{name} is an option of source 'omniglot' only, not {self.source!r}")
        self.path = None if path is None else Path(path)
        self.split = split if split is not None else {"mnist": "train", "omniglot": "background"}.get(self.source)
        self.ways = _positive_int("ways", 10 if ways is None else ways) if omniglot else 10
        self.image_size = _positive_int("image_size", 14 if image_size is None else image_size) if omniglot else None
        self.split_seed = split_seed
        self.seed = seed
        for s, name in ((seed, "seed"), (split_seed, "split_seed")):
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
                raise EpisodeError(f"{name} must be a non-negative integer, got {s!r}")
        tag = (self.source, self.split or "", self.examples)
        self.streams = (_stream("mlp-init", *tag), _stream("mlp-batches", *tag))
        self.class_stream = _stream("mlp-classes", *tag)
        self._data = None
        self._load()  # a missing file, bad split or too large batch fails here
        if self.source == "omniglot":
            store, pool = self._data
            side = store.images.shape[-1]
            if self.image_size > side:
                raise EpisodeError(f"image_size = {self.image_size} exceeds the {side}x{side} images of {store.path}")
            if self.ways > len(pool):
                raise EpisodeError(f"ways = {self.ways} exceeds the {len(pool)} classes of split {self.split!r}")
            fewest = int(min(len(self._drawings(int(store.class_sizes[c]))) for c in pool))
            if fewest == 0:
                raise EpisodeError(f"examples = {self.examples!r} leaves a class of split {self.split!r} empty")
            self._check_batch(self.ways * fewest, f"{self.ways} classes of split {self.split!r}")
        else:
            self._check_batch(len(self._data[1]), f"source {self.source!r} ({self.examples} examples)")

    def _check_batch(self, n: int, what: str) -> None:
        if self.batch_size > n:
            raise EpisodeError(f"batch_size = {self.batch_size} exceeds the {n} examples of a task on {what}")

    def __getstate__(self):
        return {**self.__dict__, "_data": None}  # reloaded from path in the receiving process (cached there)

    def _load(self):
        if self._data is not None:
            return self._data
        if self.source == "omniglot":
            store = TaskStore.open(self.path)
            self._data = (store, resolve_split(store, self.split, self.split_seed))
            return self._data
        x, y = cached_digits() if self.source == "digits" else load_mnist(self.path, self.split)
        rows = _example_part(len(y), self.examples, self.split_seed, self.source)
        self._data = (x, y) if rows is None else (x[rows], y[rows])
        return self._data

    def _drawings(self, n: int) -> range:
        """The drawings of an Omniglot class of ``n`` images that ``examples`` keeps (drawer order)."""
        cut = n - int(n * HELDOUT_FRACTION)
        return {"all": range(n), "train": range(cut), "heldout": range(cut, n)}[self.examples]

    def episode(self, step: int, slot: int) -> MLPTask:
        """The engine's name for :meth:`task` (every sampler a worker holds answers ``episode(step, slot)``)."""
        return self.task(step, slot)

    def task(self, step: int, slot: int) -> MLPTask:
        key = (int(self.seed), int(step), int(slot))
        rng = episode_rng(self.seed, self.class_stream, step, slot)  # validates step and slot too
        if self.source != "omniglot":
            x, y = self._load()
            classes = torch.arange(10)
        else:
            store, pool = self._load()
            classes = torch.from_numpy(pool[rng.choice(len(pool), self.ways, replace=False)])
            per = [self._drawings(int(store.class_sizes[c])) for c in classes]
            rows = torch.cat([int(store.class_offsets[c]) + torch.tensor(list(d)) for c, d in zip(classes, per)])
            y = torch.arange(self.ways).repeat_interleave(torch.tensor([len(d) for d in per]))
            img = unit_pixels(store.images[rows])
            if img.shape[-1] != self.image_size:
                img = F.adaptive_avg_pool2d(img, self.image_size)
            x = img.reshape(len(rows), -1)
        return MLPTask(x, y, 10 if self.source != "omniglot" else self.ways, self.hidden, self.activation,
                       self.batch_size, key, classes, self.streams)


# --------------------------------------------------------------------------------------------------------------
# Windows of trajectories (a learned optimizer updated after every truncation window, through a server)
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OptimizeeWindow:
    """Window ``window`` of the trajectory on ``task``: what one step of per-window training differentiates."""

    task: QuadraticTask | MLPTask
    window: int

    @property
    def key(self) -> tuple[int, int, int]:
        return self.task.key

    def to(self, device: torch.device | str) -> OptimizeeWindow:
        return OptimizeeWindow(self.task.to(device), self.window)


class WindowedSampler:
    """Consecutive steps walk the windows of one trajectory: step s is window ``s % windows`` of the optimizee
    ``sampler.task(s // windows, slot)``, so each trajectory is unrolled across ``windows`` steps."""

    def __init__(self, sampler: QuadraticSampler | MLPSampler, windows: int):
        self.sampler, self.windows = sampler, _positive_int("windows", windows)
        self.seed = sampler.seed

    def episode(self, step: int, slot: int) -> OptimizeeWindow:
        return OptimizeeWindow(self.sampler.task(step // self.windows, slot), step % self.windows)


# --------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------

_FAMILIES = {"quadratic": QuadraticSampler, "mlp": MLPSampler}


def make_optimizee_sampler(family: str, *, seed: int, **options) -> QuadraticSampler | MLPSampler:
    """The sampler of optimizee ``family`` (one of ``OPTIMIZEE_FAMILIES``) with its ``options``; EpisodeError naming
    an unknown family or option."""
    if family not in _FAMILIES:
        raise EpisodeError(f"unknown optimizee family {family!r}{did_you_mean(family, OPTIMIZEE_FAMILIES)}; known "
                           f"families: {', '.join(OPTIMIZEE_FAMILIES)}")
    cls = _FAMILIES[family]
    known = [p for p in inspect.signature(cls).parameters if p != "seed"]
    for name in options:
        if name not in known:
            raise EpisodeError(f"optimizee family {family!r} has no option {name!r}{did_you_mean(name, known)}; "
                               f"its options: {', '.join(known)}")
    return cls(seed=seed, **options)
