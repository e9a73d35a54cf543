"""Run configuration: one frozen dataclass per concern, loaded from YAML, overridden with ``--set a.b=v``.

    metatrain train configs/omniglot_fomaml_5w1s.yaml --set train.steps=500 --set workers.count=2

Every section validates itself in ``__post_init__``; the loader checks keys and types first, so a typo gets
"unknown config key 'train.stpes' (did you mean 'train.steps'?)" and a wrong type names the field and what it
wanted. ``Config.to_dict()`` is the resolved configuration, logged to MLflow and stored in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from metatrain.tasks.augment import Affine
from metatrain.tasks.optimizees import ACTIVATIONS, MLP_SOURCES, OPTIMIZEE_FAMILIES

from metatrain.pipeline.algorithms import algorithm_names, get_record
from metatrain.pipeline.algorithms.config import AlgorithmConfig
from metatrain.pipeline.config_parsing import ConfigError, apply_overrides, build, read_yaml


def _one_of(names: tuple[str, ...]) -> str:
    return repr(names[0]) if len(names) == 1 else f"one of {', '.join(names)}"


def _require(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{where} {message}")


@dataclass(frozen=True)
class DataConfig:
    """Where episodes come from and their shape."""

    dataset: str = "omniglot"
    """``sinusoid`` (MAML regression tasks, no store), an optimizee family of the learned optimizer l2l_gd
    (``quadratic``, ``mlp``: see the ``optimizee`` section), or a prepared store's dataset name (omniglot, ...)."""
    path: str = "data/omniglot"
    """Prepared store folder (``metatrain prepare ...``); mlp optimizees: the store (optimizee.source omniglot) or
    the folder of MNIST's IDX files (mnist); unused for sinusoids, quadratics and digits."""
    ways: int = 5
    """Classes per episode (the classifier head's width for inner-loop learners)."""
    shots: int = 1
    """Support images per class (sinusoid: support points per task)."""
    queries: int = 15
    """Query images per class (sinusoid: query points per task)."""
    eval_ways: int | None = None
    """Ways of validation and test episodes (None: data.ways); metric learners may train wider (ProtoNets: 60)."""
    instances: int = 10
    """Sequence episodes (algorithm mann): drawings per class in the sequence, so T = ways * instances."""
    train_split: str = "background/train"
    """Classes for meta-training (see tasks/splits.py)."""
    val_split: str = "background/val"
    """Held-out classes for periodic validation and best-checkpoint selection."""
    test_split: str = "evaluation"
    """Classes of the final test evaluation."""
    rotations: Literal["auto", "on", "off"] = "auto"
    """Rotations as new classes on the training split: auto = on for training splits (background, */train)."""
    split_seed: int = 0
    """Seed of the shuffled class splits (maml/*, vinyals/*, background/*); not the training seed."""
    within_alphabet: bool = False
    """Each episode's classes from one alphabet, chosen per episode (Lake et al.'s one-shot protocol), on every
    split; alphabets with fewer classes than the episode's ways (x4 with rotations) are skipped (eval.json lists
    the test split's)."""
    augment: bool = False
    """Koch et al.'s affine distortions of every training image (tasks/augment.py); never validation or test."""
    augment_rotation: float = 10.0
    """augment: rotation bound, degrees (U(-r, r))."""
    augment_shear: float = 0.3
    """augment: shear factor bound along x and y."""
    augment_scale: float = 0.2
    """augment: scale drawn from U(1 - s, 1 + s)."""
    augment_translate: float = 2.0
    """augment: translation bound along x and y, pixels."""
    augment_p: float = 0.5
    """augment: probability of each component (rotation, shear, scale, translation)."""

    def __post_init__(self):
        for name in ("ways", "shots", "queries", "instances"):
            _require(getattr(self, name) >= 1, f"data.{name}", f"must be >= 1, got {getattr(self, name)}")
        _require(self.eval_ways is None or self.eval_ways >= 1, "data.eval_ways", f"must be >= 1, got {self.eval_ways}")
        for name in ("augment_rotation", "augment_shear", "augment_scale", "augment_translate"):
            v = getattr(self, name)
            _require(math.isfinite(v) and v >= 0, f"data.{name}", f"must be a finite number >= 0, got {v}")
        _require(self.augment_scale < 1, "data.augment_scale", f"must be < 1, got {self.augment_scale}")
        _require(0 <= self.augment_p <= 1, "data.augment_p", f"must be in [0, 1], got {self.augment_p}")
        for name in ("within_alphabet", "augment"):
            _require(not getattr(self, name) or self.has_images, f"data.{name}",
                     f"needs image episodes; data.dataset={self.dataset} has none")

    def affine(self) -> Affine | None:
        """The training images' distortion (None: data.augment off)."""
        return Affine(self.augment_rotation, self.augment_shear, self.augment_scale, self.augment_translate,
                      self.augment_p) if self.augment else None

    @property
    def test_ways(self) -> int:
        """Ways of validation and test episodes."""
        return self.eval_ways or self.ways

    @property
    def is_sinusoid(self) -> bool:
        return self.dataset == "sinusoid"

    @property
    def optimizee_family(self) -> str | None:
        """The optimizee family (tasks/optimizees.py) when the tasks are optimizees, else None."""
        return self.dataset if self.dataset in OPTIMIZEE_FAMILIES else None

    @property
    def has_images(self) -> bool:
        """Whether episodes come from a prepared image store (not sinusoids, not optimizees)."""
        return not self.is_sinusoid and self.optimizee_family is None


@dataclass(frozen=True)
class OptimizeeConfig:
    """The optimizee tasks of a learned optimizer (``data.dataset`` quadratic or mlp; read by l2l_gd only)."""

    dim: int = 10
    """quadratic: coordinates of theta (the paper: 10)."""
    source: Literal[MLP_SOURCES] = "digits"
    """mlp: the examples: scikit-learn's 8x8 ``digits`` (ships with it), 10-class subsets of the ``omniglot`` store at
    data.path (classes of data.train_split / val_split / test_split), or ``mnist`` IDX files in data.path."""
    hidden: tuple[int, ...] = (20,)
    """mlp: widths of the hidden layers (the paper: one of 20; its generalisation tests: [40], [20, 20])."""
    activation: Literal[ACTIVATIONS] = "sigmoid"
    """mlp: hidden activation (the paper: sigmoid; ReLU is its failing generalisation test)."""
    batch_size: int = 128
    """mlp: examples per minibatch, one minibatch per optimizee step (the paper: 128)."""
    ways: int = 10
    """mlp on omniglot: classes per optimizee."""
    image_size: int = 14
    """mlp on omniglot: images average-pooled to this side (14: 196 inputs)."""

    def __post_init__(self):
        for name in ("dim", "batch_size", "ways", "image_size"):
            _require(getattr(self, name) >= 1, f"optimizee.{name}", f"must be >= 1, got {getattr(self, name)}")
        _require(len(self.hidden) >= 1 and all(h >= 1 for h in self.hidden), "optimizee.hidden",
                 f"must be a non-empty list of widths >= 1, got {list(self.hidden)}")

    def sampler_options(self, family: str, data: DataConfig, split: str) -> dict:
        """The options of tasks/optimizees.py's sampler of ``family`` for ``split`` (train / val / test)."""
        if family == "quadratic":
            return {"dim": self.dim}
        options = {"source": self.source, "hidden": self.hidden, "activation": self.activation,
                   "batch_size": self.batch_size}
        if self.source == "omniglot":
            name = {"train": data.train_split, "val": data.val_split, "test": data.test_split}[split]
            options |= {"path": data.path, "split": name, "ways": self.ways, "image_size": self.image_size,
                        "split_seed": data.split_seed}
        elif self.source == "mnist":  # MNIST's own split: train optimizers on its training file, test on its test
            options |= {"path": data.path, "split": "train" if split == "train" else "test"}
        return options


#: The model of sinusoid regression; an algorithm whose record lists it can regress.
SINUSOID_MODEL = "mlp"
#: Every ``model.name``: the models the registered algorithms' records list, each once, in registry order.
MODEL_NAMES = tuple(dict.fromkeys(m for a in algorithm_names() for m in get_record(a).models))


@dataclass(frozen=True)
class ModelConfig:
    """The network whose parameters are meta-learned."""

    name: Literal[MODEL_NAMES] = "conv4"
    """conv4: MAML's 4-block CNN; mlp: the sinusoid MLP (1-40-40-1); mann: LSTM + LRUA memory (Santoro et al.);
    lstm: mann's memory-less baseline; key_encoder: conv4 trunk + linear to key_size (Kaiser et al.'s memory);
    embedding (protonet), matching, relation, siamese: the metric learners' networks (models/metric.py); metanet:
    Meta Networks' base learner, key network and meta-learners (models/metanet.py)."""
    hidden: int = 64
    """Filters per conv block (64 for Omniglot, 32 for mini-ImageNet) or MLP hidden width (40)."""
    pool: Literal["max", "stride"] = "max"
    """conv4 downsampling: 2x2 max-pool, or stride-2 convolutions (the MAML paper's Omniglot variant)."""
    controller: int = 200
    """mann/lstm: LSTM controller units."""
    memory_slots: int = 128
    """mann: memory locations N."""
    memory_width: int = 40
    """mann: width W of a memory location (and of a read vector)."""
    read_heads: int = 4
    """mann: read heads R (also the number of least-used locations LRUA tracks)."""
    lrua_gamma: float = 0.95
    """mann: usage decay gamma in w^u_t = gamma w^u_{t-1} + w^r_t + w^w_t."""
    mann_read_first: bool = True
    """mann: read the memory before this step's write (see models/mann.py for why); false = the paper's order."""
    mann_key_strength: bool = True
    """mann: a learned key strength beta in the read's softmax (NTM addressing); false = the paper's beta = 1."""
    fce: bool = False
    """matching: full-context embeddings (bidirectional LSTM over the support, attention LSTM for queries)."""
    fce_read_steps: int = 5
    """matching with fce: attention-LSTM read steps K over the support."""
    relation_hidden: int = 8
    """relation: width of the relation module's hidden fully connected layer."""
    key_size: int = 128
    """key_encoder: width of the normalised query key."""

    def __post_init__(self):
        for name in ("hidden", "controller", "memory_slots", "memory_width", "read_heads", "key_size",
                     "fce_read_steps", "relation_hidden"):
            _require(getattr(self, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(self, name)}")
        _require(self.read_heads <= self.memory_slots, "model.read_heads",
                 f"must be <= model.memory_slots ({self.memory_slots}), got {self.read_heads}")
        _require(0 <= self.lrua_gamma <= 1, "model.lrua_gamma", f"must be in [0, 1], got {self.lrua_gamma}")


@dataclass(frozen=True)
class OptimConfig:
    """The outer (meta) optimizer, owned by the parameter server."""

    name: Literal["adam", "sgd"] = "adam"
    """Outer optimizer."""
    lr: float = 1e-3
    """Outer learning rate (MAML: 1e-3 with Adam)."""
    weight_decay: float = 0.0
    """L2 weight decay of the outer optimizer."""
    momentum: float = 0.0
    """SGD momentum (sgd only)."""
    schedule: Literal["constant", "cosine", "step"] = "constant"
    """Learning-rate schedule over train.steps."""
    warmup_steps: int = 0
    """Linear warm-up steps before the schedule."""
    min_lr_ratio: float = 0.0
    """cosine: final lr as a fraction of lr; step: the factor applied every step_every steps."""
    step_every: int = 1000
    """step schedule: multiply the lr by min_lr_ratio every this many steps."""
    clip_norm: float | None = None
    """Clip the averaged meta-gradient to this global L2 norm (None: no clipping)."""

    def __post_init__(self):
        _require(self.lr > 0 and math.isfinite(self.lr), "optim.lr", f"must be a positive number, got {self.lr}")
        _require(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(0 <= self.momentum < 1, "optim.momentum", f"must be in [0, 1), got {self.momentum}")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _require(self.step_every >= 1, "optim.step_every", f"must be >= 1, got {self.step_every}")
        _require(self.clip_norm is None or self.clip_norm > 0, "optim.clip_norm", f"must be > 0, got {self.clip_norm}")


@dataclass(frozen=True)
class TrainConfig:
    """The training loop."""

    steps: int = 2000
    """Outer steps (parameter-server updates)."""
    meta_batch: int = 32
    """Tasks per outer step, spread over the workers."""
    grad_blocks: int = 0
    """Sync: the step's tasks form this many fixed blocks (the leaves of its reduction tree); 0 = one per task. At
    most this many workers are busy; results are identical for any worker count. Larger blocks batch on a GPU."""
    seed: int = 0
    """Training seed: initial weights and every episode (seed, step, slot)."""
    mode: Literal["sync", "async"] = "sync"
    """sync: all tasks of a step, then one update (worker-count independent); async: apply as workers finish."""
    max_staleness: int = 2
    """async: drop a contribution computed on weights more than this many versions old."""
    val_every: int = 200
    """Validate every this many steps (0: only at the end)."""
    val_tasks: int = 200
    """Tasks per validation."""
    eval_tasks: int = 600
    """Tasks of the final test evaluation (>= 600 for a 95% CI of about +-0.5% at 98%)."""
    checkpoint_every: int = 100
    """Parameter-server checkpoint period in steps."""
    keep_checkpoints: int = 3
    """Periodic checkpoints kept (best.pt and final.pt are kept besides)."""
    time_budget_s: float | None = None
    """Stop training after this many seconds (then checkpoint and evaluate); None: run all steps."""
    eval_seed: int = 0
    """Seed of validation and test episodes: fixed apart from train.seed, so runs are compared on the same tasks."""

    def __post_init__(self):
        for name in ("steps", "meta_batch", "eval_tasks", "checkpoint_every", "keep_checkpoints", "val_tasks"):
            _require(getattr(self, name) >= 1, f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        _require(self.seed >= 0, "train.seed", f"must be >= 0, got {self.seed}")
        _require(self.eval_seed >= 0, "train.eval_seed", f"must be >= 0, got {self.eval_seed}")
        _require(self.grad_blocks >= 0, "train.grad_blocks", f"must be >= 0, got {self.grad_blocks}")
        _require(self.max_staleness >= 0, "train.max_staleness", f"must be >= 0, got {self.max_staleness}")
        _require(self.val_every >= 0, "train.val_every", f"must be >= 0, got {self.val_every}")
        _require(self.time_budget_s is None or self.time_budget_s > 0, "train.time_budget_s",
                 f"must be > 0, got {self.time_budget_s}")


@dataclass(frozen=True)
class WorkersConfig:
    """Ray task workers and their placement."""

    count: int = 2
    """TaskWorker actors (one per core is the usual choice)."""
    cpus: float = 1.0
    """CPUs reserved per worker."""
    gpus: float = 0.0
    """GPUs per worker; fractional shares one GPU (0.25 = four workers per GPU)."""
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Placement-group strategy for the workers' bundles."""
    torch_threads: int = 1
    """torch intra-op threads per worker (1: the cores are shared out by Ray, not by torch)."""
    max_restarts: int = 3
    """Ray restarts of a crashed worker before its slots go to the others for good."""
    task_timeout_s: float = 600.0
    """A compute call slower than this is treated as lost and its slots are recomputed elsewhere."""
    balance: Literal["speed", "equal"] = "equal"
    """Sync: split a step's blocks evenly, or in proportion to each worker's measured tasks/s (mixed hardware)."""
    keep_freed_memory: bool = True
    """Workers tell glibc malloc to keep freed memory for reuse (RSS stays at the peak; ~20% faster on CPU)."""

    def __post_init__(self):
        _require(self.count >= 1, "workers.count", f"must be >= 1, got {self.count}")
        _require(self.cpus >= 0, "workers.cpus", f"must be >= 0, got {self.cpus}")
        _require(self.gpus >= 0, "workers.gpus", f"must be >= 0, got {self.gpus}")
        _require(self.gpus <= 1 or self.gpus == int(self.gpus), "workers.gpus",
                 f"must be a fraction of one GPU or a whole number, got {self.gpus}")
        _require(self.torch_threads >= 1, "workers.torch_threads", f"must be >= 1, got {self.torch_threads}")
        _require(self.max_restarts >= 0, "workers.max_restarts", f"must be >= 0, got {self.max_restarts}")
        _require(self.task_timeout_s > 0, "workers.task_timeout_s", f"must be > 0, got {self.task_timeout_s}")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow."""

    uri: str | None = None
    """Tracking URI; None: --tracking-uri, then $MLFLOW_TRACKING_URI, then sqlite:///OUT/mlflow.db."""
    experiment: str = "metatrain"
    """MLflow experiment name."""
    run_name: str | None = None
    """MLflow run name (None: MLflow picks one)."""
    system_metrics: bool = True
    """Log CPU/memory/GPU system metrics."""
    register: str | None = None
    """Register the final model under this name in the model registry (also --register)."""

    def __post_init__(self):
        _require(bool(self.experiment), "tracking.experiment", "must not be empty")


@dataclass(frozen=True)
class Config:
    """A whole run."""

    data: DataConfig = field(default_factory=DataConfig)
    """Episodes."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Network."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """Meta-learning algorithm and its inner loop."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Outer optimizer."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    """Ray workers."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow."""
    optimizee: OptimizeeConfig = field(default_factory=OptimizeeConfig)
    """Optimizee tasks (l2l_gd only)."""

    def __post_init__(self):
        algo, model, record = self.algorithm.name, self.model.name, self.algorithm.record
        family = self.data.optimizee_family
        families = ", ".join(OPTIMIZEE_FAMILIES)
        if record.optimizee_tasks:
            _require(family is not None, "data.dataset", f"must be an optimizee family ({families}) for "
                     f"algorithm.name={algo}: it learns an optimizer, not a few-shot learner; got "
                     f"{self.data.dataset!r}")
            _require(self.algorithm.task_batching != "batched", "algorithm.task_batching",
                     f"must be loop or auto for {algo} (optimizees run one at a time), got 'batched'")
            _require(self.algorithm.server_update != "window" or self.train.mode == "sync", "algorithm.server_update",
                     "window needs train.mode: sync (a trajectory's windows are consecutive steps; async steps "
                     "are submissions)")
        elif family is not None:
            _require(False, "algorithm.name", f"{algo} learns from few-shot episodes; data.dataset={family} is an "
                     f"optimizee family (for the learned optimizer l2l_gd)")
        if family is not None:
            _require(model in record.models, "model.name", f"must be {_one_of(record.models)} for algorithm.name="
                     f"{algo}, got {model!r}")
        elif self.data.is_sinusoid:
            _require(model == SINUSOID_MODEL, "model.name", f"must be {SINUSOID_MODEL!r} for data.dataset=sinusoid, "
                     f"got {model!r}")
            _require(SINUSOID_MODEL in record.models, "algorithm.name", f"{algo} needs image data, not sinusoids")
        else:
            allowed = tuple(m for m in record.models if m != SINUSOID_MODEL)
            if SINUSOID_MODEL in record.models:  # it runs other models on other data: say which data this is
                _require(model in allowed, "model.name", f"must be {_one_of(allowed)} for algorithm.name={algo} on "
                         f"image data, got {model!r}")
            _require(model in allowed, "model.name", f"must be one of {', '.join(allowed)} for algorithm.name="
                     f"{algo}, got {model!r}")
        if self.data.eval_ways not in (None, self.data.ways):
            _require(record.eval_ways_free, "data.eval_ways",
                     f"must equal data.ways for {algo} (its classifier head is data.ways wide); only memory and "
                     f"metric learners can test on other ways")

    @property
    def sequence_episodes(self) -> bool:
        """Whether the run draws Santoro sequence episodes (ways x instances) instead of support/query episodes."""
        return self.algorithm.record.sequence_episodes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **sections) -> Config:
        return dataclasses.replace(self, **sections)


# --------------------------------------------------------------------------------------------------------------
# Loading: YAML -> dict -> overrides -> checked dataclasses (pipeline.config_parsing)
# --------------------------------------------------------------------------------------------------------------

def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The config of a YAML file (or the defaults when ``path`` is None) with ``--set`` overrides applied."""
    data: Any = {}
    if path is not None:
        p = Path(path)
        data = read_yaml(p) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(data).__name__}")
    return build(Config, apply_overrides(data, list(overrides)))


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. from a checkpoint)."""
    return build(Config, data)
