"""Coordinate-wise learned optimizers: the LSTM of Andrychowicz et al. 2016 ("Learning to learn by gradient descent
by gradient descent") and the meta cell of Ravi & Larochelle 2017 ("Optimization as a model for few-shot learning").

Both read one coordinate of the optimizee at a time, with weights shared by every coordinate, so a model's
parameters are flattened into one ``(N,)`` vector (``ParamLayout``) and every step is one batched LSTM-cell call per
layer over all N coordinates: the cell's batch dimension IS the coordinate dimension.

    preprocess     x -> (log|x| / p, sign x)   if |x| >= e^-p
                        (-1, e^p x)             otherwise                  (continuous: both are (-1, +-1) at e^-p)
    CoordinateLSTM g_t = scale * W_o h_t,  h_t = LSTM^layers(preprocess(grad_t) [, preprocess(loss_t)])
                   theta_{t+1} = theta_t + g_t                             (the caller adds the update)
    MetaLSTMCell   h_t = LSTM([preprocess(loss_t), preprocess(grad_t)])
                   f_t = sigmoid(W_F [h_t, c_{t-1}, f_{t-1}] + b_F),  i_t = sigmoid(W_I [h_t, c_{t-1}, i_{t-1}] + b_I)
                   c_t = f_t * c_{t-1} + i_t * (-grad_t)                   (c_t is the learner's flat parameters)

With f = 1 and i = lr the meta cell is plain SGD. The inputs are taken as given: both papers treat the optimizee's
gradient and loss as independent of the optimizer's weights (no second derivatives), so callers pass them detached;
what is then differentiated is the chain of updates (CoordinateLSTM) or of cell states (MetaLSTMCell). That is where
the meta cell differs from MAML, which differentiates through the inner gradients (the Hessian term) and learns only
the initialisation, with a fixed update rule. The learned c_0 (the learner's initialisation) belongs to the algorithm
that owns this cell, not to the cell.

    >>> layout = ParamLayout.of(dict(model.named_parameters()))
    >>> opt = CoordinateLSTM()                                   # 2 x 20 units, p = 10, scale 0.1
    >>> state = opt.init_state(layout.numel)
    >>> update, state = opt(layout.flatten({k: p.grad for k, p in model.named_parameters()}), state)
    >>> new_params = layout.unflatten(layout.flatten(dict(model.named_parameters())) + update)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from metatrain.models.base import ModelConfigError
from torch import nn

DEFAULT_P = 10.0
"""p = 10 is what Andrychowicz et al.'s paper says and what Ravi & Larochelle's code uses on loss and gradient;
DeepMind's learning-to-learn code uses k = 5 (shared/notes/seed-systems.md): pass ``p=5.0`` to match that code.
10 is the default because both methods were published with it, and it keeps gradients down to e^-10 = 4.5e-5 on the
log scale, where p = 5 sends everything below e^-5 = 6.7e-3 to the linear branch."""


def preprocess(x: torch.Tensor, p: float = DEFAULT_P) -> torch.Tensor:
    """The log/sign preprocessing of Andrychowicz et al.: ``x`` of any shape -> ``(*x.shape, 2)``.

    The gradient is finite everywhere (0 included): log is taken of |x| clamped at e^-p, so the branch that
    ``torch.where`` discards never holds -inf (a discarded -inf still turns the backward pass into NaN).
    """
    if not p > 0:
        raise ModelConfigError(f"p: must be > 0, got {p!r}")
    eps = math.exp(-p)
    big = x.abs() >= eps
    log_part = torch.where(big, x.abs().clamp_min(eps).log() / p, -1.0)
    sign_part = torch.where(big, torch.sign(x), x * math.exp(p))
    return torch.stack([log_part, sign_part], dim=-1)


def _loss_input(loss: torch.Tensor | float, n: int, p: float, like: torch.Tensor) -> torch.Tensor:
    """The preprocessed scalar loss, broadcast to every coordinate: ``(n, 2)`` (a view, no copy per coordinate)."""
    loss = torch.as_tensor(loss, dtype=like.dtype, device=like.device)
    if loss.numel() != 1:
        raise ValueError(f"loss: expected a scalar, got shape {tuple(loss.shape)}")
    return preprocess(loss.reshape(()), p).expand(n, 2)


def _check_flat(grad: torch.Tensor, n: int) -> None:
    if grad.dim() != 1:
        raise ValueError(f"grad: expected a flat (N,) vector (see ParamLayout.flatten), got shape {tuple(grad.shape)}")
    if grad.shape[0] != n:
        raise ValueError(f"grad has {grad.shape[0]} coordinates but the state was made for {n}")


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of a parameter dict, in order: flattens it to one ``(N,)`` vector and back."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, params: Mapping[str, torch.Tensor]) -> ParamLayout:
        return cls(tuple(params), tuple(t.shape for t in params.values()))

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One ``(N,)`` vector in this layout's order (differentiable); the names must be exactly this layout's."""
        if set(tensors) != set(self.names):
            raise ValueError(f"expected tensors named {sorted(self.names)}, got {sorted(tensors)}")
        for name, shape in zip(self.names, self.shapes):
            if tensors[name].shape != shape:
                raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(tensors[name].shape)}")
        return torch.cat([tensors[name].reshape(-1) for name in self.names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The dict back from a flat vector: views into ``flat``, so gradients flow to it."""
        if flat.shape != (self.numel,):
            raise ValueError(f"expected a flat vector of {self.numel} coordinates, got shape {tuple(flat.shape)}")
        chunks = torch.split(flat, [math.prod(s) for s in self.shapes])
        return {name: c.view(shape) for name, c, shape in zip(self.names, chunks, self.shapes)}


@dataclass(frozen=True)
class LSTMState:
    """Per-coordinate state of a stack of LSTM cells: ``h[l]`` and ``c[l]`` are ``(N, hidden)`` for layer l."""

    h: tuple[torch.Tensor, ...]
    c: tuple[torch.Tensor, ...]

    def detach(self) -> LSTMState:
        """Cut the graph here: at every truncation boundary, or memory grows with the whole unroll."""
        return LSTMState(tuple(t.detach() for t in self.h), tuple(t.detach() for t in self.c))


def _like(ref: torch.Tensor, device: torch.device | str | None, dtype: torch.dtype | None) -> dict:
    return {"device": ref.device if device is None else device, "dtype": ref.dtype if dtype is None else dtype}


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelConfigError(f"{name}: must be an integer >= 1, got {value!r}")


class CoordinateLSTM(nn.Module):
    """Andrychowicz et al.'s optimizer: ``layers`` LSTM cells of ``hidden`` units and a linear output, per coordinate.

    ``use_loss`` adds the preprocessed loss (the same for every coordinate) to the input, as Ravi & Larochelle do;
    Andrychowicz et al. read the gradient alone (the default). ``output_scale`` multiplies the output so that a
    fresh optimizer takes small steps: 0.1 by default; DeepMind's code uses 0.01 (shared/notes/seed-systems.md).
    It sets the step size the untrained optimizer starts from, so the algorithm that trains it should expose it.
    """

    def __init__(self, hidden: int = 20, layers: int = 2, output_scale: float = 0.1, p: float = DEFAULT_P,
                 use_loss: bool = False) -> None:
        super().__init__()
        _check_sizes(hidden=hidden, layers=layers)
        if not (isinstance(output_scale, (int, float)) and math.isfinite(output_scale) and output_scale > 0):
            raise ModelConfigError(f"output_scale: must be a finite number > 0, got {output_scale!r}")
        preprocess(torch.zeros(()), p)  # validates p now, not at the first step
        self.hidden, self.layers, self.output_scale, self.p, self.use_loss = hidden, layers, output_scale, p, use_loss
        in_size = 4 if use_loss else 2
        self.cells = nn.ModuleList(nn.LSTMCell(in_size if i == 0 else hidden, hidden) for i in range(layers))
        self.out = nn.Linear(hidden, 1)

    def reset_parameters(self) -> None:
        """Redraw every weight from the global generator, in construction order (so a seeded reset draws what a
        seeded construction does)."""
        for cell in self.cells:
            cell.reset_parameters()
        self.out.reset_parameters()

    def init_state(self, n_coords: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> LSTMState:
        """Zero hidden and cell state for ``n_coords`` coordinates (the optimizer's dtype and device by default)."""
        _check_sizes(n_coords=n_coords)
        kw = _like(self.out.weight, device, dtype)
        zeros = lambda: torch.zeros(n_coords, self.hidden, **kw)
        return LSTMState(tuple(zeros() for _ in range(self.layers)), tuple(zeros() for _ in range(self.layers)))

    def forward(self, grad: torch.Tensor, state: LSTMState,
                loss: torch.Tensor | float | None = None) -> tuple[torch.Tensor, LSTMState]:
        """(update ``(N,)`` to add to the flat parameters, new state) from the flat gradient ``(N,)``."""
        _check_flat(grad, state.h[0].shape[0])
        if self.use_loss != (loss is not None):
            raise ValueError("loss: required when use_loss=True, and not accepted otherwise (it would be ignored)")
        x = preprocess(grad, self.p)
        if loss is not None:
            x = torch.cat([_loss_input(loss, grad.shape[0], self.p, grad), x], dim=-1)
        hs, cs = [], []
        for cell, h, c in zip(self.cells, state.h, state.c):  # over layers; each call covers all N coordinates
            h, c = cell(x, (h, c))
            hs.append(h)
            cs.append(c)
            x = h
        return self.out(x).squeeze(-1) * self.output_scale, LSTMState(tuple(hs), tuple(cs))


class PackedOptimizerStep(nn.Module):
    """One step of a :class:`CoordinateLSTM` as a single tensor in and out, for serving (MLflow's pt2 export wants
    tensors, not an ``LSTMState``): row n is coordinate n, columns ``[grad | h_1..h_L | c_1..c_L]`` in,
    ``[update | h_1..h_L | c_1..c_L]`` out, so a caller feeds the state columns of one answer into the next call
    (zeros at the first step). ``width`` = 1 + 2 * layers * hidden."""

    def __init__(self, opt: CoordinateLSTM) -> None:
        super().__init__()
        if opt.use_loss:
            raise ModelConfigError("use_loss: a packed step takes the gradient alone")
        self.opt = opt
        self.width = 1 + 2 * opt.layers * opt.hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, layers = self.opt.hidden, self.opt.layers
        parts = torch.split(x[:, 1:], hidden, dim=1)
        update, state = self.opt(x[:, 0], LSTMState(tuple(parts[:layers]), tuple(parts[layers:])))
        return torch.cat([update.unsqueeze(1), *state.h, *state.c], dim=1)


@dataclass(frozen=True)
class MetaState:
    """State of the meta-learner besides the learner's parameters: the first LSTM's (h, c) ``(N, hidden)`` and the
    previous gate values f, i ``(N,)``."""

    h: torch.Tensor
    c: torch.Tensor
    f: torch.Tensor
    i: torch.Tensor

    def detach(self) -> MetaState:
        return MetaState(self.h.detach(), self.c.detach(), self.f.detach(), self.i.detach())


class MetaLSTMCell(nn.Module):
    """Ravi & Larochelle's meta-learner: an LSTM of ``hidden`` units on (loss, gradient) feeding the meta cell.

    Initialisation as the paper's code: every weight U(-0.01, 0.01) (the first LSTM's too), then
    b_F ~ U(``forget_bias``) = U(4, 6), so f starts near 1 (sigmoid(4) = 0.982), and b_I ~ U(``input_bias``) =
    U(-5, -4), so i starts as a small learning rate (0.007..0.018): the learner starts out as gradient descent.
    The authors' Lua code draws b_F from U(4, 5), the PyTorch port from U(4, 6) (shared/notes/seed-systems.md);
    the issue asks for U(4, 6), both are one argument away.

    f_{t-1} and i_{t-1} are the gate values, as the equations print them; the public ports feed back the
    pre-sigmoid logits instead. Both start at 0.
    """

    def __init__(self, hidden: int = 20, p: float = DEFAULT_P, forget_bias: tuple[float, float] = (4.0, 6.0),
                 input_bias: tuple[float, float] = (-5.0, -4.0), init_range: float = 0.01) -> None:
        super().__init__()
        _check_sizes(hidden=hidden)
        for name, (lo, hi) in (("forget_bias", forget_bias), ("input_bias", input_bias)):
            if not lo <= hi:
                raise ModelConfigError(f"{name}: expected (low, high) with low <= high, got {(lo, hi)!r}")
        if not init_range >= 0:
            raise ModelConfigError(f"init_range: must be >= 0, got {init_range!r}")
        preprocess(torch.zeros(()), p)
        self.hidden, self.p = hidden, p
        self.forget_bias, self.input_bias, self.init_range = tuple(forget_bias), tuple(input_bias), init_range
        self.lstm = nn.LSTMCell(4, hidden)
        # Inputs of each gate: [h_t (hidden), c_{t-1}, gate_{t-1}], hence hidden + 2 weights and one bias.
        self.w_f = nn.Parameter(torch.empty(hidden + 2))
        self.w_i = nn.Parameter(torch.empty(hidden + 2))
        self.b_f = nn.Parameter(torch.empty(1))
        self.b_i = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Redraw every weight from the global generator, as described in the class docstring."""
        with torch.no_grad():
            for w in self.parameters():
                w.uniform_(-self.init_range, self.init_range)
            self.b_f.uniform_(*self.forget_bias)
            self.b_i.uniform_(*self.input_bias)

    def init_state(self, n_coords: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> MetaState:
        _check_sizes(n_coords=n_coords)
        kw = _like(self.w_f, device, dtype)
        return MetaState(torch.zeros(n_coords, self.hidden, **kw), torch.zeros(n_coords, self.hidden, **kw),
                         torch.zeros(n_coords, **kw), torch.zeros(n_coords, **kw))

    def gate(self, w: torch.Tensor, b: torch.Tensor, h: torch.Tensor, c_prev: torch.Tensor,
             g_prev: torch.Tensor) -> torch.Tensor:
        """sigmoid(w [h, c_{t-1}, g_{t-1}] + b) for all coordinates: ``(N,)``."""
        return torch.sigmoid(h @ w[:-2] + c_prev * w[-2] + g_prev * w[-1] + b)

    def forward(self, grad: torch.Tensor, loss: torch.Tensor | float, c_prev: torch.Tensor,
                state: MetaState) -> tuple[torch.Tensor, MetaState]:
        """(c_t, new state): the learner's next flat parameters ``(N,)`` from its gradient ``(N,)`` at c_{t-1}."""
        _check_flat(grad, state.h.shape[0])
        if c_prev.shape != grad.shape:
            raise ValueError(f"c_prev: expected shape {tuple(grad.shape)}, got {tuple(c_prev.shape)}")
        # (loss, gradient) in that order, as the authors' code concatenates them.
        x = torch.cat([_loss_input(loss, grad.shape[0], self.p, grad), preprocess(grad, self.p)], dim=-1)
        h, c_lstm = self.lstm(x, (state.h, state.c))
        f = self.gate(self.w_f, self.b_f, h, c_prev, state.f)
        i = self.gate(self.w_i, self.b_i, h, c_prev, state.i)
        return f * c_prev + i * (-grad), MetaState(h, c_lstm, f, i)
