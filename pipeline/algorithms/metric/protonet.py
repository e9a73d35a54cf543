"""Prototypical Networks (Snell et al. 2017): classify a query by its distance to each class's mean embedding.

v_c = mean of f(x) over the support of class c; P(y = c | x) = softmax_c(-d(f(x), v_c)) with d the squared Euclidean
distance (``algorithm.distance: cosine`` uses -cos instead, scaled by ``algorithm.cosine_scale``); loss = NLL of the
queries. Training may use more ways than testing (the paper trained 60-way: ``data.ways: 60``, ``data.eval_ways: 5``).

    >>> from metatrain.pipeline.algorithms import AlgorithmConfig, protonet
    >>> grads, metrics = protonet.meta_gradient(params, episode, AlgorithmConfig(name="protonet"), Conv4Embedding())
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from metatrain.models.metric import Conv4Embedding, cosine, prototypes, squared_euclidean
from metatrain.tasks.episode import Episode
from torch import nn

from metatrain.pipeline.algorithms.config import AlgorithmConfig
from metatrain.pipeline.algorithms.gradient.inner_loop import Params
from metatrain.pipeline.algorithms.metric.embedding import check_episode, embed_episode, interface
from metatrain.pipeline.algorithms.record import AlgorithmRecord

if TYPE_CHECKING:
    from metatrain.pipeline.config import Config


def build_network(cfg: Config, shape: tuple[int, int, int]) -> Conv4Embedding:
    """The Conv4 embedding (``model.name`` embedding): Conv4 without its classifier head."""
    m, (channels, height, _) = cfg.model, shape
    return Conv4Embedding(channels, hidden=m.hidden, image_size=height, pool=m.pool)


RECORD = AlgorithmRecord(name="protonet", family="metric", models=("embedding",), predict="softmax",
                         adapts_weights=False, eval_ways_free=True, trains_on_more_ways=True, builder=build_network)
NAME = RECORD.name


def scores(params: Params, episode: Episode, cfg: AlgorithmConfig, model: nn.Module
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(NLL of the queries, logits = negative distances to the prototypes ``(queries, ways)``)."""
    ways = check_episode(NAME, model, episode)
    support, query = embed_episode(model, params, episode)
    protos = prototypes(support, episode.support_y, ways)
    if cfg.distance == "cosine":
        logits = cfg.cosine_scale * cosine(query, protos)
    else:
        logits = -squared_euclidean(query, protos)
    return F.cross_entropy(logits, episode.query_y), logits


init_extra_params, adapt, meta_gradient, meta_gradient_batched, evaluate = interface(NAME, scores)
