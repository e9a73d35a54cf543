"""Relation Networks (Sung et al. 2018): a learned similarity between a query and each class.

Feature maps of the support images of a class are averaged (K-shot) into one map per class; each (query, class) pair
of maps is concatenated along channels and scored by the relation module, r in [0, 1]; loss = MSE against 1[y = c].

The paper sums the K maps and trains one model per K. The mean is the same at 1-shot and keeps a class map's scale
independent of K, so that a model trained 1-shot can be tested 5-shot: with the sum, a 40-minute 5w1s model scored
61.06% at 5w5s and 28.49% at 20w5s (its maps five times larger than any it was trained on) against 97.76% at 5w1s.

    >>> grads, metrics = relation.meta_gradient(params, episode, AlgorithmConfig(name="relation"), RelationNetwork())
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from metatrain.models.metric import RelationNetwork
from metatrain.tasks.episode import Episode
from torch import nn

from metatrain.pipeline.algorithms.config import AlgorithmConfig
from metatrain.pipeline.algorithms.gradient.inner_loop import Params
from metatrain.pipeline.algorithms.metric.embedding import call, check_episode, embed_episode, interface
from metatrain.pipeline.algorithms.record import AlgorithmRecord

if TYPE_CHECKING:
    from metatrain.pipeline.config import Config


def build_network(cfg: Config, shape: tuple[int, int, int]) -> RelationNetwork:
    """The relation network: Conv4 feature maps and a relation module ``model.relation_hidden`` wide."""
    m, (channels, height, _) = cfg.model, shape
    return RelationNetwork(channels, hidden=m.hidden, image_size=height, relation_hidden=m.relation_hidden)


RECORD = AlgorithmRecord(name="relation", family="metric", models=("relation",), predict="probability",
                         adapts_weights=False, eval_ways_free=True, builder=build_network)
NAME = RECORD.name


def scores(params: Params, episode: Episode, cfg: AlgorithmConfig, model: nn.Module  # noqa: ARG001
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(MSE of the relation scores against the one-hot labels, relation scores ``(queries, ways)``)."""
    ways = check_episode(NAME, model, episode)
    support, query = embed_episode(model, params, episode)  # (n, C, h, w), (m, C, h, w)
    onehot = F.one_hot(episode.support_y, ways).to(support.dtype)
    classes = torch.einsum("nc,nkhw->ckhw", onehot / onehot.sum(0), support)  # per-class mean of the support maps
    m = query.shape[0]
    pairs = torch.cat([classes.unsqueeze(0).expand(m, *classes.shape),
                       query.unsqueeze(1).expand(m, ways, *query.shape[1:])], dim=2)
    relations = call(model, params, "relate", pairs.flatten(0, 1)).view(m, ways)
    target = F.one_hot(episode.query_y, ways).to(relations.dtype)
    return F.mse_loss(relations, target), relations


init_extra_params, adapt, meta_gradient, meta_gradient_batched, evaluate = interface(NAME, scores)
