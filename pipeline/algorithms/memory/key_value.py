"""Few-shot learning with Kaiser et al.'s key-value memory module (models/memory_module.py) on a conv encoder.

Per episode the memory starts empty; the encoder embeds support and query images together (batch norm on the
episode's statistics, as for MAML), the support (key, label) pairs are written in order with the module's update
rule, and every query is scored with the memory loss and predicted as the value of its nearest slot. The memory is
state, rebuilt for each episode; the meta-gradient is the gradient of the mean query memory loss with respect to the
encoder, which the parameter server applies like any other. Ties among the oldest slots are drawn from a generator
seeded by the episode key, so an episode's result is a pure function of (seed, step, slot) like everything else.

    >>> from metatrain.models import KeyEncoder
    >>> from metatrain.pipeline.algorithms import AlgorithmConfig, memory
    >>> model, cfg = KeyEncoder(key_size=128), AlgorithmConfig(name="memory", memory_size=128)
    >>> grads, metrics = memory.meta_gradient(params, episode, cfg, model)     # metrics["query_acc"]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from metatrain.models.memory_module import KeyEncoder, Memory
from metatrain.tasks.episode import Episode
from torch import nn
from torch.func import functional_call

from metatrain.pipeline.algorithms.config import AlgorithmConfig
from metatrain.pipeline.algorithms.errors import AlgorithmConfigError, TaskMismatchError
from metatrain.pipeline.algorithms.gradient.inner_loop import Key, Metrics, Params, check_finite, leaves
from metatrain.pipeline.algorithms.metric.embedding import _Where, unstack
from metatrain.pipeline.algorithms.record import AlgorithmRecord

if TYPE_CHECKING:
    from metatrain.pipeline.config import Config


def build_network(cfg: Config, shape: tuple[int, int, int]) -> KeyEncoder:
    """The key encoder (``model.name`` key_encoder): the Conv4 trunk and a linear map to ``model.key_size``."""
    m, (channels, height, _) = cfg.model, shape
    return KeyEncoder(m.key_size, in_channels=channels, hidden=m.hidden, image_size=height, pool=m.pool)


RECORD = AlgorithmRecord(name="memory", family="memory", models=("key_encoder",), predict="memory",
                         adapts_weights=False, eval_ways_free=True, builder=build_network)
NAME = RECORD.name


def init_extra_params(model: nn.Module, cfg: AlgorithmConfig) -> Params:  # noqa: ARG001 - uniform interface
    """The memory is state, not a parameter: nothing beyond the encoder's weights."""
    return {}


def _generator(key: Key) -> torch.Generator:
    seed, step, slot = (int(k) for k in key)
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_000_033 + slot + 0x5EED)


def _run(params: Params, episode: Episode, cfg: AlgorithmConfig, model: nn.Module):
    """(per-query loss, predictions, memory) for one episode."""
    if getattr(model, "task", None) != "memory":
        raise AlgorithmConfigError(f"name: memory needs a KeyEncoder model, got {type(model).__name__}")
    if not isinstance(episode, Episode) or episode.support_y.dim() != 1:
        raise TaskMismatchError("memory: needs one few-shot Episode at a time (support_y of shape (n,))")
    for field, y in (("support_y", episode.support_y), ("query_y", episode.query_y)):
        if y.dtype != torch.long:
            raise TaskMismatchError(f"{field}: labels must be int64, got {y.dtype}")
    n_support = episode.support_x.shape[0]
    if n_support > cfg.memory_size:
        raise AlgorithmConfigError(f"memory_size: {cfg.memory_size} slots cannot hold the episode's {n_support} "
                                   f"support examples")
    keys = functional_call(model, params, (torch.cat([episode.support_x, episode.query_x]),))
    support, query = keys[:n_support], keys[n_support:]
    mem = Memory.empty(cfg.memory_size, keys.shape[1], device=keys.device)
    mem = mem.write_all(support.detach(), episode.support_y, _generator(episode.key))
    loss = mem.loss(query, episode.query_y, k=cfg.memory_k, margin=cfg.memory_margin)
    return loss, mem.predict(query.detach()), mem


def meta_gradient(params: Params, episode: Episode, cfg: AlgorithmConfig, model: nn.Module
                  ) -> tuple[Params, Metrics]:
    """Gradient of the mean query memory loss with respect to the encoder, plus metrics."""
    params = leaves(params)
    loss, pred, _ = _run(params, episode, cfg, model)
    names = list(params)
    grads = torch.autograd.grad(loss.mean(), [params[k] for k in names], allow_unused=True)
    grads = [torch.zeros_like(params[k]) if g is None else g for k, g in zip(names, grads)]
    if cfg.check_finite:
        check_finite(NAME, "the memory loss", names, grads, _Where(episode.key), per_task=False)
    return dict(zip(names, grads)), {"query_loss": float(loss.detach().mean()),
                                     "query_acc": float((pred == episode.query_y).float().mean())}


def meta_gradient_batched(params: Params, stacked: Episode, cfg: AlgorithmConfig, model: nn.Module,
                          keys: Sequence[Key] | None = None) -> tuple[Params, Metrics]:
    """A stack of episodes, one at a time (each memory is written in order): grads summed, metrics averaged."""
    total, sums = None, {}
    episodes = unstack(stacked, keys)
    for ep in episodes:
        grads, metrics = meta_gradient(params, ep, cfg, model)
        total = grads if total is None else {k: total[k] + g for k, g in grads.items()}
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v / len(episodes)
    return total, sums


def adapt(params: Params, support, cfg: AlgorithmConfig, model: nn.Module, **kwargs) -> Params:  # noqa: ARG001
    """The memory, not the weights, adapts to a task: the parameters are unchanged."""
    return dict(params)


def evaluate(params: Params, episode: Episode, cfg: AlgorithmConfig, model: nn.Module, *,
             steps: int | None = None, batched: bool = False, keys: Sequence[Key] | None = None  # noqa: ARG001
             ) -> Metrics:
    """Write the support set, predict every query from its nearest slot: loss and accuracy (averaged if stacked)."""
    episodes = unstack(episode, keys) if batched else [episode]
    sums: dict[str, float] = {}
    with torch.no_grad():
        for ep in episodes:
            loss, pred, _ = _run({k: v.detach() for k, v in params.items()}, ep, cfg, model)
            for k, v in (("query_loss", float(loss.mean())), ("query_acc", float((pred == ep.query_y).float().mean()))):
                sums[k] = sums.get(k, 0.0) + v / len(episodes)
    return sums
