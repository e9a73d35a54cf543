"""The GPU path: a worker on cuda:0 computes what a CPU worker computes. Needs a CUDA device; skipped elsewhere.

    pytest tests/test_gpu.py -v        # on a machine with a GPU (CI has none: these are skipped there)

cuDNN runs float32 convolutions in TF32 by default (PyTorch's ``torch.backends.cudnn.allow_tf32``), which is
right for training but makes a GPU gradient differ from the CPU's by a few percent after MAML's inner step (seen
on an H200: 3.5% of the largest entry). These tests turn TF32 off so that the two devices must agree to float32
rounding, compared in norm per parameter. Without TF32 the H200 gave relative errors of at most 1.9e-4 (MAML,
loop), 8.1e-4 (MAML, batched), 6.0e-4 (FOMAML, batched) and 1.8e-4 (ProtoNet): different convolution algorithms
and summation orders, through batch statistics and a second-order inner step; the tolerance is 2e-3.
"""

from __future__ import annotations

import pytest
import torch
from metatrain.tasks.sources import unit_pixels

from metatrain.pipeline.algorithms import init_params
from metatrain.pipeline.components import build_model, image_shape
from metatrain.pipeline.config import load_config
from metatrain.pipeline.distributed.worker import TaskWorkerCore

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def full_float32():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def config(store, algo: str, batching: str):
    return load_config(f"configs/omniglot_{algo}_5w1s.yaml", [
        f"data.path={store}", "workers.gpus=1", f"algorithm.task_batching={batching}", "train.meta_batch=8"])


def assert_close_relative(got: dict, want: dict, tol: float) -> None:
    assert got.keys() == want.keys()
    errors = {}
    for k in want:
        assert got[k].device.type == "cpu" and got[k].shape == want[k].shape, k
        errors[k] = float((got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-12))
    worst = max(errors, key=errors.get)
    assert errors[worst] < tol, f"{worst}: relative error {errors[worst]:.2e} (all: {errors})"


def test_gpu_pixels_are_the_cpu_pixels():
    """CUDA's tensor / scalar multiplies by the reciprocal (126 of the 256 values come out one ulp off); the
    samplers' table lookup must not."""
    x = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(unit_pixels(x.cuda()).cpu(), unit_pixels(x))


def test_the_gpu_store_gives_the_cpu_episodes(omniglot_store):
    cfg = config(omniglot_store, "maml", "auto")
    cpu, gpu = TaskWorkerCore(cfg, device="cpu"), TaskWorkerCore(cfg)
    assert gpu.store.images.is_cuda and not cpu.store.images.is_cuda  # the process's cached store stays on the CPU
    for slot in range(4):
        a, b = cpu.sampler("train").episode(5, slot), gpu.sampler("train").episode(5, slot)
        assert b.support_x.is_cuda
        for f in ("support_x", "support_y", "query_x", "query_y"):
            assert torch.equal(getattr(b, f).cpu(), getattr(a, f)), (slot, f)


# Reptile's inner Adam divides by sqrt(v): a near-zero gradient entry's rounding can flip its step's sign, so its
# tolerance is looser.
@pytest.mark.parametrize("algo,batching,tol", [("maml", "loop", 2e-3), ("maml", "batched", 2e-3),
                                               ("fomaml", "batched", 2e-3), ("reptile", "loop", 1e-2),
                                               ("protonet", "batched", 2e-3)])
def test_a_gpu_worker_computes_the_cpu_meta_gradient(omniglot_store, algo, batching, tol):
    cfg = config(omniglot_store, algo, batching)
    torch.manual_seed(0)
    weights = init_params(build_model(cfg, image_shape(cfg)), cfg.algorithm)
    cpu = TaskWorkerCore(cfg, device="cpu")
    gpu = TaskWorkerCore(cfg)  # workers.gpus=1: picks cuda:0 itself
    assert gpu.device.type == "cuda" and gpu.store.images.is_cuda
    blocks = [[0, 1, 2, 3], [4, 5, 6, 7]]
    meta_c, grads_c = cpu.compute(3, 0, weights, blocks)
    meta_g, grads_g = gpu.compute(3, 0, weights, blocks)
    assert meta_g["n_tasks"] == meta_c["n_tasks"] == 8
    assert_close_relative(grads_g, grads_c, tol)
    for k, v in meta_c["metrics"].items():
        assert meta_g["metrics"][k] == pytest.approx(v, rel=1e-3, abs=1e-5), k


def test_gpu_evaluation_scores_the_same_tasks_as_the_cpu(omniglot_store):
    cfg = config(omniglot_store, "maml", "auto")
    torch.manual_seed(0)
    weights = init_params(build_model(cfg, image_shape(cfg)), cfg.algorithm)
    rows_c = TaskWorkerCore(cfg, device="cpu").evaluate(weights, "test", step=0, slots=range(6))
    rows_g = TaskWorkerCore(cfg).evaluate(weights, "test", step=0, slots=range(6))
    assert [r["slot"] for r in rows_g] == list(range(6))
    for a, b in zip(rows_g, rows_c):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (a["slot"], k)


@pytest.mark.parametrize("algo,batching", [("maml", "loop"), ("maml", "batched"), ("matching", "batched"),
                                           ("relation", "batched"), ("siamese", "batched"), ("memory", "auto")])
def test_a_gpu_worker_computes_the_same_meta_gradient_every_time(omniglot_store, algo, batching):
    """Same weights, same slots: bit-identical gradients on every call (cuDNN in deterministic mode)."""
    cfg = config(omniglot_store, algo, batching)
    torch.manual_seed(0)
    weights = init_params(build_model(cfg, image_shape(cfg)), cfg.algorithm)
    gpu = TaskWorkerCore(cfg)
    assert torch.backends.cudnn.deterministic
    first = gpu.compute(3, 0, weights, [[0, 1, 2, 3], [4, 5, 6, 7]])[1]
    for _ in range(3):
        again = gpu.compute(3, 0, weights, [[0, 1, 2, 3], [4, 5, 6, 7]])[1]
        for k in first:
            assert torch.equal(again[k], first[k]), k
