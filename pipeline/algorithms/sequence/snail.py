"""SNAIL (Mishra et al. 2018): the support set read as a sequence, each query scored at its sequence's last step.

Each query's sequence is ``[(e(s_1), y_1), ..., (e(s_n), y_n), (e(q), 0)]`` (support in label order, the query's
label zeroed, last); the loss is the cross-entropy at that last step, averaged over the episode's queries (the paper
has one query per episode; here each episode carries ``data.queries`` per class, all sharing one support prefix:
models/snail.py). There is no inner loop: the meta-gradient is the plain gradient of that loss, applied by the
parameter server like any other contribution. The network is built for N ways and K shots (``T = N*K + 1``), so an
episode of other ways, or a support longer than ``N*K``, is refused with one line.

    >>> from metatrain.models.snail import SNAIL
    >>> from metatrain.pipeline.algorithms import AlgorithmConfig
    >>> from metatrain.pipeline.algorithms.sequence import snail
    >>> grads, metrics = snail.meta_gradient(params, episode, AlgorithmConfig(name="snail"), SNAIL(ways=5, shots=1))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from metatrain.models.snail import SNAIL, SNAIL_TASK
from metatrain.tasks.episode import Episode
from torch import nn

from metatrain.pipeline.algorithms.config import AlgorithmConfig
from metatrain.pipeline.algorithms.errors import AlgorithmConfigError, TaskMismatchError
from metatrain.pipeline.algorithms.gradient.inner_loop import Key, Metrics, Params, check_finite, leaves
from metatrain.pipeline.algorithms.metric.embedding import call, interface
from metatrain.pipeline.algorithms.record import AlgorithmRecord

if TYPE_CHECKING:
    from metatrain.pipeline.config import Config


def build_network(cfg: Config, shape: tuple[int, int, int]) -> SNAIL:
    """SNAIL for ``data.ways``-way ``data.shots``-shot episodes, Conv4 embedding of ``model.hidden`` filters."""
    m, (channels, height, _) = cfg.model, shape
    return SNAIL(cfg.data.ways, cfg.data.shots, in_channels=channels, hidden=m.hidden, image_size=height, pool=m.pool)


#: auto_batched: a worker's episodes go through the sequence body as one batch even on the CPU: its ~20 small layers
#: (attention and dense blocks on a few dozen positions) cost Python and dispatch time that B episodes pay once.
#: predict "softmax": predict calls :func:`scores` on the user's support and queries (reading the support as the
#: prefix) and takes the softmax of the last-step logits. shape_fields: ``data.shots`` fixes T, so ``eval --set
#: data.shots=...`` on a checkpoint built for fewer shots is refused (the fingerprint differs) even where the
#: number of dense blocks, ceil(log2 T), happens to be the same.
RECORD = AlgorithmRecord(name="snail", family="sequence", models=("snail",), predict="softmax",
                         adapts_weights=False, auto_batched=True, shape_fields=("data.shots",),
                         builder=build_network)
NAME = RECORD.name


def check_episode(model: nn.Module, episode: Episode) -> None:
    """One or a stack of episodes whose ways and sequence length fit the model (the refusals name the field)."""
    if getattr(model, "task", None) != SNAIL_TASK:
        raise AlgorithmConfigError(f"name: snail needs the SNAIL model, got {type(model).__name__}")
    if not isinstance(episode, Episode):
        raise TaskMismatchError(f"snail needs support/query Episodes (EpisodeSampler), got {type(episode).__name__}")
    for field, y in (("support_y", episode.support_y), ("query_y", episode.query_y)):
        if y.dtype != torch.long:
            raise TaskMismatchError(f"{field}: labels must be int64, got {y.dtype}")
    ways = int(episode.support_y.max()) + 1
    if ways != model.ways or int(episode.support_y.min()) < 0:
        raise TaskMismatchError(f"data.ways: this SNAIL model was built for {model.ways}-way episodes (its one-hot "
                                f"labels and head), got {ways} ways")
    if int(episode.query_y.max()) >= ways or int(episode.query_y.min()) < 0:
        raise TaskMismatchError(f"query_y: every query label needs support examples (labels 0..{ways - 1})")
    steps = episode.support_y.shape[-1] + 1
    if steps > model.seq_len:
        raise TaskMismatchError(f"data.shots: {episode.support_y.shape[-1]} support images + the query = {steps} "
                                f"steps exceed this SNAIL model's T = {model.seq_len} ({model.ways} ways x "
                                f"{model.shots} shots + 1)")


def _label_order(support_y: torch.Tensor) -> torch.Tensor:
    """The support in label order (stable), as the sampler draws it: a user's support may come in any order."""
    return torch.sort(support_y, dim=-1, stable=True).indices


def scores(params: Params, episode: Episode, cfg: AlgorithmConfig, model: nn.Module  # noqa: ARG001
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean last-step cross-entropy of the queries, their logits ``(queries, ways)``) for one episode."""
    check_episode(model, episode)
    order = _label_order(episode.support_y)
    logits = call(model, params, "episode_logits", episode.support_x[order], episode.support_y[order],
                  episode.query_x)
    return F.cross_entropy(logits, episode.query_y), logits


def batched_scores(params: Params, stacked: Episode, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A stack of B episodes: (per-episode mean losses ``(B,)``, logits ``(B, m, ways)``). Each episode is embedded
    on its own (batch norm on its own support's statistics; one episode's images at a time stay in cache: the 32
    episodes of a 5w1s15q step vmapped as one stack ran at 0.38x the per-episode loop, bench/throughput.py), then
    the sequence body runs once for all."""
    check_episode(model, stacked)
    order = _label_order(stacked.support_y)
    sx = torch.take_along_dim(stacked.support_x, order.view(*order.shape, 1, 1, 1), dim=1)
    sy = torch.take_along_dim(stacked.support_y, order, dim=1)
    n = sx.shape[1]
    feats = torch.stack([call(model, params, "forward", torch.cat([s, q]), stats_rows=n)
                         for s, q in zip(sx, stacked.query_x)])
    logits = call(model, params, "sequence_logits", feats[:, :n], sy, feats[:, n:])
    losses = F.cross_entropy(logits.transpose(1, 2), stacked.query_y, reduction="none").mean(1)
    return losses, logits


def _metrics(losses: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> Metrics:
    with torch.no_grad():
        return {"query_loss": float(losses.mean()), "query_acc": float((logits.argmax(-1) == y).float().mean())}


def meta_gradient_batched(params: Params, stacked: Episode, cfg: AlgorithmConfig, model: nn.Module,
                          keys: Sequence[Key] | None = None) -> tuple[Params, Metrics]:
    """A stack of episodes in one body pass: gradients SUMMED over the episodes, metrics averaged."""
    params = leaves(params)
    losses, logits = batched_scores(params, stacked, model)
    names = list(params)
    grads = torch.autograd.grad(losses.sum(), [params[k] for k in names], allow_unused=True)
    grads = [torch.zeros_like(params[k]) if g is None else g for k, g in zip(names, grads)]
    if cfg.check_finite:
        check_finite(NAME, "the last-step loss", names, grads, _Where(keys or [stacked.key]), per_task=False)
    return dict(zip(names, grads)), _metrics(losses, logits, stacked.query_y)


def evaluate(params: Params, episode: Episode, cfg: AlgorithmConfig, model: nn.Module, *,
             steps: int | None = None, batched: bool = False, keys: Sequence[Key] | None = None  # noqa: ARG001
             ) -> Metrics:
    """Loss and accuracy of the queries, no gradient (a stack in one pass when ``batched``)."""
    if not batched:
        return _evaluate_one(params, episode, cfg, model)
    with torch.no_grad():
        losses, logits = batched_scores({k: v.detach() for k, v in params.items()}, episode, model)
        return _metrics(losses, logits, episode.query_y)


class _Where:
    """What check_finite needs to name the episode(s) in its error."""

    def __init__(self, keys: Sequence[Key]):
        self.keys = tuple(tuple(k) for k in keys)
        self.batched = len(self.keys) > 1


# One episode at a time is exactly a metric learner's (the gradient of ``scores``'s loss, no inner loop); a stack
# of episodes is this module's own (one pass through the sequence body).
init_extra_params, adapt, meta_gradient, _, _evaluate_one = interface(NAME, scores)
