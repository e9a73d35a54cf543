"""Shared fixtures: the real Omniglot store (prepared once per test session) and tiny synthetic sources."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def omniglot_source() -> Path | None:
    """The shared Omniglot archives: $METATRAIN_OMNIGLOT_SOURCE, else ../shared/data/omniglot beside the repo."""
    env = os.environ.get("METATRAIN_OMNIGLOT_SOURCE")
    path = Path(env) if env else REPO.parent / "shared" / "data" / "omniglot"
    return path if (path / "images_background.zip").is_file() else None


@pytest.fixture(scope="session")
def omniglot_dir() -> Path:
    path = omniglot_source()
    if path is None:
        # The archives are on every machine of this project, CI included: missing data there is a failure.
        if os.environ.get("CI"):
            pytest.fail("Omniglot archives not found: set METATRAIN_OMNIGLOT_SOURCE "
                        "or put them at ../shared/data/omniglot")
        pytest.skip("Omniglot archives not found; set METATRAIN_OMNIGLOT_SOURCE")
    return path


@pytest.fixture(scope="session")
def omniglot_store(omniglot_dir, tmp_path_factory) -> Path:
    """The full Omniglot at 28x28, prepared once for the whole test session (about 3 s)."""
    from metatrain.tasks.prepare import prepare_omniglot

    out = tmp_path_factory.mktemp("stores") / "omniglot"
    prepare_omniglot(omniglot_dir, out)
    return out


def png_bytes(rng: np.random.Generator, side: int = 21, channels: int = 1) -> bytes:
    """A random binary drawing (black strokes on white, like Omniglot) as PNG bytes."""
    img = np.where(rng.random((side, side, channels)) < 0.15, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img[..., 0] if channels == 1 else img).save(buf, format="PNG")
    return buf.getvalue()


def write_tiny_omniglot(root: Path, *, unpacked: bool = False, seed: int = 0, drawers: int = 20) -> Path:
    """An Omniglot-shaped source: background 2 alphabets x 3 characters, evaluation 1 x 3, ``drawers`` each."""
    rng = np.random.default_rng(seed)
    layout = {"background": ["Alpha", "Beta"], "evaluation": ["Gamma"]}
    root.mkdir(parents=True, exist_ok=True)
    for split, alphabets in layout.items():
        members = {}
        for a in alphabets:
            for c in range(1, 4):
                for d in range(1, drawers + 1):
                    members[f"images_{split}/{a}/character{c:02d}/{100 + c:04d}_{d:02d}.png"] = png_bytes(rng)
        if unpacked:
            for name, blob in members.items():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(blob)
        else:
            with zipfile.ZipFile(root / f"images_{split}.zip", "w") as zf:
                for name, blob in members.items():
                    zf.writestr(name, blob)
    return root


@pytest.fixture
def tiny_source(tmp_path) -> Path:
    return write_tiny_omniglot(tmp_path / "src")


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for k, v in members.items():
            zf.writestr(k, v)
    return buf.getvalue()


def prototype_episode(slot: int, ways: int = 3, shots: int = 1, queries: int = 2, size: int = 28, step: int = 1):
    """A synthetic few-shot Episode: each class a random image, each example a noisy copy (seeded by ``slot``)."""
    import torch
    from metatrain.tasks.episode import Episode

    g = torch.Generator().manual_seed(slot)
    protos = torch.rand(ways, 1, size, size, generator=g)
    sy = torch.arange(ways).repeat_interleave(shots)
    qy = torch.arange(ways).repeat_interleave(queries)
    noise = lambda n: 0.2 * torch.randn(n, 1, size, size, generator=g)  # noqa: E731
    return Episode(protos[sy] + noise(len(sy)), sy, protos[qy] + noise(len(qy)), qy, torch.arange(ways),
                   torch.zeros(ways, dtype=torch.long), (0, step, slot))


def assert_stack_equals_loop(algo, params: dict, episodes: list, cfg, model, rel: float = 1e-6) -> None:
    """An algorithm module's batched path (meta-gradient summed over a stack, evaluate averaged) against its loop."""
    from metatrain.tasks.episode import stack_episodes

    from metatrain.pipeline.algorithms import meta_gradient_tasks

    g_loop, n, m_loop = meta_gradient_tasks(params, episodes, cfg, model, batched=False)
    g_bat, _, m_bat = meta_gradient_tasks(params, episodes, cfg, model, batched=True)
    assert n == len(episodes) and m_loop == pytest.approx(m_bat, rel=rel)
    for k in g_loop:
        torch.testing.assert_close(g_bat[k], g_loop[k], rtol=1e-10, atol=1e-12, msg=k)
    ev = algo.evaluate(params, stack_episodes(episodes), cfg, model, batched=True)
    assert ev == pytest.approx({k: sum(algo.evaluate(params, x, cfg, model)[k] for x in episodes) / n for k in ev})


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one intra-op thread is faster, and on a busy 2-core machine far faster (no spin-waiting)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ray_module():
    """A real local Ray for one test module (2 CPUs, no dashboard), shut down after it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def no_env_tracking(monkeypatch):
    """No $MLFLOW_TRACKING_URI from the caller's shell: each run uses the store its test names."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    """Poll ``url`` until it answers 200; the test fails with ``log``'s tail if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{' '.join(map(str, proc.args[:3]))} did not start: {log.read_text()[-3000:]}")
        time.sleep(0.25)
