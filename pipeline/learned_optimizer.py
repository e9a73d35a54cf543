"""A learned optimizer for any PyTorch training loop: ``LearnedOptimizer`` is a ``torch.optim.Optimizer`` whose update
is a trained coordinate-wise LSTM (Andrychowicz et al. 2016, trained by :mod:`.l2l_gd`).

    >>> opt = LearnedOptimizer(net.parameters(), weights="bench/learned_optimizer/mlp-per-window.pt")
    >>> for x, y in loader:
    ...     opt.zero_grad()
    ...     F.cross_entropy(net(x), y).backward()
    ...     opt.step()

Each parameter keeps its own per-coordinate LSTM state (``opt.state[p]``, as torch.optim keeps Adam's moments), and
a step runs the LSTM once over all coordinates of all parameters that have a gradient (one batched call per layer).
The weights come from a dict, a file of them (loaded with ``weights_only=True``), or a training run's checkpoint
(``run=RUN_ID`` or ``model="models:/NAME@ALIAS"`` of an ``l2l_gd`` run: its final checkpoint, read with
``weights_only=True`` as ``metatrain eval`` reads it, and the sizes and output scale it was trained with).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from metatrain.models import CoordinateLSTM
from metatrain.models.learned_optimizer import LSTMState

from metatrain.pipeline.algorithms.errors import AlgorithmConfigError
from metatrain.pipeline.algorithms.learned.l2l_gd import NAME as L2L_GD
from metatrain.pipeline.algorithms.learned.l2l_gd import check_weights


def _resolve(weights, run: str | None, model: str | None, tracking_uri: str | None
             ) -> tuple[dict, str, dict | None]:
    """(weights, where they came from, the training run's algorithm settings or None for plain weights)."""
    given = [name for name, v in (("weights", weights), ("run", run), ("model", model)) if v is not None]
    if len(given) != 1:
        raise AlgorithmConfigError(f"LearnedOptimizer: give exactly one of weights=, run=, model= (got "
                                   f"{', '.join(given) or 'none'})")
    if weights is not None and not isinstance(weights, Mapping):
        path = Path(weights)
        if not path.is_file():
            raise AlgorithmConfigError(f"weights: no file {path}")
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
            raise AlgorithmConfigError(f"weights: {path} is not a saved dict of tensors ({type(e).__name__})") from None
        if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise AlgorithmConfigError(f"weights: {path} is not a saved dict of tensors")
        return dict(loaded), str(path), None
    if weights is not None:
        return dict(weights), "weights", None
    from metatrain.pipeline.jobs.runs import checkpoint_of  # how `metatrain eval` reads runs and the registry

    state, where = checkpoint_of(run, model, tracking_uri)
    algorithm = state.get("config", {}).get("algorithm", {})
    if algorithm.get("name") != L2L_GD:
        raise AlgorithmConfigError(f"{'run' if run else 'model'}: {where} trained {algorithm.get('name')!r}, not "
                                   f"the learned optimizer l2l_gd")
    return dict(state["params"]), where, algorithm


class LearnedOptimizer(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` stepping with a trained :class:`~models.learned_optimizer.CoordinateLSTM`."""

    def __init__(self, params: Iterable, *, weights: Mapping | str | Path | None = None, run: str | None = None,
                 model: str | None = None, tracking_uri: str | None = None, hidden: int = 20, layers: int = 2,
                 output_scale: float = 0.1, p: float = 10.0) -> None:
        super().__init__(params, defaults={})
        phi, source, trained = _resolve(weights, run, model, tracking_uri)
        if trained is not None:  # a run says what it trained: its sizes, not the arguments' defaults
            hidden, layers = trained["lstm_hidden"], trained["lstm_layers"]
            output_scale, p = trained["output_scale"], trained["lstm_p"]
        self.net = CoordinateLSTM(hidden=hidden, layers=layers, output_scale=output_scale, p=p)
        check_weights(phi, self.net, source)
        self.net.load_state_dict({k: v.float() for k, v in phi.items()})
        self.net.requires_grad_(False)

    def _state_of(self, p: torch.Tensor) -> LSTMState:
        st = self.state[p]
        if "h" not in st:
            fresh = self.net.init_state(p.numel(), device=p.device)
            st["h"], st["c"] = list(fresh.h), list(fresh.c)
        return LSTMState(tuple(st["h"]), tuple(st["c"]))

    @torch.no_grad()
    def step(self, closure=None):
        """One learned update of every parameter that has a gradient; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return loss
        device = params[0].device
        self.net.to(device)
        states = [self._state_of(p) for p in params]
        grad = torch.cat([p.grad.reshape(-1).float() for p in params])
        joined = LSTMState(tuple(torch.cat([s.h[i] for s in states]) for i in range(self.net.layers)),
                           tuple(torch.cat([s.c[i] for s in states]) for i in range(self.net.layers)))
        update, new = self.net(grad, joined)
        sizes = [p.numel() for p in params]
        for p, u, *hc in zip(params, update.split(sizes), *(t.split(sizes) for t in (*new.h, *new.c))):
            p.add_(u.view_as(p).to(p.dtype))
            self.state[p]["h"], self.state[p]["c"] = list(hc[:self.net.layers]), list(hc[self.net.layers:])
        return loss
