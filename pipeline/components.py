"""Build a run's pieces from its Config: the task store, the samplers, the model and the initial meta-parameters.

The driver, the parameter server and every worker call these with the same Config, so they agree on the model's
architecture, the parameter names and the episodes of every (seed, step, slot) without shipping anything but the
config. Nothing here starts Ray.
"""

from __future__ import annotations

from pathlib import Path

import torch
from metatrain.models import Conv4, FewShotModel, SinusoidMLP
from metatrain.tasks.errors import DataError
from metatrain.tasks.optimizees import WindowedSampler, make_optimizee_sampler
from metatrain.tasks.samplers import EpisodeSampler, PairSampler, SequenceEpisodeSampler, SinusoidSampler
from metatrain.tasks.store import TaskStore, read_manifest

from metatrain.pipeline.algorithms import get_algorithm
from metatrain.pipeline.checkpoint import model_fingerprint
from metatrain.pipeline.config import SINUSOID_MODEL, Config, ConfigError

SPLITS = ("train", "val", "test")


def open_store(cfg: Config) -> TaskStore | None:
    """The run's store (None for sinusoids and optimizees); a missing store names the command that makes it."""
    if image_shape(cfg) is None:
        return None
    return TaskStore.open(cfg.data.path)


def build_sampler(cfg: Config, store: TaskStore | None, split: str):
    """The sampler of ``split`` (train / val / test). Training episodes use train.seed, the others train.eval_seed."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    d = cfg.data
    seed = cfg.train.seed if split == "train" else cfg.train.eval_seed
    if d.is_sinusoid:
        # Different seeds per split keep validation/test tasks apart from the training ones.
        return SinusoidSampler(shots=d.shots, queries=d.queries, seed=seed + (0 if split == "train" else 1_000_003))
    if d.optimizee_family:
        # Held-out optimizees are other draws (seeds apart from the training ones; val and test apart too).
        offset = {"train": 0, "val": 1_000_003, "test": 2_000_003}[split]
        sampler = make_optimizee_sampler(d.optimizee_family, seed=seed + offset,
                                         **cfg.optimizee.sampler_options(d.optimizee_family, d, split))
        a = cfg.algorithm
        if split == "train" and a.server_update == "window":  # evaluation unrolls whole trajectories
            return WindowedSampler(sampler, -(-a.unroll // a.truncation))  # windows per trajectory
        return sampler
    name = {"train": d.train_split, "val": d.val_split, "test": d.test_split}[split]
    rotations = None if d.rotations == "auto" else d.rotations == "on"
    if split != "train" and d.rotations == "on":
        rotations = None  # "on" asks for training augmentation; held-out splits follow their default (off)
    ways = d.ways if split == "train" else d.test_ways
    common = {"split": name, "rotations": rotations, "seed": seed, "split_seed": d.split_seed,
              "augment": d.affine() if split == "train" else None}
    a = cfg.algorithm
    if split == "train" and a.verification:  # pairs within and across alphabets by their own share
        return PairSampler(store, pairs=a.verification_pairs, within=a.verification_within, **common)
    common["within_alphabet"] = d.within_alphabet
    if cfg.sequence_episodes:
        return SequenceEpisodeSampler(store, classes=d.ways, instances=d.instances, **common)
    return EpisodeSampler(store, ways=ways, shots=d.shots, queries=d.queries, **common)


def image_shape(cfg: Config) -> tuple[int, int, int] | None:
    """(channels, height, width) of the run's images, from the store's manifest alone (no images loaded)."""
    if not cfg.data.has_images:
        return None
    try:
        return tuple(read_manifest(Path(cfg.data.path))["image_shape"])
    except DataError as e:
        if "no prepared store" in str(e):
            raise DataError(f"data.path: no prepared store at {cfg.data.path}; make it with `metatrain prepare "
                            f"omniglot --source DIR --out {cfg.data.path}`") from None
        raise


def build_model(cfg: Config, shape: tuple[int, int, int] | None) -> FewShotModel:
    """The network for this config and image shape (architecture only; weights come from the parameter server).

    The algorithm's record says how its network is built (``record.builder``, given the run's Config and the image
    shape); a record without one runs the gradient learners' Conv4 classifier. The sinusoid MLP needs no images.
    """
    m, record = cfg.model, cfg.algorithm.record
    if m.name == SINUSOID_MODEL:
        return SinusoidMLP(hidden=(m.hidden, m.hidden))
    if record.optimizee_tasks:  # the network is the learned optimizer: no images
        try:
            return record.builder(cfg, None)
        except ValueError as e:
            raise ConfigError(f"algorithm: {e}") from None
    if shape is None:
        raise ConfigError(f"model.name {m.name} needs image data (data.dataset is sinusoid)")
    channels, height, width = shape
    try:
        # Sequence models read each image flattened, any shape; the convolutional networks want square images.
        if height != width and not record.sequence_episodes:
            raise DataError(f"{cfg.data.path}: images are {height}x{width}; {m.name} expects square images")
        if record.builder is not None:
            return record.builder(cfg, shape)
        return Conv4(cfg.data.ways, in_channels=channels, hidden=m.hidden, image_size=height, pool=m.pool,
                     bn_steps=cfg.algorithm.bn_steps_needed)
    except DataError:
        raise
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def example_input(cfg: Config) -> torch.Tensor:
    """A zero input of the shape the run's model takes: what MLflow traces to save the model as pt2."""
    shape = image_shape(cfg)
    if cfg.algorithm.record.optimizee_tasks:  # the packed optimizer step (record.serve): 8 coordinates
        a = cfg.algorithm
        return torch.zeros(8, 1 + 2 * a.lstm_layers * a.lstm_hidden)
    if shape is None:
        return torch.zeros(cfg.data.shots, 1)
    if cfg.sequence_episodes:  # a sequence model: one sequence of images, each with the previous label
        c, h, w = shape
        return torch.zeros(1, cfg.data.ways * cfg.data.instances, c * h * w + cfg.data.ways)
    return torch.zeros(cfg.data.ways, *shape)


def initial_params(cfg: Config, model: FewShotModel) -> dict[str, torch.Tensor]:
    """Meta-parameters at step 0: the model's seeded initialisation plus the algorithm's own (Meta-SGD rates)."""
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(cfg.train.seed)
        if hasattr(model, "reset_parameters"):
            model.reset_parameters()
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        params.update(get_algorithm(cfg.algorithm.name).init_extra_params(model, cfg.algorithm))
    finally:
        torch.random.set_rng_state(gen_state)
    return params


def _field(cfg: Config, name: str):
    """``cfg.algorithm.<name>``, or ``cfg.<section>.<field>`` for a dotted ``section.field``."""
    section, _, field = name.rpartition(".")
    return getattr(getattr(cfg, section) if section else cfg.algorithm, field)


def fingerprint(cfg: Config, model: FewShotModel) -> str:
    """What a checkpoint must match to be loaded into this run: architecture, algorithm, episode shape."""
    extra = {"model": cfg.to_dict()["model"], "algorithm": cfg.algorithm.name, "ways": cfg.data.ways,
             "dataset": cfg.data.dataset, "metasgd_lr": cfg.algorithm.metasgd_lr}
    # The settings that shape the algorithm's own meta-parameters (meta_lstm: lstm_hidden); none for the others, so
    # their fingerprints (and old checkpoints) are unchanged.
    # A dotted name is another section's field (snail: data.shots, which fixes the model's sequence length T).
    extra.update({f: _field(cfg, f) for f in cfg.algorithm.record.shape_fields})
    return model_fingerprint(model, extra)
