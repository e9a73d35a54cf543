"""Matching Networks (Vinyals et al. 2016): attention over the labelled support set.

a(x, x_i) = softmax_i(s cos(f(x), g(x_i))); P(y | x) = sum_i a(x, x_i) y_i (one-hot y_i); loss = NLL of the queries.
s is ``algorithm.cosine_scale`` (default 10; the paper's equation is s = 1). Why scale: a cosine lies in [-1, 1], so
with s = 1 even a perfect 5-way 1-shot match (cosine 1, the others -1) gets at most e / (e + 4 e^-1) = 0.65 of the
attention, 0.40 with the others at 0. No query's loss can fall below -log 0.65 = 0.43, so the queries already right
never stop pulling on the embedding. ProtoNet's cosine option scales by the same field.
With ``model.fce: true``, g is a bidirectional LSTM over the support embeddings (plus a skip) and f an attention
LSTM with ``model.fce_read_steps`` reads of g(S) (see models/metric.py: MatchingNetwork).

    >>> grads, metrics = matching.meta_gradient(params, episode, AlgorithmConfig(name="matching"), MatchingNetwork())
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from metatrain.models.metric import MatchingNetwork, cosine
from metatrain.tasks.episode import Episode
from torch import nn

from metatrain.pipeline.algorithms.config import AlgorithmConfig
from metatrain.pipeline.algorithms.gradient.inner_loop import Params
from metatrain.pipeline.algorithms.metric.embedding import call, check_episode, embed_episode, interface
from metatrain.pipeline.algorithms.record import AlgorithmRecord

if TYPE_CHECKING:
    from metatrain.pipeline.config import Config


def build_network(cfg: Config, shape: tuple[int, int, int]) -> MatchingNetwork:
    """The matching network: the Conv4 embedding, with full-context embeddings if ``model.fce``."""
    m, (channels, height, _) = cfg.model, shape
    return MatchingNetwork(channels, hidden=m.hidden, image_size=height, fce=m.fce, read_steps=m.fce_read_steps)


RECORD = AlgorithmRecord(name="matching", family="metric", models=("matching",), predict="softmax",
                         adapts_weights=False, eval_ways_free=True, builder=build_network)
NAME = RECORD.name


def attention(query: torch.Tensor, support: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """a(x, x_i) = softmax_i(scale cos(f(x), g(x_i))): ``(queries, supports)``, rows summing to 1."""
    return torch.softmax(scale * cosine(query, support), dim=-1)


def scores(params: Params, episode: Episode, cfg: AlgorithmConfig, model: nn.Module
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(NLL of the queries, log P(y | x) ``(queries, ways)``)."""
    ways = check_episode(NAME, model, episode)
    support, query = embed_episode(model, params, episode)
    g = call(model, params, "context_support", support)
    f = call(model, params, "context_query", query, g)
    probs = attention(f, g, cfg.cosine_scale) @ F.one_hot(episode.support_y, ways).to(f.dtype)
    log_probs = probs.clamp(min=1e-12).log()
    return F.nll_loss(log_probs, episode.query_y), log_probs


init_extra_params, adapt, meta_gradient, meta_gradient_batched, evaluate = interface(NAME, scores)
