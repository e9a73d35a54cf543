"""Meta Networks (Munkhdalai & Yu 2017): fast weights written from support-set gradients, read per query from a
memory keyed by the support representations (models/metanet.py has the equations).

One episode is one slot: the worker computes the episode's fast weights (task-level: the key network's chunk
gradients through a coordinate-wise LSTM; example-level: the base learner's per-example gradients through a
coordinate-wise MLP, one vmapped ``torch.func.grad``), scores the queries, and returns the gradient of their mean
cross-entropy with respect to every meta-parameter (base learner, key network, LSTMs, MLPs). The support gradients
are inputs (detached), so there is no second-order term. There is no inner SGD loop: ``adapt`` returns the parameters
unchanged. The parameter server applies the meta-gradient (Adam 1e-3, ``optim.clip_norm: 10`` as the authors).

The support is read in label order (stable), so a user's support in any class order gives the same fast weights (the
task-level LSTM reads it in chunks; a class's drawings keep the order given); the network's output layer is
``data.ways`` wide, so an episode of other ways is refused with one line.

    >>> from metatrain.models.metanet import MetaNet
    >>> from metatrain.pipeline.algorithms import AlgorithmConfig
    >>> from metatrain.pipeline.algorithms.fastweight import metanet
    >>> grads, metrics = metanet.meta_gradient(params, episode, AlgorithmConfig(name="metanet"), MetaNet(ways=5))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from metatrain.models.metanet import METANET_TASK, MetaNet
from metatrain.tasks.episode import Episode
from torch import nn

from metatrain.pipeline.algorithms.config import AlgorithmConfig
from metatrain.pipeline.algorithms.errors import AlgorithmConfigError, TaskMismatchError
from metatrain.pipeline.algorithms.gradient.inner_loop import Params
from metatrain.pipeline.algorithms.metric.embedding import call, interface
from metatrain.pipeline.algorithms.record import AlgorithmRecord

if TYPE_CHECKING:
    from metatrain.pipeline.config import Config


def build_network(cfg: Config, shape: tuple[int, int, int]) -> MetaNet:
    """MetaNet for ``data.ways``-way episodes: ``model.hidden`` filters; meta-learners of ``algorithm.lstm_hidden``
    units reading gradients preprocessed with p = ``algorithm.lstm_p`` (the configs: 20 and 7, as the authors)."""
    (channels, height, _), a = shape, cfg.algorithm
    return MetaNet(cfg.data.ways, in_channels=channels, hidden=cfg.model.hidden, image_size=height,
                   meta_hidden=a.lstm_hidden, p=a.lstm_p)


#: predict "softmax": predict calls :func:`scores` on the user's support and queries and takes the softmax of the
#: logits. No batched path (auto_batched False): an episode's work is already vectorised over the coordinates,
#: the support examples and the queries, and one slot is one episode (the authors' one episode per update).
RECORD = AlgorithmRecord(name="metanet", family="fastweight", models=("metanet",), predict="softmax",
                         adapts_weights=False, builder=build_network)
NAME = RECORD.name


def check_episode(model: nn.Module, episode: Episode) -> int:
    """The episode's ways, after checking it is one few-shot episode the model can take (refusals name the field)."""
    if getattr(model, "task", None) != METANET_TASK:
        raise AlgorithmConfigError(f"name: metanet needs the MetaNet model, got {type(model).__name__}")
    if not isinstance(episode, Episode) or episode.support_y.dim() != 1:
        raise TaskMismatchError("metanet: needs one few-shot Episode at a time (support_y of shape (n,))")
    for field, y in (("support_y", episode.support_y), ("query_y", episode.query_y)):
        if y.dtype != torch.long:
            raise TaskMismatchError(f"{field}: labels must be int64, got {y.dtype}")
    ways = int(episode.support_y.max()) + 1
    if ways != model.ways or int(episode.support_y.min()) < 0:
        raise TaskMismatchError(f"data.ways: this MetaNet model was built for {model.ways}-way episodes (its output "
                                f"layer), got {ways} ways")
    if int(episode.query_y.max()) >= ways or int(episode.query_y.min()) < 0:
        raise TaskMismatchError(f"query_y: every query label needs support examples (labels 0..{ways - 1})")
    return ways


def scores(params: Params, episode: Episode, cfg: AlgorithmConfig, model: nn.Module  # noqa: ARG001
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy of the queries, their logits ``(queries, ways)``) for one episode."""
    check_episode(model, episode)
    order = torch.sort(episode.support_y, stable=True).indices
    logits = call(model, params, "episode_logits", episode.support_x[order], episode.support_y[order],
                  episode.query_x)
    return F.cross_entropy(logits, episode.query_y), logits


# One episode at a time is exactly a metric learner's (the gradient of ``scores``'s loss, no inner loop); the
# batched entry point runs the stack's episodes one by one.
init_extra_params, adapt, meta_gradient, meta_gradient_batched, evaluate = interface(NAME, scores)
