"""A two-node Ray cluster (ray.cluster_utils.Cluster) loses a whole node mid-run: the run finishes, identical."""

from __future__ import annotations

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from metatrain.pipeline.config import load_config
from metatrain.pipeline.distributed.engine import Engine
from metatrain.pipeline.distributed.trainer import Trainer

pytestmark = pytest.mark.data

STEPS = 4


class NullTracker:
    def log_metrics(self, metrics, step):
        pass


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker_node = c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c, worker_node
    ray.shutdown()
    c.shutdown()


def cfg_for(store, count):
    return load_config(None, [f"data.path={store}", "model.hidden=8", "algorithm.name=fomaml", f"train.steps={STEPS}",
                              "train.meta_batch=4", "train.val_every=0", f"workers.count={count}",
                              "workers.placement=SPREAD", "workers.max_restarts=0", "workers.task_timeout_s=60"])


def run(cfg, folder, hook=None):
    engine = Engine(cfg, str(folder), log=lambda s: None)
    try:
        if hook:
            hook(engine)
        last = Trainer(cfg, engine, NullTracker(), folder, quiet=True).run(1)
        return last, ray.get(engine.get_weights()[1]), engine
    finally:
        engine.shutdown()


def test_removing_a_node_mid_run(cluster, omniglot_store, tmp_path):
    c, worker_node = cluster
    last_clean, clean, _ = run(cfg_for(omniglot_store, 1), tmp_path / "clean")
    assert last_clean == STEPS

    def remove_node_after_step_2(engine):
        homes = {ray.get(w.handle.ping.remote())["node"] for w in engine.workers}
        assert len(homes) == 2  # SPREAD: one worker per node
        original = engine.apply

        def apply(step, metas, grads):
            out = original(step, metas, grads)
            if step == 2:
                c.remove_node(worker_node)
            return out

        engine.apply = apply

    last, weights, engine = run(cfg_for(omniglot_store, 2), tmp_path / "faulty", remove_node_after_step_2)
    assert last == STEPS
    assert engine.faults.worker_failures >= 1 and engine.faults.recomputed_slots >= 2
    assert sum(ws.alive for ws in engine.workers) == 1
    for k in clean:
        torch.testing.assert_close(weights[k], clean[k], rtol=1e-5, atol=1e-6, msg=f"parameter {k} differs")
