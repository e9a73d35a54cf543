"""Meta Networks (Munkhdalai & Yu 2017): a base learner and a key network whose layers are augmented with fast
weights that meta-learners write from loss gradients, one episode at a time.

Both networks have the paper's Omniglot shape: ``blocks`` conv layers of ``hidden`` 3x3 filters (no bias, ReLU,
2x2 max-pool rounding up, as the authors' Chainer code: 28 -> 14 -> 7 -> 4 -> 2 -> 1, so 5 blocks at 28x28), then
fc ``hidden -> hidden -> ways`` without biases. Layer augmentation, for a layer with slow weights W and fast W*:

    hidden layer:  h' = ReLU(W x) + ReLU(W* x)          (conv: then the max-pool)
    output layer:  y  = W x + W* x                       (logits: linear)

Per episode (support ``(x_i, y_i)``, i = 1..n, in label order; queries ``q``), with ``pre`` the log/sign
preprocessing of models/learned_optimizer.py at p = 7 (the authors' k):

* Task-level fast weights of the key network: the support is split into up to 5 consecutive chunks (the authors'
  IT = 5); the key network's cross-entropy gradient on each chunk, ``pre(g_c)``, is one step of a coordinate-wise
  LSTM(2 -> 20) + Linear(20 -> 1) (:class:`CoordinateLSTM`, one for the conv weights, one for the fc weights); its
  output after the last chunk is the key network's W*.
* Keys: the key network's augmented fc1 pre-activation, ``r = W_fc1 h + W*_fc1 h`` (as the authors' code), for every
  support example and query.
* Example-level fast weights: the base learner's gradient on each support example alone, ``g_i`` (per-example, one
  vmapped ``torch.func.grad``), through a coordinate-wise MLP 2 -> 20 -> 20 -> 1 (again one for conv, one for fc):
  the memory ``M_i = MLP(pre(g_i))``, keyed by ``r_i``.
* Read: ``a_q = softmax_i(cos(r_q, r_i))``, ``W*_q = sum_i a_qi M_i``; the query's logits come from the base learner
  augmented with its own W*_q.

The gradients fed to the LSTM and the MLP are inputs: computed on detached weights, not differentiated through (the
authors' code reads ``.grad`` arrays). So the meta-gradient reaches the base learner through the query's slow path,
the key network through the keys, the LSTMs through the key network's fast weights and the MLPs through the memory;
the key network's output layer (only there to give it a loss) gets none. Without batch norm every image is computed
on its own: a query's logits do not depend on the other queries.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from metatrain.models.base import ModelConfigError
from metatrain.models.learned_optimizer import CoordinateLSTM, ParamLayout, preprocess
from torch import nn
from torch.func import grad, vmap

#: The task kind the algorithm checks for.
METANET_TASK = "metanet"
#: Chunks of the support set read by the task-level LSTM (the authors' IT).
TASK_CHUNKS = 5
#: p of the log/sign preprocessing (the authors' k).
DEFAULT_P = 7.0
#: Std of the meta-learners' output layers at initialisation (their biases start at 0), so fast weights start near
#: zero and the untrained MetaNet is its slow networks. With PyTorch's default init instead, an untrained MLP writes
#: nearly the same value (~0.3) into every coordinate of a filter (most gradients fall in the linear branch of the
#: preprocessing), and five such augmented conv layers took the first query loss to ~4e9 (5w1s, 28x28). Not zero:
#: ReLU(W* x) has no gradient at W* = 0, so the meta-learners would never learn.
FAST_INIT_STD = 1e-3

Weights = dict[str, torch.Tensor]


def blocks_for(image_size: int) -> int:
    """Conv blocks until the map is 1x1, each halving it rounding up (28 -> 5 blocks)."""
    n = 0
    while image_size > 1:
        image_size, n = math.ceil(image_size / 2), n + 1
    return max(n, 1)


def augmented(slow: torch.Tensor, fast: torch.Tensor | None) -> torch.Tensor:
    """A hidden layer with layer augmentation: ``ReLU(slow) + ReLU(fast)`` (plain ``ReLU(slow)`` without fast)."""
    return F.relu(slow) if fast is None else F.relu(slow) + F.relu(fast)


class Learner(nn.Module):
    """Conv blocks + fc ``hidden -> hidden -> ways``, no biases: the base learner and the key network's shape.

    Its computation is the functional :meth:`run` on a weight dict (its own :meth:`weights`, or a per-example copy
    under ``torch.func``), with optional fast weights of the same names."""

    def __init__(self, in_channels: int, hidden: int, blocks: int, ways: int):
        super().__init__()
        self.blocks = blocks
        for i in range(blocks):
            self.register_parameter(f"conv{i}", nn.Parameter(torch.empty(hidden, in_channels if i == 0 else hidden,
                                                                         3, 3)))
        self.fc1 = nn.Parameter(torch.empty(hidden, hidden))
        self.fc2 = nn.Parameter(torch.empty(ways, hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LeCun normal, N(0, 1/fan_in): Chainer's default for these layers in the authors' code."""
        with torch.no_grad():
            for w in self.weights().values():
                w.normal_(0.0, 1.0 / math.sqrt(w[0].numel()))

    def weights(self) -> Weights:
        """The current weights by name (the parameter dict's tensors while run under functional_call)."""
        out = {f"conv{i}": getattr(self, f"conv{i}") for i in range(self.blocks)}
        return {**out, "fc1": self.fc1, "fc2": self.fc2}

    def conv_names(self) -> tuple[str, ...]:
        return tuple(f"conv{i}" for i in range(self.blocks))

    @staticmethod
    def trunk(w: Weights, x: torch.Tensor, fast: Weights | None = None) -> torch.Tensor:
        """Conv blocks (augmented where ``fast`` is given): ``(B, C, H, W) -> (B, hidden * h * w)``."""
        i = 0
        while f"conv{i}" in w:
            k = f"conv{i}"
            slow = F.conv2d(x, w[k], padding=1)
            x = F.max_pool2d(augmented(slow, None if fast is None else F.conv2d(x, fast[k], padding=1)), 2,
                             ceil_mode=True)
            i += 1
        return x.flatten(1)

    @classmethod
    def logits(cls, w: Weights, x: torch.Tensor, fast: Weights | None = None) -> torch.Tensor:
        """``(B, ways)``: trunk, ``augmented(fc1)``, then the linear output layer (``W x + W* x`` with fast)."""
        h = cls.trunk(w, x, fast)
        if fast is None:
            return F.linear(F.relu(F.linear(h, w["fc1"])), w["fc2"])
        a = augmented(F.linear(h, w["fc1"]), F.linear(h, fast["fc1"]))
        return F.linear(a, w["fc2"]) + F.linear(a, fast["fc2"])

    @classmethod
    def key(cls, w: Weights, x: torch.Tensor, fast: Weights) -> torch.Tensor:
        """The key network's representation ``(B, hidden)``: augmented trunk, ``W_fc1 h + W*_fc1 h``."""
        h = cls.trunk(w, x, fast)
        return F.linear(h, w["fc1"]) + F.linear(h, fast["fc1"])


def example_gradients(w: Weights, x: torch.Tensor, y: torch.Tensor) -> Weights:
    """The cross-entropy gradient of each example alone, ``{name: (n, *shape)}``: one vmapped ``torch.func.grad``
    over the examples (not n backward passes). Taken at detached weights: the result is an input, not a function
    of ``w`` to differentiate."""
    def loss(weights: Weights, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(Learner.logits(weights, xi[None]), yi[None])

    detached = {k: v.detach() for k, v in w.items()}
    return vmap(grad(loss), in_dims=(None, 0, 0))(detached, x, y)


def chunk_means(g: torch.Tensor, chunks: int) -> torch.Tensor:
    """``(n, N)`` per-example gradients -> ``(chunks, N)``: each chunk's mean over consecutive examples, the
    gradient of that chunk's mean loss (no batch norm, so examples do not interact)."""
    return torch.stack([part.mean(0) for part in torch.tensor_split(g, chunks)])


def cosine_read(keys: torch.Tensor, memory: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """The memory read: ``softmax_i(cos(q, k_i))``-weighted sum of the rows of ``memory``: keys ``(n, d)``, memory
    ``(n, N)``, queries ``(m, d)`` -> ``(m, N)``."""
    sims = F.cosine_similarity(queries[:, None, :], keys[None, :, :], dim=-1)  # (m, n)
    return torch.softmax(sims, dim=-1) @ memory


class CoordinateMLP(nn.Module):
    """Per coordinate, ``(..., 2) -> (...)``: Linear(2, h) ReLU Linear(h, h) ReLU Linear(h, 1), weights shared by
    every coordinate (one batched matmul over all of them)."""

    def __init__(self, hidden: int = 20):
        super().__init__()
        self.l1, self.l2, self.out = nn.Linear(2, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 1)

    def reset_parameters(self) -> None:
        for m in (self.l1, self.l2, self.out):
            m.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.l2(F.relu(self.l1(x))))).squeeze(-1)


class MetaNet(nn.Module):
    """Base learner, key network and the four coordinate-wise meta-learners for ``ways``-way episodes."""

    task = METANET_TASK

    def __init__(self, ways: int, in_channels: int = 1, hidden: int = 64, image_size: int = 28,
                 meta_hidden: int = 20, p: float = DEFAULT_P):
        super().__init__()
        for name, value in (("ways", ways), ("hidden", hidden), ("meta_hidden", meta_hidden),
                            ("image_size", image_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ModelConfigError(f"{name}: must be an integer >= 1, got {value!r}")
        preprocess(torch.zeros(()), p)  # validates p now
        self.ways = self.out_features = ways
        self.p, blocks = float(p), blocks_for(image_size)
        self.base = Learner(in_channels, hidden, blocks, ways)
        self.keynet = Learner(in_channels, hidden, blocks, ways)
        # output_scale 1: the authors' LSTM + Linear(20, 1) output is the fast weight itself.
        self.task_conv = CoordinateLSTM(meta_hidden, layers=1, output_scale=1.0, p=self.p)
        self.task_fc = CoordinateLSTM(meta_hidden, layers=1, output_scale=1.0, p=self.p)
        self.example_conv = CoordinateMLP(meta_hidden)
        self.example_fc = CoordinateMLP(meta_hidden)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Redraw every weight from the global generator, in construction order; the meta-learners' output layers
        small (:data:`FAST_INIT_STD`)."""
        for m in (self.base, self.keynet, self.task_conv, self.task_fc, self.example_conv, self.example_fc):
            m.reset_parameters()
            if not isinstance(m, Learner):
                with torch.no_grad():
                    m.out.weight.normal_(0.0, FAST_INIT_STD)
                    m.out.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base learner's slow logits ``(B, ways)`` without fast weights (what MLflow traces; a few-shot
        prediction goes through :meth:`episode_logits`)."""
        return Learner.logits(self.base.weights(), x)

    def _layouts(self, learner: Learner) -> tuple[ParamLayout, ParamLayout]:
        w = learner.weights()
        convs = {k: w[k] for k in learner.conv_names()}
        return ParamLayout.of(convs), ParamLayout.of({"fc1": w["fc1"], "fc2": w["fc2"]})

    def _split(self, learner: Learner, g: Weights, batch_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-name gradients -> (conv coordinates, fc coordinates), flattened after ``batch_dims`` dims."""
        conv = torch.cat([g[k].flatten(batch_dims) for k in learner.conv_names()], -1)
        return conv, torch.cat([g["fc1"].flatten(batch_dims), g["fc2"].flatten(batch_dims)], -1)

    def task_fast_weights(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Weights:
        """The key network's W*: its chunk gradients on the support, one coordinate-wise LSTM step per chunk."""
        g = example_gradients(self.keynet.weights(), support_x, support_y)
        conv, fc = (chunk_means(t, min(TASK_CHUNKS, len(support_y))) for t in self._split(self.keynet, g, 1))
        outs = []
        for lstm, flat in ((self.task_conv, conv), (self.task_fc, fc)):
            state = lstm.init_state(flat.shape[1], device=flat.device, dtype=flat.dtype)
            for step in flat:  # over chunks (<= 5); each step covers every coordinate at once
                update, state = lstm(step, state)
            outs.append(update)
        conv_layout, fc_layout = self._layouts(self.keynet)
        return {**conv_layout.unflatten(outs[0]), **fc_layout.unflatten(outs[1])}

    def example_memory(self, support_x: torch.Tensor, support_y: torch.Tensor) -> torch.Tensor:
        """``(n, N)``: each support example's fast weights for the base learner, conv coordinates then fc."""
        g = example_gradients(self.base.weights(), support_x, support_y)
        conv, fc = self._split(self.base, g, 1)
        return torch.cat([self.example_conv(preprocess(conv, self.p)), self.example_fc(preprocess(fc, self.p))], -1)

    def unflatten_fast(self, flat: torch.Tensor) -> Weights:
        """One ``(N,)`` memory row or read back to the base learner's weight names (views)."""
        conv_layout, fc_layout = self._layouts(self.base)
        conv, fc = flat.split([conv_layout.numel, fc_layout.numel])
        return {**conv_layout.unflatten(conv), **fc_layout.unflatten(fc)}

    def query_logits(self, query_x: torch.Tensor, fast: torch.Tensor) -> torch.Tensor:
        """``(m, ways)``: each query through the base learner augmented with its own fast weights ``fast[q]``
        (vmapped over the queries: the slow path as one batch, the fast path as a grouped convolution)."""
        slow = self.base.weights()

        def one(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
            return Learner.logits(slow, x[None], self.unflatten_fast(f))[0]

        return vmap(one)(query_x, fast)

    def episode_logits(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        """One episode (support in label order) to ``(m, ways)`` query logits: the whole module docstring."""
        key_fast = self.task_fast_weights(support_x, support_y)
        keys = Learner.key(self.keynet.weights(), torch.cat([support_x, query_x]), key_fast)
        n = support_x.shape[0]
        memory = self.example_memory(support_x, support_y)
        return self.query_logits(query_x, cosine_read(keys[:n], memory, keys[n:]))
