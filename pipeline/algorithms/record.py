"""One record per algorithm: everything the rest of the pipeline needs to know about it, declared in its module.

Each algorithm module declares ``RECORD = AlgorithmRecord(...)`` next to its functions; the registry
(:mod:`pipeline.algorithms`) is built from those records, and code elsewhere asks the record (``get_record(name)``
or ``cfg.algorithm.record``) instead of comparing algorithm names.

    >>> from metatrain.pipeline.algorithms import get_record
    >>> rec = get_record(cfg.algorithm.name)
    >>> rec.adapts_weights, rec.models[0], rec.predict        # e.g. (True, 'conv4', 'adapt')

The record also says how the algorithm's network is built (``builder``), so :func:`pipeline.components.build_model`
asks it instead of comparing model names. This module imports nothing of the algorithms (the config module and
every algorithm import it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Family = Literal["gradient", "memory", "metric", "learned", "sequence", "fastweight"]
Predict = Literal["adapt", "sequence", "memory", "softmax", "sigmoid", "probability", "none"]

#: The metrics every SGD-inner-loop algorithm reports (before adaptation on the support set, after on the query).
GRADIENT_METRICS = ("support_loss", "support_acc", "query_loss", "query_acc")
#: The metrics of the algorithms without an inner loop (memory and metric learners).
QUERY_METRICS = ("query_loss", "query_acc")
#: ``builder(cfg, shape) -> nn.Module``: the network for a run's :class:`~pipeline.config.Config` (``cfg.model``
#: holds ``model.name``, one of the record's ``models``) and its images' ``(channels, height, width)``.
ModelBuilder = Callable[[Any, tuple[int, int, int]], Any]


@dataclass(frozen=True)
class AlgorithmRecord:
    """The facts about one algorithm that code outside its module may depend on."""

    name: str
    """The registry key and the value of ``algorithm.name`` in a config."""
    family: Family
    """'gradient' (inner SGD loop), 'memory' (adaptation is writing a memory), 'metric' (embedding the support) or
    'learned' (a learned update rule writes the weights) or 'sequence' (a network reads the support set as a
    sequence, SNAIL) or 'fastweight' (meta-learners write fast weights from support gradients, Meta Networks)."""
    models: tuple[str, ...]
    """The ``model.name`` values it runs, the first being the default; 'mlp' (the sinusoid MLP) means regression."""
    predict: Predict
    """How predict scores classes: 'adapt' (inner loop, then softmax of the logits), 'sequence' (a sequence model's
    last output), 'memory' (nearest written key per class), or the metric scores' 'softmax', 'sigmoid', or
    'probability' (already probabilities); 'none': it learns no classifier (l2l_gd learns an optimizer)."""
    adapts_weights: bool
    """Whether the inner loop adapts weights (so eval inner steps mean something); else the support is embedded or
    written to memory."""
    param_prefix: str | None = None
    """Key prefix of its own extra meta-parameters (Meta-SGD's learned rates), not the model's; None: it has none."""
    auto_batched: bool = False
    """``task_batching: auto`` batches a worker's tasks even on the CPU (sequence models: one Python loop for all)."""
    sequence_episodes: bool = False
    """Whether it trains on Santoro sequence episodes (ways x instances) instead of support/query episodes."""
    eval_ways_free: bool = False
    """Whether ``data.eval_ways`` may differ from ``data.ways`` (no classifier head fixed to data.ways)."""
    trains_on_more_ways: bool = False
    """Trained on more ways than tested on (Snell et al.): a study's ways axis varies ``data.eval_ways`` only."""
    forbidden: tuple[tuple[str, str], ...] = ()
    """Boolean settings that are a mistake with this algorithm when true, each with the reason shown."""
    metrics: tuple[str, ...] = QUERY_METRICS
    """The metrics ``meta_gradient`` and ``evaluate`` report (a sequence model adds ``inst<k>_acc``)."""
    shape_fields: tuple[str, ...] = ()
    """Algorithm settings that shape its own meta-parameters (meta_lstm: lstm_hidden): part of the checkpoint
    fingerprint, so a checkpoint of another shape is refused with one line instead of failing in a copy. A dotted
    name is a field of another section (snail: ``data.shots``, which fixes the sequence length T it was built for)."""
    reads_query_bn: bool = False
    """Whether ``algorithm.query_bn`` decides how its query set is batch-normalised (then named in eval.json)."""
    optimizee_tasks: bool = False
    """Whether its tasks are optimizee trajectories (``data.dataset`` one of tasks/optimizees.py's families:
    quadratic, mlp) instead of few-shot episodes; they run one at a time (a trajectory is batched over coordinates)."""
    verification: bool = False
    """Whether it can train on same/different image pairs (``algorithm.verification``: Koch et al.'s training)."""
    serve: Callable[[Any], Any] | None = None
    """What MLflow logs for serving, made from the trained network (l2l_gd: the optimizer as one packed tensor-in,
    tensor-out step); None: the network itself."""
    builder: ModelBuilder | None = None
    """How its network is built on image data (a function of its module, see :data:`ModelBuilder`); None: the
    classifier of the gradient learners, Conv4 ``data.ways`` wide. The sinusoid MLP (``mlp``) needs no builder.
    Images reach the builder square unless ``sequence_episodes`` (sequence models read each image flattened); with
    ``optimizee_tasks`` the shape is None."""

    def forbids(self, setting: str) -> bool:
        """Whether ``setting: true`` is rejected for this algorithm."""
        return any(f == setting for f, _ in self.forbidden)

    @property
    def first_order_allowed(self) -> bool:
        """Whether ``first_order: true`` is accepted."""
        return not self.forbids("first_order")

    @property
    def multi_step_loss_allowed(self) -> bool:
        """Whether ``multi_step_loss: true`` is accepted."""
        return not self.forbids("multi_step_loss")
