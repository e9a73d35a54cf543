"""Meta-learning algorithms as pure functions on ``dict[str, Tensor]`` parameters, one module each.

Every module (``maml``, ``fomaml``, ``reptile``, ``metasgd``, ``anil``; the memory models ``mann`` and ``memory``,
whose "adaptation" is writing memory; the metric learners ``protonet``, ``matching``, ``relation``, ``siamese``,
whose adaptation is embedding the support set; ``meta_lstm``, whose update rule is learned; ``l2l_gd``, which learns
an optimizer on optimizee tasks instead of episodes; the sequence learner ``snail``, which reads the support set as
a sequence; the fast-weight learner ``metanet``, whose meta-learners write fast weights from support gradients)
exposes the same interface:

* ``init_extra_params(model, cfg) -> params``: meta-parameters beyond the model's (Meta-SGD's rates; else ``{}``).
* ``adapt(params, support, cfg, model, *, steps=None, create_graph=False, batched=False) -> params``
* ``meta_gradient(params, episode, cfg, model) -> (grads, metrics)``: ``grads`` has the keys and shapes of
  ``params``; ``metrics`` has ``support_loss``/``support_acc`` (before adaptation) and ``query_loss``/``query_acc``
  (after), floats (regression: the losses are MSEs and there is no ``*_acc``).
* ``meta_gradient_batched(params, stacked_episode, cfg, model, keys=None) -> (grads, metrics)``: a whole stack of
  same-shaped tasks at once (the model's ``forward_tasks``, e.g. Conv4 as grouped convolutions, else
  ``torch.func.vmap``); grads SUMMED over the tasks, metrics averaged.
* ``evaluate(params, episode, cfg, model, *, steps=None, batched=False, keys=None) -> metrics`` after
  ``cfg.eval_inner_steps`` (or ``steps``) inner steps; no meta-gradient graph.

Each module also declares ``RECORD``, an :class:`AlgorithmRecord` (family, models, how predict scores, what the
config may combine it with); the registry is built from the records, and the rest of the pipeline asks
:func:`get_record` (or ``cfg.record``) rather than comparing names. :func:`register` adds an algorithm from one
module.

A worker holding several tasks calls :func:`meta_gradient_tasks`, which returns the summed gradient and the task
count (the parameter server averages the contributions weighted by their counts) and picks the per-task loop or
the batched path from ``cfg.task_batching`` (``auto``: loop on CPU, where it measured faster, batched on GPU), or
from :func:`measure_task_batching` run once at start.

    >>> from metatrain.models import Conv4
    >>> from metatrain.pipeline.algorithms import AlgorithmConfig, get_algorithm, meta_gradient_tasks
    >>> model, cfg = Conv4.omniglot(5), AlgorithmConfig(name="maml")
    >>> algo = get_algorithm(cfg.name)
    >>> params = {**dict(model.named_parameters()), **algo.init_extra_params(model, cfg)}
    >>> grads, n, metrics = meta_gradient_tasks(params, episodes, cfg, model)   # sum over n tasks
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import ModuleType

import torch
from metatrain.tasks.episode import Episode, SequenceEpisode, stack_episodes, stack_sequence_episodes
from torch import nn

from metatrain.pipeline.algorithms.config import AlgorithmConfig, unknown_name
from metatrain.pipeline.algorithms.errors import AlgorithmConfigError, NonFiniteGradientError, TaskMismatchError
from metatrain.pipeline.algorithms.fastweight import metanet
from metatrain.pipeline.algorithms.gradient import anil, fomaml, maml, metasgd, reptile
from metatrain.pipeline.algorithms.gradient.inner_loop import LR_PREFIX, Metrics, Params
from metatrain.pipeline.algorithms.learned import l2l_gd, meta_lstm
from metatrain.pipeline.algorithms.memory import key_value, mann
from metatrain.pipeline.algorithms.metric import matching, protonet, relation, siamese
from metatrain.pipeline.algorithms.record import AlgorithmRecord
from metatrain.pipeline.algorithms.sequence import snail

__all__ = ["ALGORITHMS", "AlgorithmConfig", "AlgorithmConfigError", "AlgorithmRecord", "LR_PREFIX",
           "NonFiniteGradientError", "TaskMismatchError", "algorithm_names", "anil", "evaluate_tasks", "fomaml",
           "get_algorithm", "get_record", "init_params", "l2l_gd", "maml", "mann", "matching", "measure_task_batching",
           "key_value", "meta_gradient_tasks", "meta_lstm", "metanet", "metasgd", "protonet", "register", "relation",
           "reptile", "siamese", "snail", "unregister", "use_batched"]

#: What every algorithm module must define besides its RECORD.
INTERFACE = ("init_extra_params", "adapt", "meta_gradient", "meta_gradient_batched", "evaluate")

_REGISTRY: dict[str, ModuleType] = {}


def register(module: ModuleType, *, replace: bool = False) -> ModuleType:
    """Add the algorithm implemented by ``module`` (its ``RECORD`` and the uniform functions) under its name."""
    record = getattr(module, "RECORD", None)
    if not isinstance(record, AlgorithmRecord):
        raise AlgorithmConfigError(f"RECORD: module {module.__name__} has no AlgorithmRecord named RECORD")
    missing = [f for f in INTERFACE if not callable(getattr(module, f, None))]
    if missing:
        raise AlgorithmConfigError(f"{record.name}: module {module.__name__} lacks {', '.join(missing)}")
    if record.name in _REGISTRY and not replace and _REGISTRY[record.name] is not module:
        raise AlgorithmConfigError(f"name: algorithm {record.name!r} is already registered")
    _REGISTRY[record.name] = module
    return module


def unregister(name: str) -> None:
    """Remove a registered algorithm (for tests and plug-ins)."""
    _REGISTRY.pop(name, None)


for _m in (maml, fomaml, reptile, metasgd, anil, mann, key_value, protonet, matching, relation, siamese,
           meta_lstm, l2l_gd, snail, metanet):
    register(_m)

#: The built-in algorithm names, in registry order (:func:`algorithm_names` includes later registrations).
ALGORITHMS = tuple(_REGISTRY)


def algorithm_names() -> tuple[str, ...]:
    """Every registered algorithm name, in registration order."""
    return tuple(_REGISTRY)


def get_algorithm(name: str, field: str = "algorithm") -> ModuleType:
    """The module implementing ``name``; an unknown name raises (naming ``field``) with the closest one suggested."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise unknown_name(field, name, algorithm_names()) from None


def get_record(name: str, field: str = "algorithm") -> AlgorithmRecord:
    """The :class:`AlgorithmRecord` of ``name`` (unknown names raise as in :func:`get_algorithm`)."""
    return get_algorithm(name, field).RECORD


def init_params(model: nn.Module, cfg: AlgorithmConfig) -> Params:
    """All meta-parameters to train: the model's (detached copies) plus the algorithm's extras."""
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    return {**params, **get_algorithm(cfg.name).init_extra_params(model, cfg)}


def use_batched(cfg: AlgorithmConfig, params: Params) -> bool:
    """Resolve ``cfg.task_batching``: ``auto`` means the batched path on a GPU, the per-task loop elsewhere.

    On CPU the loop measured faster for every algorithm on Omniglot (bench/algorithms.py, one thread: a meta-batch's
    activations as one grouped convolution are far larger than the cache, and the same work as separate per-task
    convolutions runs ~1.5-2.5x faster); batching pays when it fills a GPU.
    """
    if get_record(cfg.name).optimizee_tasks:
        return False  # optimizees do not stack; one trajectory is already batched over its coordinates
    if cfg.task_batching != "auto":
        return cfg.task_batching == "batched"
    if get_record(cfg.name).auto_batched:
        return True  # sequence models: batching amortises the per-step Python loop, on any device
    return next(iter(params.values())).device.type == "cuda"


def _groups(episodes: Sequence[Episode | SequenceEpisode]) -> list[list[Episode | SequenceEpisode]]:
    """Episodes grouped by shape (only same-shaped ones can be stacked), in first-seen order."""
    groups: dict[tuple, list] = {}
    for e in episodes:
        shape = (tuple(e.x.shape), tuple(e.prev_label.shape)) if isinstance(e, SequenceEpisode) \
            else (tuple(e.support_x.shape), tuple(e.query_x.shape))
        groups.setdefault(shape, []).append(e)
    return list(groups.values())


def _stack(group: list[Episode | SequenceEpisode]) -> Episode | SequenceEpisode:
    return stack_sequence_episodes(group) if isinstance(group[0], SequenceEpisode) else stack_episodes(group)


def _accumulate(total: Params | None, grads: Params) -> Params:
    if total is None:
        return {k: g.clone() for k, g in grads.items()}
    for k, g in grads.items():
        total[k].add_(g)
    return total


def meta_gradient_tasks(params: Params, episodes: Sequence[Episode], cfg: AlgorithmConfig, model: nn.Module,
                        batched: bool | None = None) -> tuple[Params, int, Metrics]:
    """Meta-gradient SUMMED over ``episodes``, the task count, and metrics averaged over tasks.

    ``batched``: True = each group of same-shaped episodes at once, False = one task at a time, None = decide
    from ``cfg.task_batching`` (:func:`use_batched`). Both give the same result to float rounding.
    """
    if not episodes:
        raise AlgorithmConfigError("episodes: meta_gradient_tasks needs at least one episode")
    algo = get_algorithm(cfg.name)
    batched = use_batched(cfg, params) if batched is None else batched
    total: Params | None = None
    sums: dict[str, float] = {}
    if batched:
        for group in _groups(episodes):
            grads, metrics = algo.meta_gradient_batched(params, _stack(group), cfg, model,
                                                        keys=[e.key for e in group])
            total = _accumulate(total, grads)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * len(group)
    else:
        for episode in episodes:
            # One task at a time: its graph is freed before the next one is built, so memory stays at one task's.
            grads, metrics = algo.meta_gradient(params, episode, cfg, model)
            total = _accumulate(total, grads)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
    n = len(episodes)
    return total, n, {k: v / n for k, v in sums.items()}


def evaluate_tasks(params: Params, episodes: Sequence[Episode], cfg: AlgorithmConfig, model: nn.Module,
                   batched: bool | None = None, steps: int | None = None) -> Metrics:
    """Post-adaptation metrics (``cfg.eval_inner_steps`` or ``steps``) averaged over ``episodes``."""
    if not episodes:
        raise AlgorithmConfigError("episodes: evaluate_tasks needs at least one episode")
    algo = get_algorithm(cfg.name)
    batched = use_batched(cfg, params) if batched is None else batched
    sums: dict[str, float] = {}
    if batched:
        parts = [(_stack(g), len(g), [e.key for e in g]) for g in _groups(episodes)]
    else:
        parts = [(e, 1, None) for e in episodes]
    for ep, count, keys in parts:
        for k, v in algo.evaluate(params, ep, cfg, model, steps=steps, batched=batched, keys=keys).items():
            sums[k] = sums.get(k, 0.0) + v * count
    return {k: v / len(episodes) for k, v in sums.items()}


def measure_task_batching(params: Params, episodes: Sequence[Episode], cfg: AlgorithmConfig, model: nn.Module,
                          repeats: int = 2) -> str:
    """Time both paths on ``episodes`` (after one warm-up each) and return the faster: ``'loop'`` or ``'batched'``.

    For a worker to call once at start: ``cfg = dataclasses.replace(cfg, task_batching=measure_task_batching(...))``.
    """
    best = {}
    for mode in ("loop", "batched"):
        times = []
        for r in range(repeats + 1):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            meta_gradient_tasks(params, episodes, cfg, model, batched=mode == "batched")
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if r:  # the first run is a warm-up (allocator, kernel selection)
                times.append(time.perf_counter() - t0)
        best[mode] = min(times)
    return min(best, key=best.get)
