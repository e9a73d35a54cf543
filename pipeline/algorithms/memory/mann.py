"""Sequence meta-learning for memory-augmented networks (Santoro et al. 2016): MANN, or its LSTM baseline.

There is no inner loop: the network adapts by writing to its memory as it reads the episode, and the meta-gradient
is the plain gradient of the cross-entropy at every step of the sequence, averaged over the steps. The parameter
server applies it like any other contribution. Metrics: ``query_loss``/``query_acc`` over all steps, and
``inst{k}_acc``, the accuracy at the k-th showing of a class (the paper's table: k = 1, 2, 3, 5, 10).

    >>> from metatrain.models import MANN
    >>> from metatrain.pipeline.algorithms import AlgorithmConfig, mann
    >>> model, cfg = MANN(classes=5), AlgorithmConfig(name="mann")
    >>> grads, metrics = mann.meta_gradient(params, sequence_episode, cfg, model)
    >>> metrics["inst2_acc"]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from metatrain.models import MANN, SequenceLSTM, SequenceModel
from metatrain.tasks.episode import SequenceEpisode
from torch import nn
from torch.func import functional_call

from metatrain.pipeline.algorithms.config import AlgorithmConfig
from metatrain.pipeline.algorithms.errors import AlgorithmConfigError, TaskMismatchError
from metatrain.pipeline.algorithms.gradient.inner_loop import Key, Metrics, Params, check_finite, leaves
from metatrain.pipeline.algorithms.record import AlgorithmRecord

if TYPE_CHECKING:
    from metatrain.pipeline.config import Config


def build_network(cfg: Config, shape: tuple[int, int, int]) -> SequenceModel:
    """MANN (``model.name`` mann) or its memory-less LSTM baseline (lstm), reading each image flattened."""
    m, (channels, height, width) = cfg.model, shape
    if m.name == "lstm":
        return SequenceLSTM(cfg.data.ways, input_size=channels * height * width, hidden=m.controller)
    return MANN(cfg.data.ways, input_size=channels * height * width, controller=m.controller,
                memory_slots=m.memory_slots, memory_width=m.memory_width, read_heads=m.read_heads,
                gamma=m.lrua_gamma, key_strength=m.mann_key_strength, read_before_write=m.mann_read_first)


#: auto_batched: ``task_batching: auto`` runs a worker's episodes as one batch even on the CPU: the cost of a sequence
#: model is the Python loop over its steps, which a batch of B episodes pays once instead of B times.
RECORD = AlgorithmRecord(name="mann", family="memory", models=("mann", "lstm"), predict="sequence",
                         adapts_weights=False, auto_batched=True, sequence_episodes=True, builder=build_network)
NAME = RECORD.name


def init_extra_params(model: nn.Module, cfg: AlgorithmConfig) -> Params:  # noqa: ARG001 - uniform interface
    """Nothing beyond the network's parameters."""
    return {}


def _check(model: nn.Module, episode: SequenceEpisode) -> None:
    if getattr(model, "task", None) != "sequence":
        raise AlgorithmConfigError(f"name: mann needs a sequence model (MANN or SequenceLSTM), got "
                                   f"{type(model).__name__}")
    if not isinstance(episode, SequenceEpisode):
        raise TaskMismatchError(f"mann needs sequence episodes (SequenceEpisodeSampler), got {type(episode).__name__}")
    if episode.y.dtype != torch.long:
        raise TaskMismatchError(f"y: sequence labels must be int64, got {episode.y.dtype}")
    classes = model.out_features
    if episode.prev_label.shape[-1] != classes or int(episode.y.max()) >= classes or int(episode.y.min()) < 0:
        raise TaskMismatchError(f"episode {episode.key}: labels 0..{int(episode.y.max())} over "
                                f"{episode.prev_label.shape[-1]} classes do not fit the model's {classes} outputs")


def _forward(params: Params, episode: SequenceEpisode, model: nn.Module
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits ``(B, T, classes)``, labels ``(B, T)``, instance ``(B, T)``) for one or a stack of episodes."""
    _check(model, episode)
    x, prev, y, inst = episode.x, episode.prev_label, episode.y, episode.instance
    if y.dim() == 1:  # one episode: a batch of one
        x, prev, y, inst = x[None], prev[None], y[None], inst[None]
    logits = functional_call(model, params, (model.sequence_inputs(x, prev),))
    return logits, y, inst


def _metrics(logits: torch.Tensor, y: torch.Tensor, inst: torch.Tensor, loss: torch.Tensor) -> Metrics:
    """Loss, accuracy over all steps and per instance, averaged over the episodes of the batch."""
    with torch.no_grad():
        correct = (logits.argmax(-1) == y).float()
        m = {"query_loss": float(loss), "query_acc": float(correct.mean())}
        for k in range(1, int(inst.max()) + 1):
            at_k = inst == k
            # Per episode, then averaged: every episode has the same number of k-th showings (one per class).
            m[f"inst{k}_acc"] = float(((correct * at_k).sum(1) / at_k.sum(1).clamp(min=1)).mean())
    return m


def meta_gradient(params: Params, episode: SequenceEpisode, cfg: AlgorithmConfig, model: nn.Module,
                  keys: Sequence[Key] | None = None) -> tuple[Params, Metrics]:
    """Gradient of the mean per-step cross-entropy (mean over steps, summed over a stack of episodes)."""
    params = leaves(params)
    logits, y, inst = _forward(params, episode, model)
    # Mean over steps per episode, summed over episodes: the worker's sum over tasks (the PS divides by the count).
    per_episode = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)
    names = list(params)
    grads = torch.autograd.grad(per_episode.sum(), [params[k] for k in names], allow_unused=True)
    grads = [torch.zeros_like(params[k]) if g is None else g for k, g in zip(names, grads)]
    if cfg.check_finite:
        check_finite(NAME, "the sequence loss", names, grads, _Where(keys or [episode.key]), per_task=False)
    return dict(zip(names, grads)), _metrics(logits, y, inst, per_episode.mean())


def meta_gradient_batched(params: Params, stacked: SequenceEpisode, cfg: AlgorithmConfig, model: nn.Module,
                          keys: Sequence[Key] | None = None) -> tuple[Params, Metrics]:
    """A stack of episodes in one forward pass: gradients SUMMED over episodes, metrics averaged."""
    return meta_gradient(params, stacked, cfg, model, keys)


def adapt(params: Params, support, cfg: AlgorithmConfig, model: nn.Module, **kwargs) -> Params:  # noqa: ARG001
    """Memory models adapt inside their forward pass (by writing memory): the parameters are unchanged."""
    return dict(params)


def evaluate(params: Params, episode: SequenceEpisode, cfg: AlgorithmConfig, model: nn.Module, *,
             steps: int | None = None, batched: bool = False, keys: Sequence[Key] | None = None  # noqa: ARG001
             ) -> Metrics:
    """Loss and accuracies on the episode(s), no gradient."""
    with torch.no_grad():
        logits, y, inst = _forward({k: v.detach() for k, v in params.items()}, episode, model)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        return _metrics(logits, y, inst, loss)


class _Where:
    """What check_finite needs to name the episode in its error."""

    def __init__(self, keys: Sequence[Key]):
        self.keys = tuple(tuple(k) for k in keys)
        self.batched = len(self.keys) > 1
