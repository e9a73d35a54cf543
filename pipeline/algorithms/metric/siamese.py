"""Siamese networks (Koch et al. 2015): verification training on pairs, one-shot prediction by the best match.

p(x_i, x_j) = sigmoid(w . |f(x_i) - f(x_j)| + b), symmetric in i and j. Every (query, support) pair of an episode is a
training pair with target 1[y_i = y_j]; positives are weighted by (negatives / positives) so both kinds count equally.
``algorithm.verification: true`` trains as Koch et al. did instead: on balanced same/different pairs drawn within
and across alphabets (tasks/samplers.py ``PairSampler``), each task a batch of pairs. A query is predicted as the
class of the support item with the highest p; its per-class score is the best p over that class's support items.

    >>> grads, metrics = siamese.meta_gradient(params, episode, AlgorithmConfig(name="siamese"), SiameseNetwork())
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from metatrain.models.metric import SiameseNetwork
from metatrain.tasks.episode import Episode
from torch import nn

from metatrain.pipeline.algorithms.config import AlgorithmConfig
from metatrain.pipeline.algorithms.gradient.inner_loop import Params
from metatrain.pipeline.algorithms.metric.embedding import call, check_episode, embed_episode, interface
from metatrain.pipeline.algorithms.record import AlgorithmRecord

if TYPE_CHECKING:
    from metatrain.pipeline.config import Config


def build_network(cfg: Config, shape: tuple[int, int, int]) -> SiameseNetwork:
    """The siamese network: the Conv4 embedding and a weighted L1 distance scored by a sigmoid."""
    m, (channels, height, _) = cfg.model, shape
    return SiameseNetwork(channels, hidden=m.hidden, image_size=height)


RECORD = AlgorithmRecord(name="siamese", family="metric", models=("siamese",), predict="sigmoid",
                         adapts_weights=False, eval_ways_free=True, verification=True, builder=build_network)
NAME = RECORD.name


def scores(params: Params, episode: Episode, cfg: AlgorithmConfig, model: nn.Module  # noqa: ARG001
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(balanced BCE over all query-support pairs, best pair logit per class ``(queries, ways)``)."""
    if episode.pairs:
        return verification_scores(params, episode, model)
    ways = check_episode(NAME, model, episode)
    support, query = embed_episode(model, params, episode)
    logits = call(model, params, "pair_logits", query, support)  # (m, n)
    same = (episode.query_y.unsqueeze(1) == episode.support_y.unsqueeze(0)).to(logits.dtype)
    positives = same.sum().clamp(min=1)
    loss = F.binary_cross_entropy_with_logits(logits, same, pos_weight=(same.numel() - positives) / positives)
    per_class = logits.unsqueeze(-1).masked_fill(
        F.one_hot(episode.support_y, ways).bool().logical_not().unsqueeze(0), float("-inf")).amax(1)
    return loss, per_class


def verification_scores(params: Params, episode: Episode, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Koch et al.'s training task (``algorithm.verification``): BCE of p(same) on each (left, right) pair, already
    balanced by the sampler; the scores (different: 0, same: the logit), so accuracy is verification accuracy."""
    left, right = embed_episode(model, params, episode)
    logit = call(model, params, "pair_logit", left, right)
    loss = F.binary_cross_entropy_with_logits(logit, episode.query_y.to(logit.dtype))
    return loss, torch.stack([torch.zeros_like(logit), logit], -1)


init_extra_params, adapt, meta_gradient, meta_gradient_batched, evaluate = interface(NAME, scores)
