"""Ray actors: thin shells over ``ParameterServerCore`` and ``TaskWorkerCore`` (all logic lives there, tested
without Ray).

- ``ParameterServer``: ``get_weights()`` returns ``(version, [ref])`` where ``ref`` is an object-store reference put
  once per version, so N workers read one copy instead of the actor serialising the weights N times.
  ``apply_gradients(step, metas, *grads)`` receives the workers' gradient refs as top-level arguments: Ray hands
  them over straight from the workers' object stores, and the driver never touches a gradient.
- ``TaskWorker``: ``compute(step, version, weights, blocks, tree)`` returns two objects (``num_returns=2``): the small
  ``meta`` the driver waits on and the gradient dict it forwards by reference.

Both are created with restarts enabled by ``pipeline/engine.py``; the parameter server restores its newest
checkpoint in its constructor, so a restart resumes it.
"""

from __future__ import annotations

import os

import ray

from metatrain.pipeline.components import build_model, fingerprint, image_shape, initial_params
from metatrain.pipeline.config import config_from_dict
from metatrain.pipeline.distributed.parameter_server import ParameterServerCore
from metatrain.pipeline.distributed.worker import TaskWorkerCore


@ray.remote
class ParameterServer:
    """Meta-parameters, outer optimizer, version; checkpoints under ``checkpoint_dir``."""

    def __init__(self, config: dict, checkpoint_dir: str):
        cfg = config_from_dict(config)
        model = build_model(cfg, image_shape(cfg))
        self.core = ParameterServerCore(
            initial_params(cfg, model), cfg.optim, total_steps=cfg.train.steps, checkpoint_dir=checkpoint_dir,
            checkpoint_every=cfg.train.checkpoint_every, keep_checkpoints=cfg.train.keep_checkpoints,
            fingerprint=fingerprint(cfg, model), config=config,
            max_staleness=cfg.train.max_staleness if cfg.train.mode == "async" else None)
        self._ref = None
        self._ref_version = -1

    def get_weights(self):
        if self._ref_version != self.core.version:
            self._ref = ray.put(self.core.get_weights()[1])
            self._ref_version = self.core.version
        return self.core.version, [self._ref]

    def apply_gradients(self, step: int, metas: list[dict], *grads) -> dict:
        return self.core.apply_gradients(step, metas, list(grads))

    def checkpoint(self, name: str | None = None) -> str | None:
        return self.core.checkpoint(name)

    def set_extra(self, **values) -> None:
        self.core.set_extra(**values)

    def status(self) -> dict:
        return {"version": self.core.version, "counters": dict(self.core.counters), "pid": os.getpid(),
                "restored_from": self.core.restored_from, "extra": dict(self.core.extra)}


@ray.remote
class TaskWorker:
    """Rebuilds episodes from (seed, step, slot) and computes summed meta-gradients."""

    def __init__(self, config: dict, worker_id: int):
        self.core = TaskWorkerCore(config_from_dict(config), worker_id)

    @ray.method(num_returns=2)
    def compute(self, step: int, version: int, weights: dict, blocks: list[list[int]], tree=None):
        return self.core.compute(step, version, weights, blocks, tree)

    def evaluate(self, weights: dict, split: str, step: int, slots: list[int]) -> list[dict]:
        return self.core.evaluate(weights, split, step, slots)

    def ping(self) -> dict:
        return {"worker": self.core.worker_id, "pid": os.getpid(), "device": str(self.core.device),
                "node": ray.get_runtime_context().get_node_id()}
