"""Data-path benchmark: episodes/s of the EpisodeSampler on one core, prepare time, store size, and the cost of
within-alphabet episodes and of augmentation per episode.

    python bench/sampler.py [--source ../shared/data/omniglot] [--seconds 2]

The peer in the same run is a per-image sampler of the kind most few-shot loaders use (a Dataset whose
__getitem__ returns one image, called once per support/query item, then torch.stack), on the same in-memory
store. The target: >= 2,000 episodes/s for 5w1s15q (a second-order MAML task costs ~60 ms here, so the data path
must stay well under 1% of a step).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metatrain.tasks.augment import Affine  # noqa: E402
from metatrain.tasks.prepare import prepare_omniglot  # noqa: E402
from metatrain.tasks.samplers import EpisodeSampler, episode_rng  # noqa: E402
from metatrain.tasks.store import TaskStore  # noqa: E402

SHAPES = [(5, 1, 15), (5, 5, 15), (20, 1, 5), (20, 5, 5)]


class PerImageSampler:
    """The common baseline: choose classes and drawings, then fetch, convert and stack image by image."""

    def __init__(self, store: TaskStore, ways, shots, queries, classes):
        self.store, self.ways, self.shots, self.queries, self.classes = store, ways, shots, queries, classes

    def getitem(self, row: int) -> torch.Tensor:
        return self.store.images[row].float() / 255.0

    def episode(self, step, slot):
        rng = episode_rng(0, 1, step, slot)
        chosen = rng.choice(self.classes, self.ways, replace=False)
        sx, qx, sy, qy = [], [], [], []
        for label, c in enumerate(chosen):
            rows = int(self.store.class_offsets[c]) + rng.permutation(20)[: self.shots + self.queries]
            for i, r in enumerate(rows):
                (sx if i < self.shots else qx).append(self.getitem(int(r)))
                (sy if i < self.shots else qy).append(label)
        return torch.stack(sx), torch.tensor(sy), torch.stack(qx), torch.tensor(qy)


def rate(fn, seconds: float) -> float:
    fn(0, 0)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(1, n)
        n += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=os.environ.get("METATRAIN_OMNIGLOT_SOURCE", "../shared/data/omniglot"))
    ap.add_argument("--seconds", type=float, default=2.0, help="measuring time per row")
    args = ap.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = prepare_omniglot(args.source, Path(tmp) / "omniglot")
        prep_s = time.perf_counter() - t0
        disk = sum(p.stat().st_size for p in result.path.rglob("*") if p.is_file())
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        store = TaskStore.open(result.path)
        open_s = time.perf_counter() - t0
        mem = store.images.numel() * store.images.element_size()

        print(f"torch {torch.__version__}, numpy {np.__version__}, 1 torch thread, {os.cpu_count()} cores")
        print(f"prepare (full Omniglot, 28x28): {prep_s:.1f} s; store on disk {disk / 2**20:.1f} MiB, "
              f"images in memory {mem / 2**20:.1f} MiB; open+verify {open_s:.2f} s "
              f"(peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB, "
              f"{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024:.0f} MiB for the open)")
        print()
        print("| episode | EpisodeSampler eps/s | per-image peer eps/s | ratio | ms/episode |")
        print("|---|---:|---:|---:|---:|")
        for ways, shots, queries in SHAPES:
            ours = EpisodeSampler(store, ways=ways, shots=shots, queries=queries, split="background")
            peer = PerImageSampler(store, ways, shots, queries, store.classes_of("background"))
            r_ours = rate(ours.episode, args.seconds)
            r_peer = rate(peer.episode, args.seconds)
            print(f"| {ways}w{shots}s{queries}q | {r_ours:,.0f} | {r_peer:,.0f} | {r_ours / r_peer:.1f}x | "
                  f"{1000 / r_ours:.2f} |")
        # What data.augment (Koch et al.'s distortions, torchvision's affine per image) and data.within_alphabet
        # add to a training episode, against the plain sampler in the same run.
        print()
        print("| episode | plain ms | within-alphabet ms | augmented ms (p = 0.5) | augmented ms (p = 1) |")
        print("|---|---:|---:|---:|---:|")
        for ways, shots, queries in SHAPES:
            kw = dict(ways=ways, shots=shots, queries=queries, split="background")
            ms = [1000 / rate(EpisodeSampler(store, **kw, **extra).episode, args.seconds)
                  for extra in ({}, {"within_alphabet": True}, {"augment": Affine()}, {"augment": Affine(p=1.0)})]
            print(f"| {ways}w{shots}s{queries}q | " + " | ".join(f"{m:.2f}" for m in ms) + " |")


if __name__ == "__main__":
    main()
