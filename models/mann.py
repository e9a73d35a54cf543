"""Memory-augmented neural network with least-recently-used access (Santoro et al. 2016), and its LSTM baseline.

The network reads a Santoro episode (``tasks.SequenceEpisode``) one step at a time: input ``[x_t, y_{t-1}]``
(flattened image and the one-hot label of the previous step), and must predict ``y_t``. A class's label is only
learnable from what the network stored when it saw that class before, so accuracy at the 2nd, 3rd, ... instance of a
class measures how well it uses its memory.

Per step t, with R read heads (h = 1..R), memory M (N x W), usage w^u, and LSTM controller state (h_t, c_t):

    controller   h_t, c_t = LSTM([x_t, y_{t-1}, r_{t-1}], (h_{t-1}, c_{t-1}))
    keys, gates  k_t^h = tanh(W_k^h h_t),  alpha^h = W_a^h h_t,  beta_t^h = softplus(W_b^h h_t)
    LRUA write   w^w_t^h = sigmoid(alpha^h) w^r_{t-1}^h + (1 - sigmoid(alpha^h)) w^lu_{t-1}
                 M_{t-1}(argmin_i w^u_{t-1}(i)) <- 0                    (the least-used location is cleared)
                 M_t(i) = M_{t-1}(i) + sum_h w^w_t^h(i) k_t^h
    read         w^r_t^h(i) = softmax_i(beta_t^h cos(k_t^h, M'(i))),  r_t^h = sum_i w^r_t^h(i) M'(i)
                 (M' = M_{t-1}, the memory before this step's write; the paper's M_t with read_before_write=False)
    usage        w^u_t = gamma w^u_{t-1} + sum_h (w^r_t^h + w^w_t^h)         (gamma = 0.95)
                 w^lu_t(i) = 1 if w^u_t(i) is among the R smallest usages, else 0
    output       logits_t = W_o [h_t, r_t^1..R] + b_o

Two departures from the equations as printed, each an option that restores them:

- ``read_before_write=True``: step t reads M_{t-1}, the memory before this step's write. Read from M_t, the key k_t
  finds itself (it was just written, into a cleared slot: cosine 1) before any older slot, so the read returns what
  the controller already had. On the synthetic sequences of tests/test_memory_models.py (3 classes x 4 showings,
  16 episodes a step) the printed order stayed at the label-counting heuristic for 4,000 steps (2nd-showing accuracy
  0.47, below the 1st's 0.62); reading first, the 2nd showing passed the 1st after 1,500 steps (0.66 vs 0.50).
- ``key_strength=True``: the read is the NTM's content addressing (models/ntm.py) with a learned key strength beta.
  Without one, cosines in [-1, 1] over 128 locations give a nearly flat softmax (a perfect match gets
  e / (e + 127) = 2% of the weight).

w^lu is the paper's indicator: R ones (ties broken towards lower indices), so a write weighting sums to
sigmoid(alpha) + (1 - sigmoid(alpha)) R, not to 1; read weightings sum to 1. Memory starts every episode at a small
constant (1e-6: the cosine of an all-zero row is undefined), usage and previous weights at 0.

Both models take one tensor, ``(B, T, D + classes)`` (``MANN.sequence_inputs`` builds it from an episode), and return
logits ``(B, T, classes)``; a single input keeps them exportable with ``torch.export`` for MLflow.

    >>> net = MANN(classes=5, input_size=28 * 28)
    >>> logits = net(MANN.sequence_inputs(episode.x[None], episode.prev_label[None]))    # (1, 50, 5)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from metatrain.models.base import ModelConfigError
from metatrain.models.ntm import content_weights
from torch import nn

MEMORY_INIT = 1e-6


def least_used(usage: torch.Tensor, n: int) -> torch.Tensor:
    """w^lu: 1 at the ``n`` locations of smallest usage (``(B, N)``), 0 elsewhere; ties go to lower indices."""
    # A stable sort makes the tie-break explicit (torch.topk's order among equal values is unspecified).
    idx = torch.sort(usage, dim=-1, stable=True).indices[:, :n]
    return torch.zeros_like(usage).scatter_(-1, idx, 1.0)


def lrua_write_weights(gate: torch.Tensor, w_read_prev: torch.Tensor, w_lu_prev: torch.Tensor) -> torch.Tensor:
    """w^w = sigmoid(alpha) w^r_{t-1} + (1 - sigmoid(alpha)) w^lu_{t-1}; gate ``(B, R)``, weights ``(B, R, N)``."""
    s = torch.sigmoid(gate).unsqueeze(-1)
    return s * w_read_prev + (1 - s) * w_lu_prev.unsqueeze(1)


def clear_least_used(memory: torch.Tensor, usage_prev: torch.Tensor) -> torch.Tensor:
    """The memory with its least-used location (argmin of w^u_{t-1}, lowest index on ties) set to zero."""
    idx = torch.argmin(usage_prev, dim=-1, keepdim=True)  # the first minimum, as a stable sort's first element
    keep = torch.ones_like(usage_prev).scatter_(-1, idx, 0.0)
    return memory * keep.unsqueeze(-1)


def lrua_write(memory: torch.Tensor, w_write: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """M_t(i) = M_{t-1}(i) + sum_h w^w^h(i) k^h; memory ``(B, N, W)``, weights ``(B, R, N)``, keys ``(B, R, W)``."""
    return memory + torch.einsum("brn,brw->bnw", w_write, keys)


def update_usage(usage_prev: torch.Tensor, w_read: torch.Tensor, w_write: torch.Tensor, gamma: float) -> torch.Tensor:
    """w^u_t = gamma w^u_{t-1} + sum over heads of (w^r_t + w^w_t)."""
    return gamma * usage_prev + w_read.sum(1) + w_write.sum(1)


def _check(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ModelConfigError(f"{name}: must be an integer >= 1, got {v!r}")


class SequenceModel(nn.Module):
    """What the sequence algorithm (pipeline/algorithms/mann.py) runs: ``(B, T, D + classes)`` -> logits."""

    task = "sequence"

    def __init__(self, classes: int, input_size: int):
        super().__init__()
        _check(classes=classes, input_size=input_size)
        self.classes, self.input_size = classes, input_size

    @property
    def out_features(self) -> int:
        return self.classes

    @staticmethod
    def sequence_inputs(x: torch.Tensor, prev_label: torch.Tensor) -> torch.Tensor:
        """``[x_t flattened, y_{t-1} one-hot]``: images ``(B, T, C, H, W)``, labels ``(B, T, classes)``."""
        return torch.cat([x.flatten(2), prev_label], dim=-1)

    def reset_parameters(self) -> None:
        """PyTorch's default initialisation of every layer, redrawn from the global generator (seeded by the caller)."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()


class MANN(SequenceModel):
    """LSTM controller + external memory with R content-addressed read heads and LRUA writes (see module docstring)."""

    def __init__(self, classes: int = 5, input_size: int = 784, controller: int = 200, memory_slots: int = 128,
                 memory_width: int = 40, read_heads: int = 4, gamma: float = 0.95, key_strength: bool = True,
                 read_before_write: bool = True):
        super().__init__(classes, input_size)
        _check(controller=controller, memory_slots=memory_slots, memory_width=memory_width, read_heads=read_heads)
        if read_heads > memory_slots:
            raise ModelConfigError(f"read_heads: {read_heads} exceeds memory_slots {memory_slots}")
        if not 0 <= gamma <= 1:
            raise ModelConfigError(f"gamma: the usage decay must be in [0, 1], got {gamma}")
        self.slots, self.width, self.heads, self.gamma = memory_slots, memory_width, read_heads, float(gamma)
        self.read_before_write = read_before_write
        self.controller = nn.LSTMCell(input_size + classes + read_heads * memory_width, controller)
        self.key = nn.Linear(controller, read_heads * memory_width)
        self.gate = nn.Linear(controller, read_heads)
        self.strength = nn.Linear(controller, read_heads) if key_strength else None
        self.out = nn.Linear(controller + read_heads * memory_width, classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        b, steps, d = inputs.shape
        n, w, r = self.slots, self.width, self.heads
        cell = self.controller
        # Why not nn.LSTMCell and three nn.Linear per step: the step loop runs in Python, so its cost is the number
        # of ops per step. The input-to-gates product of every step is one matrix product before the loop (what
        # nn.LSTM does), the read vector and h share one product per step, the key, gate and strength heads another,
        # and the output layer runs once after the loop. Same parameters, same equations (tests/test_memory_models.py
        # checks this against the step-by-step composition of the equation functions).
        # unbind, not x_gates[:, t]: one backward node that stacks the T gradients, where indexing would make each
        # step's backward allocate and fill a zero (B, T, 4H) tensor (that was 70% of the step's time).
        x_gates = F.linear(inputs, cell.weight_ih[:, :d], cell.bias_ih + cell.bias_hh).unbind(1)  # T x (B, 4H)
        w_rec = torch.cat([cell.weight_ih[:, d:], cell.weight_hh], dim=1).t()  # [r_{t-1}, h_{t-1}] -> gates
        head_layers = [self.key, self.gate] + ([self.strength] if self.strength is not None else [])
        w_heads = torch.cat([m.weight for m in head_layers]).t()
        b_heads = torch.cat([m.bias for m in head_layers])
        h = inputs.new_zeros(b, cell.hidden_size)
        c = torch.zeros_like(h)
        memory = inputs.new_full((b, n, w), MEMORY_INIT)
        usage = inputs.new_zeros(b, n)
        w_read = inputs.new_zeros(b, r, n)
        w_lu = least_used(usage, r)
        reads = inputs.new_zeros(b, r * w)
        hs, rs = [], []
        for t in range(steps):
            gates = torch.addmm(x_gates[t], torch.cat([reads, h], dim=-1), w_rec)
            i, f, g, o = gates.chunk(4, dim=-1)  # nn.LSTMCell's gate order
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            heads = torch.addmm(b_heads, h, w_heads)
            keys = torch.tanh(heads[:, :r * w]).view(b, r, w)
            w_write = lrua_write_weights(heads[:, r * w:r * w + r], w_read, w_lu)
            written = lrua_write(clear_least_used(memory, usage), w_write, keys)
            source = memory if self.read_before_write else written
            beta = F.softplus(heads[:, r * w + r:]).unsqueeze(-1) if self.strength is not None else 1.0
            w_read = content_weights(source, keys, beta)  # (B, R, N): every head at once
            reads = torch.bmm(w_read, source).view(b, r * w)
            memory = written
            usage = update_usage(usage, w_read, w_write, self.gamma)
            w_lu = least_used(usage, r)
            hs.append(h)
            rs.append(reads)
        return self.out(torch.cat([torch.stack(hs, dim=1), torch.stack(rs, dim=1)], dim=-1))


class SequenceLSTM(SequenceModel):
    """The paper's baseline: the same LSTM controller and output layer with no external memory."""

    def __init__(self, classes: int = 5, input_size: int = 784, hidden: int = 200):
        super().__init__(classes, input_size)
        _check(hidden=hidden)
        self.lstm = nn.LSTM(input_size + classes, hidden, batch_first=True)
        self.out = nn.Linear(hidden, classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.out(self.lstm(inputs)[0])


__all__ = ["MANN", "SequenceLSTM", "SequenceModel", "clear_least_used", "least_used", "lrua_write",
           "lrua_write_weights", "update_usage"]
