"""Relation Networks (Sung et al. 2018): a learned similarity between a query and each class.

Feature maps of the support images of a class are summed (K-shot) into one map per class; each (query, class) pair of
maps is concatenated along channels and scored by the relation module, r in [0, 1]; loss = MSE against 1[y = c].

    >>> grads, metrics = relation.meta_gradient(params, episode, AlgorithmConfig(name="relation"), RelationNetwork())
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.algorithms.config import AlgorithmConfig
from pipeline.algorithms.embedding import call, check_episode, embed_episode, interface
from pipeline.algorithms.inner_loop import Params
from tasks.episode import Episode

NAME = "relation"


def scores(params: Params, episode: Episode, cfg: AlgorithmConfig, model: nn.Module  # noqa: ARG001
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(MSE of the relation scores against the one-hot labels, relation scores ``(queries, ways)``)."""
    ways = check_episode(NAME, model, episode)
    support, query = embed_episode(model, params, episode)  # (n, C, h, w), (m, C, h, w)
    onehot = F.one_hot(episode.support_y, ways).to(support.dtype)
    classes = torch.einsum("nc,nkhw->ckhw", onehot, support)  # per-class sum of the support maps
    m = query.shape[0]
    pairs = torch.cat([classes.unsqueeze(0).expand(m, *classes.shape),
                       query.unsqueeze(1).expand(m, ways, *query.shape[1:])], dim=2)
    relations = call(model, params, "relate", pairs.flatten(0, 1)).view(m, ways)
    target = F.one_hot(episode.query_y, ways).to(relations.dtype)
    return F.mse_loss(relations, target), relations


init_extra_params, adapt, meta_gradient, meta_gradient_batched, evaluate = interface(NAME, scores)
