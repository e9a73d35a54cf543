"""What the metric-based learners share: the meta-gradient is the gradient of an episode loss on embeddings.

A metric learner (``protonet``, ``matching``, ``relation``, ``siamese``) defines one function,
``scores(params, episode, cfg, model) -> (loss, scores)``: the episode's loss (differentiable in ``params``) and a
``(queries, ways)`` score per query and class whose argmax is the prediction. :func:`episode_gradient` turns it into
the ``meta_gradient`` every algorithm exposes; :func:`episode_metrics` into ``evaluate``. There is no inner loop:
``adapt`` returns the parameters unchanged, and "adapting" to a task is embedding its support set.

:func:`call` runs any method of a model functionally on a parameter dict (``torch.func.functional_call`` runs only
``forward``), so a model's episode-level parts (FCE LSTMs, the relation module) need no hidden state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from metatrain.tasks.episode import Episode
from torch import nn
from torch.func import functional_call

from metatrain.pipeline.algorithms.config import AlgorithmConfig
from metatrain.pipeline.algorithms.errors import AlgorithmConfigError, TaskMismatchError
from metatrain.pipeline.algorithms.gradient.inner_loop import Key, Metrics, Params, check_finite, leaves

Scores = Callable[[Params, Episode, AlgorithmConfig, nn.Module], tuple[torch.Tensor, torch.Tensor]]


class _Method(nn.Module):
    """Wraps ``module`` so that calling this wrapper calls ``module.<name>``; functional_call then swaps the
    parameters of ``module`` (registered here as ``m``) for the duration of that one call."""

    def __init__(self, module: nn.Module, name: str):
        super().__init__()
        self.m, self.name = module, name

    def forward(self, *args, **kwargs):
        return getattr(self.m, self.name)(*args, **kwargs)


def call(model: nn.Module, params: Params, method: str, *args, **kwargs):
    """``model.<method>(*args, **kwargs)`` computed with ``params`` in place of the model's own parameters."""
    if method == "forward":
        return functional_call(model, params, args, kwargs)
    return functional_call(_Method(model, method), {f"m.{k}": v for k, v in params.items()}, args, kwargs)


def check_episode(name: str, model: nn.Module, episode: Episode) -> int:
    """The episode's ways, after checking it is one few-shot episode with int64 labels the model can take."""
    if getattr(model, "task", None) != "embedding":
        raise AlgorithmConfigError(f"name: {name} needs its embedding model, got {type(model).__name__}")
    if not isinstance(episode, Episode) or episode.support_y.dim() != 1:
        raise TaskMismatchError(f"{name}: needs one few-shot Episode at a time (support_y of shape (n,))")
    for field, y in (("support_y", episode.support_y), ("query_y", episode.query_y)):
        if y.dtype != torch.long:
            raise TaskMismatchError(f"{field}: labels must be int64, got {y.dtype}")
    ways = int(episode.support_y.max()) + 1
    if int(episode.query_y.max()) >= ways or int(episode.query_y.min()) < 0 or int(episode.support_y.min()) < 0:
        raise TaskMismatchError(f"query_y: every query label needs support examples (labels 0..{ways - 1})")
    return ways


def embed_episode(model: nn.Module, params: Params, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
    """(support, query) embeddings, from one forward pass over both (batch norm on the episode's statistics)."""
    n = episode.support_x.shape[0]
    out = call(model, params, "forward", torch.cat([episode.support_x, episode.query_x]))
    return out[:n], out[n:]


def _metrics(loss: torch.Tensor, scores: torch.Tensor, y: torch.Tensor) -> Metrics:
    with torch.no_grad():
        return {"query_loss": float(loss.detach()), "query_acc": float((scores.argmax(-1) == y).float().mean())}


def episode_gradient(name: str, scores: Scores, params: Params, episode: Episode, cfg: AlgorithmConfig,
                     model: nn.Module) -> tuple[Params, Metrics]:
    """Gradient of the episode loss with respect to every parameter (zeros where unused), plus metrics."""
    params = leaves(params)
    loss, s = scores(params, episode, cfg, model)
    names = list(params)
    grads = torch.autograd.grad(loss, [params[k] for k in names], allow_unused=True)
    grads = [torch.zeros_like(params[k]) if g is None else g for k, g in zip(names, grads)]
    if cfg.check_finite:
        check_finite(name, "the episode loss", names, grads, _Where(episode.key), per_task=False)
    return dict(zip(names, grads)), _metrics(loss, s, episode.query_y)


def unstack(stacked: Episode, keys: Sequence[Key] | None) -> list[Episode]:
    """The episodes of a stack (the batched path runs them one by one: each has its own prototypes/memory)."""
    return [Episode(stacked.support_x[t], stacked.support_y[t], stacked.query_x[t], stacked.query_y[t],
                    stacked.classes[t], stacked.rotations[t], tuple(keys[t]) if keys else (-1, -1, t),
                    pairs=stacked.pairs)
            for t in range(stacked.support_x.shape[0])]


def batched_gradient(name: str, scores: Scores, params: Params, stacked: Episode, cfg: AlgorithmConfig,
                     model: nn.Module, keys: Sequence[Key] | None) -> tuple[Params, Metrics]:
    """A stack of episodes: gradients SUMMED over them, metrics averaged."""
    total, sums = None, {}
    episodes = unstack(stacked, keys)
    for ep in episodes:
        grads, metrics = episode_gradient(name, scores, params, ep, cfg, model)
        total = grads if total is None else {k: total[k] + g for k, g in grads.items()}
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v / len(episodes)
    return total, sums


def episode_metrics(scores: Scores, params: Params, episode: Episode, cfg: AlgorithmConfig, model: nn.Module,
                    batched: bool = False, keys: Sequence[Key] | None = None) -> Metrics:
    """Loss and accuracy on the query set (averaged over a stack when ``batched``), no gradient."""
    episodes = unstack(episode, keys) if batched else [episode]
    sums: dict[str, float] = {}
    with torch.no_grad():
        detached = {k: v.detach() for k, v in params.items()}
        for ep in episodes:
            loss, s = scores(detached, ep, cfg, model)
            for k, v in _metrics(loss, s, ep.query_y).items():
                sums[k] = sums.get(k, 0.0) + v / len(episodes)
    return sums


class _Where:
    """What check_finite needs to name the episode in its error."""

    def __init__(self, key: Key):
        self.keys, self.batched = (tuple(key),), False


def interface(name: str, scores: Scores):
    """The uniform algorithm functions for a metric learner defined by ``scores``:
    ``(init_extra_params, adapt, meta_gradient, meta_gradient_batched, evaluate)``."""

    def init_extra_params(model: nn.Module, cfg: AlgorithmConfig) -> Params:  # noqa: ARG001
        return {}  # the embedding (and similarity) networks' own weights are everything

    def adapt(params: Params, support, cfg: AlgorithmConfig, model: nn.Module, **kwargs) -> Params:  # noqa: ARG001
        return dict(params)  # no inner loop: a task is "learned" by embedding its support set

    def meta_gradient(params: Params, episode: Episode, cfg: AlgorithmConfig, model: nn.Module):
        return episode_gradient(name, scores, params, episode, cfg, model)

    def meta_gradient_batched(params: Params, stacked: Episode, cfg: AlgorithmConfig, model: nn.Module,
                              keys: Sequence[Key] | None = None):
        return batched_gradient(name, scores, params, stacked, cfg, model, keys)

    def evaluate(params: Params, episode: Episode, cfg: AlgorithmConfig, model: nn.Module, *,
                 steps: int | None = None, batched: bool = False, keys: Sequence[Key] | None = None) -> Metrics:  # noqa: ARG001
        return episode_metrics(scores, params, episode, cfg, model, batched, keys)

    return init_extra_params, adapt, meta_gradient, meta_gradient_batched, evaluate
