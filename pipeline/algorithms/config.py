"""The settings of every meta-learning algorithm, in one frozen dataclass that checks itself.

    >>> from metatrain.pipeline.algorithms import AlgorithmConfig
    >>> cfg = AlgorithmConfig(name="maml", inner_lr=0.4, inner_steps=1, eval_inner_steps=3)   # MAML, Omniglot
    >>> cfg = AlgorithmConfig.from_dict({"name": "metasgd", "metasgd_lr": "per_layer_step", "multi_step_loss": True})

Fields that only some algorithms read are ignored by the others, except where a combination is certainly a mistake
(a setting the algorithm's record lists as ``forbidden``: MAML's ``first_order``, Reptile's ``multi_step_loss``),
which raises. The name is checked against the registry (:mod:`pipeline.algorithms`), looked up when a config is built,
so this module imports no algorithm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from metatrain.tasks.errors import did_you_mean

from metatrain.pipeline.algorithms.errors import AlgorithmConfigError

if TYPE_CHECKING:
    from metatrain.pipeline.algorithms.record import AlgorithmRecord

DISTANCES = ("euclidean", "cosine")
REPTILE_OPTIMIZERS = ("sgd", "adam")
METASGD_LRS = ("per_param", "per_layer_step")
TASK_BATCHING = ("auto", "loop", "batched")
QUERY_BN = ("support", "batch")
SERVER_UPDATES = ("trajectory", "window")


def unknown_name(field: str, value: object, known: tuple[str, ...]) -> AlgorithmConfigError:
    """The error for a name that is not one of ``known``, with the closest known name suggested."""
    hint = did_you_mean(value, known, cutoff=0.5, form="did you mean {!r}? ")
    return AlgorithmConfigError(f"{field}: unknown {value!r} ({hint}known: {', '.join(sorted(known))})")


@dataclass(frozen=True)
class AlgorithmConfig:
    """How one meta-learning algorithm adapts to a task and computes its meta-gradient (defaults: MAML, Omniglot)."""

    name: str = "maml"
    """Algorithm: maml, fomaml, reptile, metasgd, anil (inner loop); mann (sequence), memory (key-value module);
    protonet, matching, relation, siamese (metric learners); meta_lstm, l2l_gd (learned update rules); snail
    (sequence); metanet (fast weights)."""
    inner_lr: float = 0.4
    """Inner-loop step size (Meta-SGD: the initial value of every learned rate). MAML used 0.4 on Omniglot."""
    inner_steps: int = 1
    """Inner-loop steps during meta-training (>= 1). MAML: 1 for 5-way Omniglot."""
    eval_inner_steps: int = 3
    """Inner-loop steps when evaluating (>= 0; 0 scores the initialisation). MAML: 3 for 5-way Omniglot."""
    first_order: bool = False
    """metasgd, anil: drop second-order terms (inner gradients treated as constants). maml: use 'fomaml'."""
    multi_step_loss: bool = False
    """maml, fomaml, metasgd, anil: meta-loss = weighted sum of the query losses after every inner step (MAML++)."""
    msl_weights: tuple[float, ...] | None = None
    """Weights of the multi-step loss, one per inner step; None = uniform 1/k (see metasgd.msl_weights to anneal)."""
    metasgd_lr: str = "per_param"
    """metasgd: 'per_param' (one rate per weight, Meta-SGD) or 'per_layer_step' (one per tensor and step, MAML++)."""
    reptile_optimizer: str = "sgd"
    """reptile: inner optimiser, 'sgd' or 'adam' (Adam state starts fresh on every task, as in Nichol et al.)."""
    reptile_adam_betas: tuple[float, float] = (0.0, 0.999)
    """reptile with adam: (beta1, beta2); Nichol et al. used beta1 = 0."""
    reptile_batch_size: int = 0
    """reptile: examples per inner step, drawn in turn from the task's support+query data; 0 = all of it."""
    reptile_shuffle: bool = True
    """reptile with reptile_batch_size: shuffle the task's data first (order fixed by the episode key)."""
    per_step_bn: bool = False
    """Per-inner-step batch-norm gains/biases (MAML++); the model needs bn_steps >= max(steps) + 1."""
    checkpoint_inner: bool = False
    """Second-order methods: recompute each inner step in the backward pass instead of storing it (less memory)."""
    task_batching: str = "auto"
    """How a worker runs its tasks: 'loop' (one by one), 'batched' (all at once), 'auto' (loop on CPU, batched on
    GPU)."""
    memory_size: int = 128
    """memory: slots of the key-value memory (it must hold an episode's support set; the paper used 8192)."""
    memory_k: int = 256
    """memory: nearest neighbours searched for the loss's positive and negative (Kaiser et al.: 256)."""
    memory_margin: float = 0.1
    """memory: alpha, the margin of the memory loss max(0, q.K[b] - q.K[p] + alpha)."""
    distance: str = "euclidean"
    """protonet: squared 'euclidean' distance to the prototypes (the paper's) or 'cosine' similarity."""
    cosine_scale: float = 10.0
    """protonet with cosine, and matching's attention: scale * cos (a cosine in [-1, 1] is too flat a softmax input on
    its own); 1 is Vinyals et al.'s attention as printed."""
    lstm_hidden: int = 20
    """meta_lstm: hidden units of the LSTM under the meta cell (Ravi & Larochelle: 20); l2l_gd: units per layer of
    the optimizer (Andrychowicz et al.: 20); metanet: units of its coordinate-wise LSTMs and MLPs (20)."""
    lstm_layers: int = 2
    """l2l_gd: LSTM layers of the coordinate-wise optimizer (Andrychowicz et al.: 2)."""
    lstm_p: float = 10.0
    """meta_lstm, l2l_gd, metanet: p of the log/sign preprocessing (10 in both papers; DeepMind's code: 5; Meta
    Networks' code: 7, its configs' value)."""
    output_scale: float = 0.1
    """l2l_gd: the optimizer's output is multiplied by this (the step size an untrained optimizer starts from;
    DeepMind's code: 0.01)."""
    unroll: int = 100
    """l2l_gd: optimizee steps of one trajectory at meta-training, and of every evaluation (the paper: 100)."""
    truncation: int = 20
    """l2l_gd: truncated BPTT: the trajectory's graph is cut every this many steps (the paper: 20; <= unroll)."""
    server_update: str = "trajectory"
    """l2l_gd: what one server step applies: 'trajectory' (a slot's windows summed) or 'window' (the paper's update
    after every window: a trajectory spans unroll / truncation steps, each replayed up to its window)."""
    support_batch: int = 0
    """meta_lstm: support examples per update, taken in turn in an order fixed by the episode key (the paper's
    5-shot batches); 0 = the whole support set at every update (its 1-shot setting)."""
    query_bn: str = "support"
    """meta_lstm, reptile: batch-norm statistics of the query set: 'support' (the adapted learner's statistics on
    the support set, each query scored as if alone) or 'batch' (the query set's own: transductive, as MAML)."""
    check_finite: bool = True
    """Raise NonFiniteGradientError on a NaN/Inf gradient, naming the step and parameter (one sync per task)."""
    verification: bool = False
    """siamese: train on Koch et al.'s same/different image pairs instead of episodes (a pair-scoring learner's
    record allows it); validation and test stay N-way episodes."""
    verification_pairs: int = 128
    """verification: pairs per task, half same, half different (Koch et al.'s minibatch: 128)."""
    verification_within: float = 0.5
    """verification: share of the different pairs whose two characters come from one alphabet (the rest: two)."""

    def __post_init__(self) -> None:
        record = self.record  # an unknown name raises here, naming the field
        for f in ("first_order", "multi_step_loss", "reptile_shuffle", "per_step_bn", "checkpoint_inner",
                  "check_finite", "verification"):
            if not isinstance(getattr(self, f), bool):
                raise AlgorithmConfigError(f"{f}: must be true or false, got {getattr(self, f)!r}")
        for f in ("inner_steps", "eval_inner_steps", "reptile_batch_size", "support_batch", "lstm_hidden",
                  "lstm_layers", "unroll", "truncation", "verification_pairs"):
            if not isinstance(getattr(self, f), int) or isinstance(getattr(self, f), bool):
                raise AlgorithmConfigError(f"{f}: must be an integer, got {getattr(self, f)!r}")
        if self.verification_pairs < 2 or self.verification_pairs % 2:
            raise AlgorithmConfigError(f"verification_pairs: must be even and >= 2 (half same, half different), "
                                       f"got {self.verification_pairs}")
        if not isinstance(self.verification_within, (int, float)) or not 0 <= self.verification_within <= 1:
            raise AlgorithmConfigError(f"verification_within: must be in [0, 1], got {self.verification_within!r}")
        if self.verification and not record.verification:
            from metatrain.pipeline.algorithms import algorithm_names, get_record

            able = [n for n in algorithm_names() if get_record(n).verification]
            raise AlgorithmConfigError(f"verification: {self.name} cannot train on same/different pairs (it scores "
                                       f"episodes; pair-scoring learners: {', '.join(able) or 'none'})")
        if not isinstance(self.inner_lr, (int, float)) or isinstance(self.inner_lr, bool) \
                or not math.isfinite(self.inner_lr) or self.inner_lr <= 0:
            raise AlgorithmConfigError(f"inner_lr: must be a finite number > 0, got {self.inner_lr!r}")
        object.__setattr__(self, "inner_lr", float(self.inner_lr))
        for f in ("memory_size", "memory_k"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise AlgorithmConfigError(f"{f}: must be an integer >= 1, got {v!r}")
        if not isinstance(self.memory_margin, (int, float)) or isinstance(self.memory_margin, bool) \
                or not math.isfinite(self.memory_margin) or self.memory_margin < 0:
            raise AlgorithmConfigError(f"memory_margin: must be a finite number >= 0, got {self.memory_margin!r}")
        object.__setattr__(self, "memory_margin", float(self.memory_margin))
        if self.inner_steps < 1:
            raise AlgorithmConfigError(f"inner_steps: must be >= 1 at meta-training, got {self.inner_steps}")
        if self.eval_inner_steps < 0:
            raise AlgorithmConfigError(f"eval_inner_steps: must be >= 0, got {self.eval_inner_steps}")
        if self.reptile_batch_size < 0:
            raise AlgorithmConfigError(f"reptile_batch_size: must be >= 0 (0 = all), got {self.reptile_batch_size}")
        if self.metasgd_lr not in METASGD_LRS:
            raise unknown_name("metasgd_lr", self.metasgd_lr, METASGD_LRS)
        if self.reptile_optimizer not in REPTILE_OPTIMIZERS:
            raise unknown_name("reptile_optimizer", self.reptile_optimizer, REPTILE_OPTIMIZERS)
        if self.distance not in DISTANCES:
            raise unknown_name("distance", self.distance, DISTANCES)
        if not isinstance(self.cosine_scale, (int, float)) or isinstance(self.cosine_scale, bool) \
                or not math.isfinite(self.cosine_scale) or self.cosine_scale <= 0:
            raise AlgorithmConfigError(f"cosine_scale: must be a finite number > 0, got {self.cosine_scale!r}")
        object.__setattr__(self, "cosine_scale", float(self.cosine_scale))
        if self.lstm_hidden < 1 or self.support_batch < 0:
            bad = "lstm_hidden" if self.lstm_hidden < 1 else "support_batch"
            raise AlgorithmConfigError(f"{bad}: must be >= {1 if bad == 'lstm_hidden' else 0}, got "
                                       f"{getattr(self, bad)}")
        if not isinstance(self.lstm_p, (int, float)) or isinstance(self.lstm_p, bool) \
                or not math.isfinite(self.lstm_p) or self.lstm_p <= 0:
            raise AlgorithmConfigError(f"lstm_p: must be a finite number > 0, got {self.lstm_p!r}")
        object.__setattr__(self, "lstm_p", float(self.lstm_p))
        if not isinstance(self.output_scale, (int, float)) or isinstance(self.output_scale, bool) \
                or not math.isfinite(self.output_scale) or self.output_scale <= 0:
            raise AlgorithmConfigError(f"output_scale: must be a finite number > 0, got {self.output_scale!r}")
        object.__setattr__(self, "output_scale", float(self.output_scale))
        for f in ("lstm_layers", "unroll", "truncation"):
            if getattr(self, f) < 1:
                raise AlgorithmConfigError(f"{f}: must be >= 1, got {getattr(self, f)}")
        if self.unroll < self.truncation:
            raise AlgorithmConfigError(f"unroll: {self.unroll} steps is shorter than its truncation window of "
                                       f"{self.truncation} (algorithm.truncation)")
        if self.server_update not in SERVER_UPDATES:
            raise unknown_name("server_update", self.server_update, SERVER_UPDATES)
        if self.query_bn not in QUERY_BN:
            raise unknown_name("query_bn", self.query_bn, QUERY_BN)
        if self.task_batching not in TASK_BATCHING:
            raise unknown_name("task_batching", self.task_batching, TASK_BATCHING)
        betas = tuple(self.reptile_adam_betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise AlgorithmConfigError(f"reptile_adam_betas: must be two numbers in [0, 1), got {betas!r}")
        object.__setattr__(self, "reptile_adam_betas", tuple(float(b) for b in betas))
        for setting, why in record.forbidden:
            if getattr(self, setting):
                raise AlgorithmConfigError(f"{setting}: {why}")
        if self.msl_weights is not None:
            w = tuple(self.msl_weights)
            if len(w) != self.inner_steps or not all(isinstance(x, (int, float)) and x >= 0 for x in w) \
                    or sum(w) <= 0:
                raise AlgorithmConfigError(f"msl_weights: need {self.inner_steps} (inner_steps) non-negative "
                                           f"weights with a positive sum, got {w!r}")
            if not self.multi_step_loss:
                raise AlgorithmConfigError("msl_weights: set multi_step_loss: true to use them")
            object.__setattr__(self, "msl_weights", tuple(float(x) for x in w))

    @property
    def record(self) -> AlgorithmRecord:
        """The registry's record of this algorithm (what the rest of the pipeline asks instead of the name)."""
        from metatrain.pipeline.algorithms import get_record  # the registry imports the algorithms, which import us

        return get_record(self.name, field="name")

    @property
    def loss_weights(self) -> tuple[float, ...]:
        """Weight of the query loss after inner step 1..k: (0, ..., 0, 1) unless multi_step_loss."""
        k = self.inner_steps
        if not self.multi_step_loss:
            return (0.0,) * (k - 1) + (1.0,)
        return self.msl_weights if self.msl_weights is not None else (1.0 / k,) * k

    @property
    def bn_steps_needed(self) -> int:
        """Per-step batch-norm rows a model needs for these settings (the query pass after k steps uses row k)."""
        return max(self.inner_steps, self.eval_inner_steps) + 1 if self.per_step_bn else 1

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AlgorithmConfig:
        """Build from a config-file mapping; an unknown key raises with the closest field name suggested."""
        known = tuple(f.name for f in fields(cls))
        for key in values:
            if key not in known:
                raise unknown_name("algorithm setting", key, known)
        vals = dict(values)
        for key in ("msl_weights", "reptile_adam_betas"):  # YAML gives lists; the dataclass is frozen/hashable
            if isinstance(vals.get(key), list):
                vals[key] = tuple(vals[key])
        return cls(**vals)
