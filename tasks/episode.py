"""One few-shot task, as every sampler returns it and every algorithm consumes it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Episode:
    """A support/query split of one task; the key (seed, step, slot) rebuilds it bit for bit.

    Classification: ``support_x`` is ``(ways*shots, C, H, W)`` float32 in [0, 1], ``support_y`` is int64 labels
    ``0..ways-1`` (grouped by class, class order random per episode); ``query_*`` likewise with ``queries`` per
    class. Regression (sinusoids): ``*_x`` is ``(n, 1)`` and ``*_y`` is ``(n, 1)`` float32.
    ``classes`` holds the store's class ids behind labels ``0..ways-1`` (empty for regression), ``rotations`` the
    quarter turns applied to each class, ``task_params`` what defines a regression task (sinusoids: amplitude,
    phase). A stacked batch of episodes has one more leading dimension everywhere.

    ``pairs``: a verification task (Koch et al.) instead: ``support_x[i]`` and ``query_x[i]`` are pair ``i``,
    ``support_y == query_y`` is 1 where the two show one class, ``classes``/``rotations`` are ``(pairs, 2)``.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: torch.Tensor
    rotations: torch.Tensor
    key: tuple[int, int, int]
    task_params: torch.Tensor | None = None
    pairs: bool = False

    @property
    def ways(self) -> int:
        return int(self.classes.shape[-1])

    def to(self, device: torch.device | str) -> Episode:
        """The same episode with its tensors on ``device`` (non-blocking where the source is pinned)."""
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Episode(move(self.support_x), move(self.support_y), move(self.query_x), move(self.query_y),
                       self.classes, self.rotations, self.key, self.task_params, self.pairs)


def stack_episodes(episodes: list[Episode]) -> Episode:
    """Stack same-shaped episodes along a new leading task dimension (for the batched/vmap path)."""
    if not episodes:
        raise ValueError("stack_episodes needs at least one episode")
    shapes = {(e.support_x.shape, e.query_x.shape, e.pairs) for e in episodes}
    if len(shapes) != 1:
        raise ValueError(f"stack_episodes needs same-shaped episodes of one kind, got {sorted(map(str, shapes))}")
    return Episode(
        torch.stack([e.support_x for e in episodes]),
        torch.stack([e.support_y for e in episodes]),
        torch.stack([e.query_x for e in episodes]),
        torch.stack([e.query_y for e in episodes]),
        torch.stack([e.classes for e in episodes]),
        torch.stack([e.rotations for e in episodes]),
        (-1, -1, -1),
        None if episodes[0].task_params is None else torch.stack([e.task_params for e in episodes]),
        episodes[0].pairs,
    )


@dataclass(frozen=True)
class SequenceEpisode:
    """A Santoro et al. (2016) episode for memory models: one shuffled sequence of ``classes x instances`` images.

    At step ``t`` the model sees ``x[t]`` together with ``prev_label[t]``, the one-hot label of step ``t-1`` (zeros at
    ``t = 0``), and must predict ``y[t]``. ``instance[t]`` counts how many times ``y[t]``'s class has been shown up to
    and including ``t`` (1 = first sight), so accuracy can be reported per instance as in the paper.
    """

    x: torch.Tensor
    """``(T, C, H, W)`` float32 images, ``T = classes * instances``."""
    y: torch.Tensor
    """``(T,)`` int64 labels ``0..classes-1`` (label order random per episode)."""
    prev_label: torch.Tensor
    """``(T, classes)`` float32: one-hot ``y[t-1]``; row 0 is zeros."""
    instance: torch.Tensor
    """``(T,)`` int64, 1-based occurrence count of ``y[t]``'s class."""
    classes: torch.Tensor
    """``(classes,)`` store class ids behind labels ``0..classes-1``."""
    rotations: torch.Tensor
    """``(classes,)`` quarter turns applied to each class."""
    key: tuple[int, int, int]
    """(seed, step, slot) that rebuilds the episode."""

    @property
    def ways(self) -> int:
        return int(self.classes.shape[-1])

    def to(self, device: torch.device | str) -> SequenceEpisode:
        """The same episode with its tensors on ``device``."""
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return SequenceEpisode(move(self.x), move(self.y), move(self.prev_label), move(self.instance), self.classes,
                               self.rotations, self.key)


def stack_sequence_episodes(episodes: list[SequenceEpisode]) -> SequenceEpisode:
    """Stack same-shaped sequence episodes along a new leading dimension (B episodes processed at once)."""
    if not episodes:
        raise ValueError("stack_sequence_episodes needs at least one episode")
    shapes = {(e.x.shape, e.prev_label.shape) for e in episodes}
    if len(shapes) != 1:
        raise ValueError(f"stack_sequence_episodes needs same-shaped episodes, got {sorted(map(str, shapes))}")
    stack = lambda name: torch.stack([getattr(e, name) for e in episodes])  # noqa: E731
    return SequenceEpisode(stack("x"), stack("y"), stack("prev_label"), stack("instance"), stack("classes"),
                           stack("rotations"), (-1, -1, -1))
