"""Learning to learn by gradient descent by gradient descent (Andrychowicz et al. 2016): the update rule of an
optimizee is a coordinate-wise LSTM (:class:`~models.learned_optimizer.CoordinateLSTM`, 2 layers of 20 units),
trained on the sum of the optimizee's losses along its trajectory.

    theta_{t+1} = theta_t + g_t,   [g_t, h_{t+1}] = m(grad f(theta_t), h_t; phi)
    L(phi) = sum_t f_t(theta_t)                                   (w_t = 1 for every t, as the paper)

The optimizee's gradient enters the LSTM as a constant (the paper drops the second derivatives): what is
differentiated is the chain theta_t -> theta_{t+1} through the updates. One forward per step serves both: the loss at
theta_t is in the graph (its meta-gradient flows through theta_t), and its gradient w.r.t. theta_t is taken from the
same graph and detached. The unroll of ``unroll`` steps is cut every ``truncation`` steps (truncated BPTT: theta and
the LSTM state are detached at the window's start, so memory stays at one window's).

Through the parameter server (``algorithm.name: l2l_gd``), one slot is one optimizee trajectory: the worker unrolls
it with the optimizer weights of the current version and returns the SUM of its windows' meta-gradients, all taken
at those weights (``server_update: trajectory``); the server averages the trajectories of a step and takes one Adam
step. The paper instead applies an Adam step after every window, so later windows of a trajectory see updated
weights; ``train_in_process(..., per_window=True)`` does that in one process. ``server_update: window`` is that
through the server: a trajectory spans as many consecutive steps as it has windows, and at each step the worker
replays the trajectory up to the step's window with the current weights (no graph) and returns that window's
gradient, so a task stays a pure function of (seed, step, slot) and the weights (any worker recomputes a lost
slot), at the cost of the replay; where the paper's window k starts from the state earlier weights left, here it
starts from the state the current weights reach. bench/learned_optimizer.py trains every way on the same
optimizees and reports them. The network of the run is the optimizer itself (``model.name: coordinate_lstm``, its
weights the meta-parameters under their module names); ``evaluate`` runs it ``unroll`` steps on a held-out
optimizee and reports the final loss. A trained run is used through :class:`pipeline.learned_optimizer.
LearnedOptimizer` (``run=`` or ``model=``); MLflow serves one packed step (:class:`~models.PackedOptimizerStep`).

    >>> from metatrain.tasks.optimizees import QuadraticSampler
    >>> opt = CoordinateLSTM(hidden=20, layers=2)          # the computation; its weights come from a dict
    >>> phi = fresh_weights(opt, seed=0)
    >>> grads, metrics = trajectory_gradient(phi, QuadraticSampler(seed=0).task(0, 0), opt, unroll=100, truncation=20)
    >>> grads, metrics = meta_gradient(phi, QuadraticSampler(seed=0).task(0, 0), AlgorithmConfig(name="l2l_gd"), opt)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from metatrain.models import CoordinateLSTM, PackedOptimizerStep, ParamLayout
from metatrain.models.learned_optimizer import LSTMState
from torch import nn
from torch.func import functional_call

from metatrain.pipeline.algorithms.config import AlgorithmConfig
from metatrain.pipeline.algorithms.errors import AlgorithmConfigError
from metatrain.pipeline.algorithms.record import AlgorithmRecord

if TYPE_CHECKING:
    from metatrain.pipeline.config import Config

Params = dict[str, torch.Tensor]


def build_optimizer(cfg: Config, shape: None) -> CoordinateLSTM:  # noqa: ARG001 - the builders' signature
    """The run's network: the coordinate-wise LSTM (``lstm_layers`` x ``lstm_hidden``, ``lstm_p``, ``output_scale``)."""
    a = cfg.algorithm
    return CoordinateLSTM(hidden=a.lstm_hidden, layers=a.lstm_layers, output_scale=a.output_scale, p=a.lstm_p)


RECORD = AlgorithmRecord(name="l2l_gd", family="learned", models=("coordinate_lstm",), predict="none",
                         adapts_weights=False, metrics=("meta_loss", "loss_first", "loss_last"),
                         shape_fields=("lstm_hidden", "lstm_layers"), optimizee_tasks=True,
                         serve=PackedOptimizerStep, builder=build_optimizer,
                         forbidden=(("first_order", "l2l_gd is first-order by construction (the optimizee's "
                                                    "gradients are inputs); leave first_order unset"),
                                    ("multi_step_loss", "l2l_gd's meta-loss is already the sum over the unroll"),
                                    ("per_step_bn", "l2l_gd's optimizer has no batch norm")))
NAME = RECORD.name


def check_unroll(unroll: int, truncation: int) -> None:
    """An unroll must hold at least one whole truncation window (one line naming both fields otherwise)."""
    for name, v in (("unroll", unroll), ("truncation", truncation)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise AlgorithmConfigError(f"{name}: must be an integer >= 1, got {v!r}")
    if unroll < truncation:
        raise AlgorithmConfigError(f"unroll: {unroll} steps is shorter than its truncation window of {truncation}")


def fresh_weights(opt: CoordinateLSTM, seed: int | None = None) -> Params:
    """A new draw of the optimizer's weights (PyTorch's LSTM initialisation), detached."""
    gen_state = torch.random.get_rng_state()
    try:
        if seed is not None:
            torch.manual_seed(seed)
        fresh = CoordinateLSTM(hidden=opt.hidden, layers=opt.layers, output_scale=opt.output_scale, p=opt.p)
    finally:
        torch.random.set_rng_state(gen_state)
    return {k: v.detach().clone() for k, v in fresh.named_parameters()}


def check_weights(phi: Mapping[str, torch.Tensor], opt: CoordinateLSTM, source: str = "weights") -> None:
    """The weights must be this optimizer's, name for name and shape for shape (a checkpoint of another size)."""
    want = {k: tuple(v.shape) for k, v in opt.named_parameters()}
    got = {k: tuple(v.shape) for k, v in phi.items()}
    if want != got:
        bad = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])
        k = bad[0]
        raise AlgorithmConfigError(f"{source}: not the weights of a {opt.layers}-layer, {opt.hidden}-unit "
                                   f"coordinate-wise LSTM ({k}: {got.get(k, 'missing')} where it needs "
                                   f"{want.get(k, 'nothing')})")


def _start(phi: Params, task, opt: CoordinateLSTM) -> tuple[torch.Tensor, ParamLayout, LSTMState]:
    """(theta_0 flat, on the optimizer's device, its layout, the LSTM's zero state)."""
    device = next(iter(phi.values())).device
    start = {k: v.detach().to(device, torch.float32) for k, v in task.init_params().items()}
    layout = ParamLayout.of(start)
    theta = layout.flatten(start)
    return theta, layout, opt.init_state(layout.numel, device=device, dtype=theta.dtype)


def _step(opt: CoordinateLSTM, phi: Params, task, layout: ParamLayout, theta: torch.Tensor, state: LSTMState,
          t: int, differentiable: bool) -> tuple[torch.Tensor, LSTMState, torch.Tensor]:
    """One optimizer step: (theta_{t+1}, state, loss at theta_t) with the loss in the graph iff differentiable."""
    with torch.enable_grad():
        x = theta if differentiable and theta.requires_grad else theta.detach().requires_grad_(True)
        loss = task.loss(layout.unflatten(x), t)
        (grad,) = torch.autograd.grad(loss, x, retain_graph=differentiable)
    with torch.set_grad_enabled(differentiable):
        update, state = functional_call(opt, phi, (grad.detach(), state))
    return theta + update, state, loss


def windows(unroll: int, truncation: int) -> int:
    """Truncation windows of an unroll (the last one may be shorter)."""
    return -(-unroll // truncation)


def trajectory_gradient(phi: Params, task, opt: CoordinateLSTM, *, unroll: int, truncation: int,
                        per_window: Callable[[Params], None] | None = None, only_window: int | None = None
                        ) -> tuple[Params, dict]:
    """Meta-gradient of one optimizee trajectory: the sum over its truncation windows of d(sum of losses)/d phi.

    ``per_window(grads)``, when given, is called after each window with that window's gradient and may update
    ``phi`` in place (the paper's update after every window); the returned sum is then for reference only.
    ``only_window=k``: the gradient of window k alone, the steps before it replayed with ``phi`` and no graph (the
    server's per-window mode: a pure function of the task and the weights, so any worker recomputes it).
    Metrics: ``loss_first``, ``loss_last`` (the optimizee's loss at the first and the last step), ``meta_loss``
    (the mean loss over the steps differentiated).
    """
    check_unroll(unroll, truncation)
    check_weights(phi, opt)
    count = windows(unroll, truncation)
    if only_window is not None and not 0 <= only_window < count:
        raise AlgorithmConfigError(f"only_window: {only_window} is not one of the {count} windows of this unroll")
    theta, layout, state = _start(phi, task, opt)
    total = {k: torch.zeros_like(v) for k, v in phi.items()}
    losses: list[float] = []
    names = list(phi)
    for index, begin in enumerate(range(0, unroll, truncation)):
        if only_window is not None and index != only_window:
            if index > only_window:
                break
            for t in range(begin, begin + truncation):  # replay: where this optimizer takes theta by window k
                theta, state, _ = _step(opt, phi, task, layout, theta.detach(), state, t, differentiable=False)
            continue
        leaves = {k: phi[k].detach().requires_grad_(True) for k in names}
        theta, state = theta.detach(), state.detach()  # the truncation: no gradient into earlier windows
        window = torch.zeros((), dtype=theta.dtype, device=theta.device)
        for t in range(begin, min(begin + truncation, unroll)):
            theta, state, loss = _step(opt, leaves, task, layout, theta, state, t, differentiable=True)
            window = window + loss
            losses.append(float(loss.detach()))
        if not window.requires_grad:  # the first window's first loss does not depend on phi; later ones do
            continue
        grads = torch.autograd.grad(window, [leaves[k] for k in names], allow_unused=True)
        grads = {k: (g if g is not None else torch.zeros_like(phi[k])) for k, g in zip(names, grads)}
        bad = next((k for k, g in grads.items() if not torch.isfinite(g).all()), None)
        if bad is not None:
            raise AlgorithmConfigError(f"l2l_gd: non-finite meta-gradient for {bad!r} in the window at step {begin} "
                                       f"(optimizee {getattr(task, 'key', '?')}); lower optim.lr or "
                                       f"algorithm.truncation")
        for k in names:
            total[k] += grads[k]
        if per_window is not None:
            per_window(grads)
    return total, {"loss_first": losses[0], "loss_last": losses[-1], "meta_loss": sum(losses) / len(losses)}


def optimize(phi: Params, task, opt: CoordinateLSTM, steps: int) -> tuple[list[float], Params]:
    """Run the learned optimizer for ``steps`` steps on ``task`` without any meta-gradient graph.

    Returns the optimizee's loss at every step 0..steps (``task.eval_loss``, the whole training set for an MLP) and
    its final parameters.
    """
    check_weights(phi, opt)
    theta, layout, state = _start(phi, task, opt)
    curve = []
    for t in range(steps):
        with torch.no_grad():
            curve.append(float(task.eval_loss(layout.unflatten(theta))))
        theta, state, _ = _step(opt, phi, task, layout, theta.detach(), state, t, differentiable=False)
        theta = theta.detach()
    with torch.no_grad():
        curve.append(float(task.eval_loss(layout.unflatten(theta))))
    return curve, layout.unflatten(theta)


def train_in_process(phi: Params, tasks: Iterable, opt: CoordinateLSTM, *, unroll: int, truncation: int,
                     lr: float = 1e-3, per_window: bool = False, meta_batch: int = 1) -> tuple[Params, list[float]]:
    """Train the optimizer's weights with Adam on ``tasks`` in this process (what bench/learned_optimizer.py runs).

    ``per_window=False``: one Adam step per ``meta_batch`` trajectories on their summed window gradients, averaged
    over trajectories, as the parameter server applies them. ``per_window=True``: the paper's Adam step after
    every truncation window. Returns the trained weights and the mean loss per trajectory.
    """
    weights = {k: v.detach().clone().requires_grad_(True) for k, v in phi.items()}
    adam = torch.optim.Adam(list(weights.values()), lr=lr)

    def apply(grads: Params, scale: float = 1.0) -> None:
        for k, w in weights.items():
            w.grad = grads[k] * scale
        adam.step()
        adam.zero_grad(set_to_none=True)

    history, pending, count = [], None, 0
    for task in tasks:
        detached = {k: w.detach() for k, w in weights.items()}
        if per_window:
            def step_now(g: Params, live: Params = detached) -> None:
                apply(g)
                for k in live:  # later windows of this trajectory use the updated weights
                    live[k] = weights[k].detach()
            # `detached` is the dict each window reads its weights from: step_now refreshes it in place.
            _, metrics = trajectory_gradient(detached, task, opt, unroll=unroll, truncation=truncation,
                                             per_window=step_now)
        else:
            g, metrics = trajectory_gradient(detached, task, opt, unroll=unroll, truncation=truncation)
            pending = g if pending is None else {k: pending[k] + g[k] for k in g}
            count += 1
            if count == meta_batch:
                apply(pending, 1.0 / count)
                pending, count = None, 0
        history.append(metrics["meta_loss"])
    return {k: w.detach() for k, w in weights.items()}, history


def log10(x: float) -> float:
    """log10 of a loss, -inf at exactly 0 (a quadratic can reach it), for the bench's tables."""
    return math.log10(x) if x > 0 else float("-inf")


# --------------------------------------------------------------------------------------------------------------
# The uniform algorithm interface (pipeline.algorithms): a task is one optimizee, the params are the optimizer's
# --------------------------------------------------------------------------------------------------------------

def init_extra_params(model: nn.Module, cfg: AlgorithmConfig) -> Params:  # noqa: ARG001 - uniform interface
    """None: the optimizer's weights are the network's own parameters."""
    return {}


def _weights(params: Params) -> Params:
    return {k: v.detach() for k, v in params.items()}


def adapt(params: Params, support, cfg: AlgorithmConfig, model: nn.Module, *, steps: int | None = None,
          create_graph: bool = False, batched: bool = False) -> Params:
    """The optimizee's parameters after ``steps`` (default ``unroll``) learned updates (``support`` is the task)."""
    if create_graph or batched:
        raise AlgorithmConfigError("l2l_gd adapts one optimizee at a time, without a meta-gradient graph "
                                   "(meta_gradient differentiates its unroll)")
    return optimize(_weights(params), support, model, cfg.unroll if steps is None else steps)[1]


def meta_gradient(params: Params, task, cfg: AlgorithmConfig, model: nn.Module) -> tuple[Params, dict]:
    """The trajectory's meta-gradient (its truncation windows summed, all at ``params``) and its losses; for an
    :class:`~tasks.optimizees.OptimizeeWindow` (``server_update: window``) that window's alone."""
    window = getattr(task, "window", None)
    return trajectory_gradient(_weights(params), getattr(task, "task", task), model, unroll=cfg.unroll,
                               truncation=cfg.truncation, only_window=window)


def meta_gradient_batched(params: Params, stacked, cfg: AlgorithmConfig, model: nn.Module,
                          keys: Sequence | None = None) -> tuple[Params, dict]:
    """Not offered: optimizees do not stack (the record's ``optimizee_tasks`` keeps the workers on the loop)."""
    raise AlgorithmConfigError("task_batching: l2l_gd runs one optimizee at a time (each is already batched over "
                               "its coordinates); use loop or auto")


def evaluate(params: Params, task, cfg: AlgorithmConfig, model: nn.Module, *, steps: int | None = None,
             batched: bool = False, keys: Sequence | None = None) -> dict:
    """Run the optimizer ``steps`` (default ``unroll``) steps on the optimizee; its losses (``eval_loss``: the whole
    training set for an MLP) at the start and the end, their log10, and the mean over the curve."""
    if batched:
        raise AlgorithmConfigError("task_batching: l2l_gd evaluates one optimizee at a time")
    curve, final = optimize(_weights(params), task, model, cfg.unroll if steps is None else steps)
    out = {"initial_loss": curve[0], "final_loss": curve[-1], "log10_final_loss": log10(curve[-1]),
           "mean_loss": sum(curve) / len(curve)}
    if hasattr(task, "accuracy"):  # a classifier optimizee: how well the optimized MLP classifies its examples
        out["final_acc"] = task.accuracy(final)
    return out
