"""The machinery every algorithm shares: run a model functionally on a parameter dict, per task or for a stack of
tasks at once, take differentiable inner SGD steps, and collect meta-gradients and metrics.

Two execution modes, one code path. A :class:`TaskBatch` holds either one task (``batched=False``) or a stack of
``T`` same-shaped tasks (``batched=True``, every tensor with a leading task dimension). In the stacked mode the
adapted parameters carry a leading task dimension too (``theta.expand(T, ...)`` before the first step, so each
task gets its own gradient), the model runs all tasks at once (its ``forward_tasks`` when it has one: Conv4 as
grouped convolutions; otherwise ``torch.func.vmap`` over tasks), and autograd runs on the sum of the per-task
losses: since tasks do not interact, the gradient of that sum with respect to the ``(T, ...)`` fast weights is
exactly the stack of per-task gradients, and with respect to the shared initialisation it is the sum of the
per-task meta-gradients. Everything else (updates, metrics, checks) is the same arithmetic with or without the task
dimension, so the two modes agree to float rounding.

Nothing here mutates a module or its inputs: parameters come in as a dict, are detached into fresh leaves, and
results come back as new tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from metatrain.models.base import linear_tasks
from metatrain.tasks.episode import Episode
from torch import nn
from torch.func import functional_call, vmap
from torch.utils.checkpoint import checkpoint

from metatrain.pipeline.algorithms.config import AlgorithmConfig
from metatrain.pipeline.algorithms.errors import AlgorithmConfigError, NonFiniteGradientError, TaskMismatchError

Params = dict[str, torch.Tensor]
Metrics = dict[str, float]
Key = tuple[int, int, int]
#: Prefix of the meta-parameters that are not the model's (Meta-SGD's learned inner learning rates).
LR_PREFIX = "inner_lr."
#: Prefix of the head's parameters in a FewShotModel (what ANIL adapts).
HEAD_PREFIX = "head."


@dataclass(frozen=True)
class TaskBatch:
    """Support and query tensors of one task, or of ``T`` stacked tasks (``batched``: leading task dim)."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    batched: bool
    keys: tuple[Key, ...]
    """Episode key per task, for error messages and Reptile's data order."""

    @property
    def n_tasks(self) -> int:
        return int(self.support_x.shape[0]) if self.batched else 1


def as_batch(episode: Episode, batched: bool, keys: Sequence[Key] | None = None) -> TaskBatch:
    """Wrap an :class:`Episode` (a stacked one when ``batched``)."""
    if batched:
        n = int(episode.support_x.shape[0])
        keys = tuple(tuple(k) for k in keys) if keys is not None else tuple((-1, -1, t) for t in range(n))
        if len(keys) != n:
            raise AlgorithmConfigError(f"keys: {len(keys)} episode keys for a stack of {n} tasks")
    else:
        keys = (tuple(episode.key),)
    return TaskBatch(episode.support_x, episode.support_y, episode.query_x, episode.query_y, batched, keys)


def support_only(support: Episode | tuple[torch.Tensor, torch.Tensor], batched: bool = False) -> TaskBatch:
    """A TaskBatch for ``adapt``, which reads only the support set (an Episode, or ``(x, y)``)."""
    if isinstance(support, Episode):
        return as_batch(support, batched)
    x, y = support
    n = int(x.shape[0]) if batched else 1
    # The query fields are never read on this path; the support tensors stand in so the type stays simple.
    return TaskBatch(x, y, x, y, batched, tuple((-1, -1, t) for t in range(n)))


def check_model(model: nn.Module, cfg: AlgorithmConfig, params: Params, steps: int | None = None) -> None:
    """The parameters must be the model's (plus ``inner_lr.*``), and its per-step BN rows must cover ``steps``."""
    own = {k for k, _ in model.named_parameters()}
    given = set(model_params(params))
    if own != given:
        missing, extra = sorted(own - given), sorted(given - own)
        detail = "; ".join(part for part in (f"missing {missing[:3]}" if missing else "",
                                             f"unexpected {extra[:3]}" if extra else "") if part)
        raise AlgorithmConfigError(f"params: not the model's parameters ({detail})")
    have = int(getattr(model, "bn_steps", 1))
    need = cfg.bn_steps_needed
    if cfg.per_step_bn and have < need:
        raise AlgorithmConfigError(f"per_step_bn: the model has bn_steps={have}, these settings need {need} "
                                   f"(max(inner_steps, eval_inner_steps) + 1)")
    if not cfg.per_step_bn and have > 1:
        raise AlgorithmConfigError(f"per_step_bn: the model has bn_steps={have} per-step batch-norm rows; "
                                   f"set per_step_bn: true or build it with bn_steps=1")
    if steps is not None and cfg.per_step_bn and steps + 1 > have:
        raise AlgorithmConfigError(f"steps: {steps} inner steps need {steps + 1} per-step batch-norm rows, the model "
                                   f"has {have}")


def is_classification(model: nn.Module) -> bool:
    return getattr(model, "task", "classification") == "classification"


def check_labels(model: nn.Module, params: Params, batch: TaskBatch, with_query: bool = True) -> None:
    """Labels must suit the loss: int64 in [0, ways) for classification, floating point for regression.

    Checked before any computation, because cross-entropy on an out-of-range label fails deep inside a kernel
    (or, on a GPU, asynchronously with a device assert) with no hint of which episode was wrong.
    """
    pairs = [("support_y", batch.support_y)] + ([("query_y", batch.query_y)] if with_query else [])
    if not is_classification(model):
        for field, y in pairs:
            if not y.is_floating_point():
                raise TaskMismatchError(f"{field}: a regression model needs float targets, got {y.dtype} "
                                        f"(episode {_where(batch)})")
        return
    ways = getattr(model, "ways", None)
    if ways is None and HEAD_PREFIX + "weight" in params:
        ways = params[HEAD_PREFIX + "weight"].shape[0]
    for field, y in pairs:
        if y.is_floating_point() or y.dtype == torch.bool:
            raise TaskMismatchError(f"{field}: a classification model needs integer labels, got {y.dtype} "
                                    f"(episode {_where(batch)})")
        if y.numel() == 0 or ways is None:  # a model that does not say its width: cross-entropy will check
            continue
        ways = int(ways)
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= ways:
            bad = hi if hi >= ways else lo
            raise TaskMismatchError(f"{field}: label {bad} is outside the head's {ways} ways (0..{ways - 1}) "
                                    f"(episode {_where(batch)})")


def _where(batch: TaskBatch, task: int | None = None) -> str:
    if task is not None:
        return str(batch.keys[task])
    return str(batch.keys[0]) if len(batch.keys) == 1 else f"stack of {len(batch.keys)}, keys {batch.keys[0]}..."


def leaves(params: Params) -> Params:
    """Fresh leaf tensors sharing storage with ``params``: gradients go to them, never to the caller's tensors."""
    return {k: v.detach().requires_grad_(True) for k, v in params.items()}


def model_params(params: Params) -> Params:
    """The model's own parameters (without the Meta-SGD rates)."""
    return {k: v for k, v in params.items() if not k.startswith(LR_PREFIX)}


class Functional:
    """A model run on parameter dicts: per task, or vmapped over a task stack (``batched``).

    In batched mode ``task_keys`` names the parameters that carry a leading task dimension (the adapted ones);
    the rest are shared by all tasks (vmap ``in_dims=None``; ``forward_tasks`` tells them apart by their number of
    dimensions), such as ANIL's unadapted body.
    """

    def __init__(self, model: nn.Module, cfg: AlgorithmConfig, batched: bool) -> None:
        self.model, self.batched, self.per_step = model, batched, cfg.per_step_bn
        self.loss_fn = F.cross_entropy if is_classification(model) else F.mse_loss

    def _kwargs(self, step: int) -> dict:
        # Only models built with per-step BN rows take `step`; passing it always would force every user model to
        # accept it.
        return {"step": step} if self.per_step else {}

    def _run(self, module: nn.Module, params: Params, x: torch.Tensor, step: int | None,
             task_keys: frozenset[str], stats_rows: int | None = None) -> torch.Tensor:
        kwargs = {} if step is None else self._kwargs(step)
        if stats_rows is not None:  # the first rows' batch-norm statistics only (query_bn: support)
            kwargs["stats_rows"] = stats_rows
        if not self.batched:
            # strict: every parameter must come from `params`, never silently from the module's own tensors.
            return functional_call(module, params, (x,), kwargs, strict=True)
        # Stacked tasks: the model's own forward_tasks when it has one (Conv4: one grouped convolution per layer,
        # about 2x vmap's speed), a batched matmul for a linear head, else torch.func.vmap over tasks.
        forward_tasks = getattr(module, "forward_tasks", None)
        if forward_tasks is not None:
            return forward_tasks(params, x, **{"step": 0, **kwargs})
        if isinstance(module, nn.Linear):
            return linear_tasks(params["weight"], params.get("bias"), x)
        in_dims = ({k: 0 if k in task_keys else None for k in params}, 0)
        return vmap(lambda p, xx: functional_call(module, p, (xx,), kwargs, strict=True), in_dims=in_dims)(params, x)

    def outputs(self, params: Params, x: torch.Tensor, step: int, task_keys: frozenset[str] = frozenset(),
                stats_rows: int | None = None):
        return self._run(self.model, params, x, step, task_keys, stats_rows)

    def features(self, params: Params, x: torch.Tensor, step: int) -> torch.Tensor:
        """The body's output (shared, unadapted body parameters: ANIL)."""
        body = {k[len("body."):]: v for k, v in params.items() if k.startswith("body.")}
        return self._run(self.model.body, body, x, step, frozenset())

    def head_outputs(self, head: Params, feats: torch.Tensor, task_keys: frozenset[str]) -> torch.Tensor:
        p = {k[len(HEAD_PREFIX):]: v for k, v in head.items()}
        # The head is a plain layer (no per-step rows): it is called without `step`.
        return self._run(self.model.head, p, feats, None, frozenset(k[len(HEAD_PREFIX):] for k in task_keys))

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-task mean loss: a scalar, or ``(T,)`` in batched mode."""
        if not self.batched:
            return self.loss_fn(out, y)
        per_example = self.loss_fn(out.flatten(0, 1), y.flatten(0, 1), reduction="none")
        return per_example.reshape(out.shape[0], -1).mean(1)


def accuracy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-task accuracy (scalar or ``(T,)``)."""
    return (out.argmax(-1) == y).float().mean(-1)


def task_metrics(prefix: str, fn: Functional, out: torch.Tensor, y: torch.Tensor, loss: torch.Tensor | None = None,
                 classification: bool = True) -> Metrics:
    """``<prefix>_loss`` (and ``<prefix>_acc`` for classification), averaged over tasks, as Python floats."""
    with torch.no_grad():
        loss = fn.loss(out, y) if loss is None else loss.detach()
        m = {f"{prefix}_loss": float(loss.mean())}
        if classification:
            m[f"{prefix}_acc"] = float(accuracy(out, y).mean())
    return m


def check_finite(algo: str, where: str, names: Sequence[str], grads: Sequence[torch.Tensor | None],
                 batch: TaskBatch, per_task: bool) -> None:
    """Raise NonFiniteGradientError naming the first non-finite gradient; one device sync when all are fine.

    ``per_task``: the gradients carry the task dimension (batched inner steps), so the offending task is named.
    """
    present = [(n, g) for n, g in zip(names, grads) if g is not None]
    if not present:
        return
    with torch.no_grad():
        # The happy path: one concatenation, one isfinite, one sync (cheaper than a reduction per tensor).
        if bool(torch.isfinite(torch.cat([g.reshape(-1) for _, g in present])).all()):
            return
        ok = [bool(torch.isfinite(g).all()) for _, g in present]
        name, g = next((n, g) for (n, g), good in zip(present, ok) if not good)
        task = None
        if per_task and batch.batched:
            task = int((~torch.isfinite(g)).flatten(1).any(1).nonzero()[0])
        elif not batch.batched:
            task = 0
    bad = ok.count(False)
    raise NonFiniteGradientError(f"{algo}: non-finite gradient for parameter {name!r} at {where} (episode "
                                 f"{_where(batch, task)}; {bad} of {len(ok)} parameters non-finite)")


def expand_for_tasks(params: Params, keys: Sequence[str], batch: TaskBatch) -> Params:
    """In batched mode, give the parameters named in ``keys`` a leading task dimension (views, no copies)."""
    if not batch.batched:
        return dict(params)
    t = batch.n_tasks
    return {k: (v.expand(t, *v.shape) if k in keys else v) for k, v in params.items()}


def _sgd_update(v: torch.Tensor, g: torch.Tensor, lr: float | torch.Tensor) -> torch.Tensor:
    """``v - lr * g``; one fused op (and one backward node) for a float rate, two for a learned (tensor) rate."""
    return torch.add(v, g, alpha=-lr) if isinstance(lr, (int, float)) else torch.addcmul(v, lr, g, value=-1.0)


LossAt = Callable[[Params, int], "tuple[torch.Tensor, torch.Tensor]"]
LrAt = Callable[[str, int], "float | torch.Tensor"]


def sgd_inner_loop(algo: str, cfg: AlgorithmConfig, batch: TaskBatch, fast: Params, adapt_keys: Sequence[str],
                   loss_at: LossAt, steps: int, lr_at: LrAt, create_graph: bool, differentiable: bool = True,
                   allow_checkpoint: bool = True, after_step: Callable[[int, Params], None] | None = None,
                   check_steps: bool = True) -> tuple[Params, tuple[torch.Tensor, torch.Tensor] | None]:
    """``steps`` steps of ``fast[k] -= lr_at(k, s) * grad_k`` on the support loss, for the keys in ``adapt_keys``.

    ``loss_at(fast, s)`` returns the support loss (per task) and the outputs at inner step ``s``. With
    ``create_graph`` the updates stay differentiable (second-order MAML); without, the inner gradients are
    constants, so the graph from the result back to ``fast`` is just the identity plus the learned-rate products
    (first-order). ``differentiable=False`` (evaluation) cuts the graph after every step so that nothing but the
    current parameters is kept. ``after_step(s, fast)`` sees the parameters after step ``s`` (1-based), for the
    multi-step loss. Returns the adapted parameters and the (detached) support loss and outputs *before* adaptation.
    ``check_steps`` (with ``cfg.check_finite``) checks every step's gradients; meta-training turns it off and
    checks only the meta-gradient, into which any NaN/Inf of the inner loop propagates (see
    :func:`with_diagnosis`).
    """
    adapt_keys = list(adapt_keys)
    first = None
    if not differentiable and create_graph:
        raise ValueError("create_graph needs differentiable=True")
    # Checkpointing only saves something when the step's graph is kept (second order).
    use_checkpoint = cfg.checkpoint_inner and allow_checkpoint and create_graph and torch.is_grad_enabled()
    for s in range(steps):
        # `fast` and `s` are bound now: a checkpointed step is re-run during the backward pass, when the loop
        # variables have long moved on.
        def step(*values: torch.Tensor, s: int = s, fast: Params = fast):
            current = {**fast, **dict(zip(adapt_keys, values))}
            loss, out = loss_at(current, s)
            # Summing per-task losses gives per-task gradients w.r.t. (T, ...) fast weights (tasks are independent).
            grads = torch.autograd.grad(loss.sum(), values, create_graph=create_graph)
            new = tuple(_sgd_update(v, g, lr_at(k, s)) for k, v, g in zip(adapt_keys, values, grads))
            return new, grads, loss.detach(), out.detach()

        values = tuple(fast[k] for k in adapt_keys)
        if not differentiable:
            values = tuple(v.detach().requires_grad_(True) for v in values)
        if use_checkpoint:
            # Non-reentrant checkpoint: keeps only this step's inputs; the support forward, its backward and the
            # update are recomputed when the meta-gradient passes through (PyTorch >= 2.1 supports the
            # autograd.grad(create_graph=True) inside the checkpointed region).
            new, grads, loss, out = checkpoint(step, *values, use_reentrant=False)
        else:
            new, grads, loss, out = step(*values)
        if cfg.check_finite and check_steps:
            check_finite(algo, f"inner step {s}", adapt_keys, grads, batch, per_task=True)
        del grads
        if not differentiable:
            new = tuple(v.detach() for v in new)
        if first is None:
            first = (loss, out)
        fast = {**fast, **dict(zip(adapt_keys, new))}
        if after_step is not None:
            after_step(s + 1, fast)
    return fast, first


def with_diagnosis(compute: Callable[[bool], tuple[Params, Metrics]]) -> tuple[Params, Metrics]:
    """Run ``compute(diagnose=False)``; if its meta-gradient is NaN/Inf, run ``compute(diagnose=True)``, which checks
    every inner step too, so the error names the first step and parameter that went non-finite.

    A NaN or Inf anywhere in the inner loop reaches the adapted parameters and from there the meta-gradient, so
    checking only the meta-gradient on the happy path loses nothing; the (deterministic) re-run is paid only when
    training is already broken.
    """
    try:
        return compute(False)
    except NonFiniteGradientError:
        return compute(True)


def meta_grads(algo: str, cfg: AlgorithmConfig, batch: TaskBatch, meta_loss: torch.Tensor, wrt: Params) -> Params:
    """d meta_loss / d wrt, zeros where a parameter does not reach the loss, checked for NaN/Inf."""
    names = list(wrt)
    grads = torch.autograd.grad(meta_loss, [wrt[k] for k in names], allow_unused=True)
    out = {k: (g if g is not None else torch.zeros_like(wrt[k])) for k, g in zip(names, grads)}
    if cfg.check_finite:
        check_finite(algo, "the meta-gradient", names, [out[k] for k in names], batch, per_task=False)
    return out


def msl_loss(cfg: AlgorithmConfig, losses: dict[int, torch.Tensor]) -> torch.Tensor:
    """Weighted sum of the query losses after each step (only the last one unless multi_step_loss)."""
    w = cfg.loss_weights
    return sum(w[s - 1] * losses[s].sum() for s in losses if w[s - 1] != 0.0)


def key_seed(key: Key) -> int:
    """A stable 63-bit seed from an episode key (Python's hash() of a tuple is not stable across processes)."""
    seed = 0
    for part in key:
        seed = (seed * 1_000_003 + int(part) + 0x9E3779B9) % (2**63 - 1)
    return seed



# ---------------------------------------------------------------------------------------------------------------
# The MAML family (maml, fomaml, metasgd, anil): the same three functions, parameterised by a GradientSpec.
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GradientSpec:
    """What distinguishes one SGD-inner-loop algorithm from another."""

    algo: str
    """Name used in error messages."""
    second_order: Callable[[AlgorithmConfig], bool]
    """Whether the inner updates are differentiated through (create_graph) during meta-training."""
    adapt_keys: Callable[[Params], list[str]]
    """Which model parameters the inner loop changes (all; ANIL: the head's)."""
    lr_at: Callable[[Params, AlgorithmConfig], LrAt]
    """The inner step size for parameter ``k`` at step ``s`` (a float, or Meta-SGD's learned tensors)."""
    head_only: bool = False
    """ANIL: run the (unadapted) body once per step index and only the head inside the inner loop. Such an inner
    loop stores only head-sized tensors, so ``checkpoint_inner`` has nothing to save and is not applied (the
    features are also computed lazily, once, which a recomputing checkpoint would not reproduce)."""


def fixed_lr(params: Params, cfg: AlgorithmConfig) -> LrAt:  # noqa: ARG001 - uniform signature
    lr = float(cfg.inner_lr)
    return lambda key, step: lr


def all_keys(params: Params) -> list[str]:
    return list(params)


def _loss_at(spec: GradientSpec, fn: Functional, shared: Params, x: torch.Tensor, y: torch.Tensor,
             task_keys: frozenset[str]) -> LossAt:
    """``(fast, step) -> (per-task loss, outputs)`` on one split (support or query)."""
    if not spec.head_only:
        def loss_at(fast: Params, step: int):
            out = fn.outputs(fast, x, step, task_keys)
            return fn.loss(out, y), out
        return loss_at

    # ANIL: the body is not adapted, so its features depend only on the step index, and only on that when the
    # model has per-step BN rows: compute them once per distinct index, from the shared (initial) parameters.
    cache: dict[int, torch.Tensor] = {}

    def loss_at(fast: Params, step: int):
        s = step if fn.per_step else 0
        if s not in cache:
            cache[s] = fn.features(shared, x, s)
        out = fn.head_outputs({k: v for k, v in fast.items() if k.startswith(HEAD_PREFIX)}, cache[s], task_keys)
        return fn.loss(out, y), out
    return loss_at


def _prepare(spec: GradientSpec, params: Params, batch: TaskBatch, cfg: AlgorithmConfig, model: nn.Module,
             with_query: bool, steps: int) -> tuple[Functional, Params, list[str], frozenset[str]]:
    check_model(model, cfg, params, steps)
    check_labels(model, params, batch, with_query=with_query)
    keys = spec.adapt_keys(model_params(params))
    if not keys:
        raise AlgorithmConfigError(f"name: {spec.algo} found no parameters to adapt in the model")
    fn = Functional(model, cfg, batch.batched)
    return fn, params, keys, frozenset(keys) if batch.batched else frozenset()


def gradient_meta_gradient(spec: GradientSpec, params: Params, batch: TaskBatch, cfg: AlgorithmConfig,
                           model: nn.Module) -> tuple[Params, Metrics]:
    """Meta-gradient (summed over the tasks in ``batch``) and task-averaged metrics for a MAML-family method."""
    return with_diagnosis(lambda diagnose: _gradient_meta_gradient(spec, params, batch, cfg, model, diagnose))


def _gradient_meta_gradient(spec: GradientSpec, params: Params, batch: TaskBatch, cfg: AlgorithmConfig,
                            model: nn.Module, diagnose: bool) -> tuple[Params, Metrics]:
    fn, _, keys, task_keys = _prepare(spec, params, batch, cfg, model, with_query=True, steps=cfg.inner_steps)
    p = leaves(params)
    mp = model_params(p)
    support_at = _loss_at(spec, fn, mp, batch.support_x, batch.support_y, task_keys)
    query_at = _loss_at(spec, fn, mp, batch.query_x, batch.query_y, task_keys)
    k, weights = cfg.inner_steps, cfg.loss_weights
    query_losses: dict[int, torch.Tensor] = {}

    def after_step(s: int, fast: Params) -> None:
        # Multi-step loss (MAML++): the query loss after every intermediate step with a non-zero weight.
        if s < k and weights[s - 1] != 0.0:
            query_losses[s] = query_at(fast, s)[0]

    fast, first = sgd_inner_loop(spec.algo, cfg, batch, expand_for_tasks(mp, keys, batch), keys, support_at, k,
                                 spec.lr_at(p, cfg), create_graph=spec.second_order(cfg),
                                 allow_checkpoint=not spec.head_only, after_step=after_step, check_steps=diagnose)
    query_loss, query_out = query_at(fast, k)
    query_losses[k] = query_loss
    grads = meta_grads(spec.algo, cfg, batch, msl_loss(cfg, query_losses), p)
    cls = is_classification(model)
    metrics = {**task_metrics("support", fn, first[1], batch.support_y, first[0], cls),
               **task_metrics("query", fn, query_out, batch.query_y, query_loss, cls)}
    return grads, metrics


def gradient_adapt(spec: GradientSpec, params: Params, batch: TaskBatch, cfg: AlgorithmConfig, model: nn.Module,
                   steps: int, create_graph: bool) -> Params:
    """The adapted parameters (all keys of ``params``; in batched mode adapted ones have a task dimension)."""
    if steps < 0:
        raise AlgorithmConfigError(f"steps: must be >= 0, got {steps}")
    fn, _, keys, task_keys = _prepare(spec, params, batch, cfg, model, with_query=False, steps=steps)
    if create_graph:
        # Differentiable w.r.t. the caller's tensors (composable, e.g. under an outer autograd.grad).
        p = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in params.items()}
    else:
        p = {k: v.detach() for k, v in params.items()}
    mp = model_params(p)
    support_at = _loss_at(spec, fn, mp, batch.support_x, batch.support_y, task_keys)
    with torch.enable_grad():
        fast, _ = sgd_inner_loop(spec.algo, cfg, batch, expand_for_tasks(mp, keys, batch), keys, support_at,
                                 steps, spec.lr_at(p, cfg), create_graph=create_graph, differentiable=create_graph)
    return {**p, **fast}


def gradient_evaluate(spec: GradientSpec, params: Params, batch: TaskBatch, cfg: AlgorithmConfig,
                      model: nn.Module, steps: int) -> Metrics:
    """Adapt with ``steps`` plain inner steps (no meta-gradient graph) and score the query set."""
    if steps < 0:
        raise AlgorithmConfigError(f"steps: must be >= 0, got {steps}")
    fn, _, keys, task_keys = _prepare(spec, params, batch, cfg, model, with_query=True, steps=steps)
    p = {k: v.detach() for k, v in params.items()}
    mp = model_params(p)
    support_at = _loss_at(spec, fn, mp, batch.support_x, batch.support_y, task_keys)
    query_at = _loss_at(spec, fn, mp, batch.query_x, batch.query_y, task_keys)
    with torch.enable_grad():
        fast, first = sgd_inner_loop(spec.algo, cfg, batch, expand_for_tasks(mp, keys, batch), keys, support_at,
                                     steps, spec.lr_at(p, cfg), create_graph=False, differentiable=False)
    with torch.no_grad():
        if first is None:  # zero steps: the pre-adaptation support metrics still get reported
            first = support_at(fast, 0)
        query_loss, query_out = query_at(fast, steps)
    cls = is_classification(model)
    return {**task_metrics("support", fn, first[1], batch.support_y, first[0], cls),
            **task_metrics("query", fn, query_out, batch.query_y, query_loss, cls)}
