"""Few-shot prediction on a user's own task: adapt a trained model to a labelled support set, label the queries.

    metatrain predict --model models:/omniglot-fomaml@champion --support my_task/support --query my_task/query \\
        [--json predictions.json] [--tracking-uri URI]
    metatrain predict --run RUN_ID --support ... --query ...

``--support`` holds one folder per class (the folder name is the class name) with a few images each; ``--query`` holds
the images to label (searched recursively). Images are decoded and resized exactly as the training store's were
(grayscale or RGB, antialiased resize to the model's size, ink-inverted when the store was: Omniglot's). The model
adapts as its algorithm does: inner-loop learners take ``eval_inner_steps`` steps on the support set, metric learners
embed it, the memory module writes it, MANN reads it as the start of its sequence. Each query gets its predicted class
and a probability (softmax of the class scores; for relation networks the relation score, for Siamese networks the
best pair's p(same), for the memory module the softmax of the best slot similarity per class).

The checkpoint is loaded with ``torch.load(weights_only=True)``. ``Predictor`` (decode -> adapt -> score) is also what
the served MLflow model runs (``metatrain.pipeline.serving.fewshot``), so both label the same images alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from metatrain.models.layers import query_logits
from metatrain.tasks.episode import Episode
from metatrain.tasks.errors import DataError, MetatrainError
from metatrain.tasks.sources import IMAGE_SUFFIXES, RawClass, class_folders, decode_class, image_files, unit_pixels
from metatrain.tasks.store import read_manifest
from torch.func import functional_call

from metatrain.pipeline.algorithms import get_algorithm
from metatrain.pipeline.components import build_model
from metatrain.pipeline.config import Config, config_from_dict

#: How each record's ``predict`` turns an algorithm's ``scores`` into probabilities.
_FROM_SCORES = {"softmax": lambda s: torch.softmax(s, -1), "sigmoid": torch.sigmoid, "probability": lambda s: s}


QUERY_CHUNK = 100  # queries decoded and scored at a time


class PredictError(MetatrainError):
    """The user's task cannot be run by this model (too many classes, no images, ...)."""


@dataclass(frozen=True)
class Prediction:
    file: str
    label: str
    probability: float


def decode_images(members: list[str], blobs: list[bytes], shape: tuple[int, int, int], invert: bool) -> torch.Tensor:
    """Encoded images as floats in [0, 1], decoded, resized and inverted as the training store's were; a file that
    does not decode is a DataError naming its ``member``."""
    channels, size, _ = shape
    raw = RawClass("predict", "", "", tuple(members), tuple(range(len(members))), tuple(blobs))
    return unit_pixels(decode_class(raw, size, channels, invert))


@dataclass(frozen=True)
class SupportClass:
    """One class of a task's support set: its name and its encoded images (``members`` name them in errors)."""

    name: str
    members: list[str]
    blobs: list[bytes]


def read_support(support: Path) -> list[SupportClass]:
    """The classes of a folder of class folders (the folder name is the class name), images read, not decoded."""
    if not support.is_dir():
        raise DataError(f"--support {support} is not a folder (expected one sub-folder of images per class)")
    class_dirs = class_folders(support)
    if not class_dirs:
        raise DataError(f"--support {support} has no class folders (expected one sub-folder of images per class)")
    classes = []
    for d in class_dirs:
        files = image_files(d, recursive=False)
        if not files:
            raise DataError(f"class folder {d} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        classes.append(SupportClass(d.name, [str(f) for f in files], [f.read_bytes() for f in files]))
    return classes


def query_files(query: Path) -> list[Path]:
    if not query.is_dir():
        raise DataError(f"--query {query} is not a folder of images")
    files = image_files(query, recursive=True)
    if not files:
        raise DataError(f"--query {query} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def store_inverts(cfg: Config) -> bool:
    """Whether the training store holds ink-inverted pixels (its manifest says; else: Omniglot stores do)."""
    try:
        return str(read_manifest(Path(cfg.data.path)).get("pixels", "")).startswith("ink-high")
    except (DataError, OSError, ValueError):
        return cfg.data.dataset == "omniglot"


def class_scorer(cfg: Config, model, params: dict, support_x: torch.Tensor, support_y: torch.Tensor):
    """``scores(query_x) -> (queries, ways)`` probabilities of each class for each query, the model adapted to the
    support set once (an inner-loop learner's steps are not redone for every batch of queries)."""
    algo = get_algorithm(cfg.algorithm.name)
    record, ways = algo.RECORD, int(support_y.max()) + 1
    if record.predict != "adapt":
        return lambda qx: class_scores(cfg, model, params, Episode(
            support_x, support_y, qx, torch.zeros(len(qx), dtype=torch.long), torch.arange(ways),
            torch.zeros(ways, dtype=torch.long), (0, 0, 0)))
    if ways != model.out_features:
        raise PredictError(f"the support set has {ways} classes but this {cfg.algorithm.name} model's head has exactly "
                           f"{model.out_features} ways (data.ways it was trained with)")
    with torch.enable_grad():
        adapted = algo.adapt(params, (support_x, support_y), cfg.algorithm, model,
                             steps=cfg.algorithm.eval_inner_steps)
    prefix = record.param_prefix
    weights = {k: v.detach() for k, v in adapted.items() if prefix is None or not k.startswith(prefix)}
    query_bn = cfg.algorithm.query_bn if record.reads_query_bn else "batch"
    return lambda qx: torch.softmax(query_logits(model, weights, support_x, qx, query_bn), -1)


def class_scores(cfg: Config, model, params: dict, episode: Episode) -> torch.Tensor:
    """``(queries, ways)`` probabilities of each class for each query of ``episode``, by a learner that does not
    adapt by gradient steps (memory, metric and sequence learners); see ``class_scorer``."""
    algo = get_algorithm(cfg.algorithm.name)
    record = algo.RECORD
    ways = int(episode.support_y.max()) + 1
    if record.predict == "sequence":
        return _mann_scores(model, params, episode, ways)
    if record.predict == "memory":
        keys = functional_call(model, params, (torch.cat([episode.support_x, episode.query_x]),))
        n = episode.support_x.shape[0]
        sims = keys[n:] @ keys[:n].T  # (queries, supports); best slot per class after the support writes
        per_class = torch.full((sims.shape[0], ways), float("-inf"))
        for c in range(ways):
            per_class[:, c] = sims[:, episode.support_y == c].max(1).values
        return torch.softmax(per_class * 10.0, -1)
    _, scores = algo.scores(params, episode, cfg.algorithm, model)
    return _FROM_SCORES[record.predict](scores)


def _mann_scores(model, params: dict, episode: Episode, ways: int) -> torch.Tensor:
    """MANN reads the support set (each image with the previous one's label), then one query: its last output."""
    if ways > model.out_features:
        raise PredictError(f"the support set has {ways} classes; this model was trained on sequences of "
                           f"{model.out_features} classes and cannot output more")
    sx, sy, qx = episode.support_x, episode.support_y, episode.query_x
    prev = torch.zeros(len(sy) + 1, model.out_features)
    prev[1:] = F.one_hot(sy, model.out_features).float()
    m = qx.shape[0]
    x = torch.cat([sx.unsqueeze(0).expand(m, *sx.shape), qx.unsqueeze(1)], dim=1)  # (m, n+1, C, H, W)
    logits = functional_call(model, params, (model.sequence_inputs(x, prev.unsqueeze(0).expand(m, -1, -1)),))
    return torch.softmax(logits[:, -1, :ways], -1)


class Predictor:
    """A checkpoint ready to label few-shot tasks: ``metatrain predict`` and the served MLflow model both go through
    it (decode -> adapt -> score), so they give the same labels for the same images."""

    def __init__(self, state: dict, invert: bool | None = None, shape: tuple[int, int, int] | None = None):
        """``invert`` and ``shape`` as the training store had them; None: from the store if it is on this machine,
        else from the checkpoint (its ``image_shape``) and the dataset (Omniglot's ink is inverted)."""
        self.cfg = cfg = config_from_dict(state["config"])
        if cfg.algorithm.record.predict == "none":
            raise PredictError(f"{cfg.algorithm.name} learns an optimizer, not a classifier: there is nothing to "
                               f"predict; use it as metatrain.pipeline.learned_optimizer.LearnedOptimizer(params, "
                               f"run=...)")
        self.shape = tuple(shape) if shape is not None else checkpoint_image_shape(state)
        self.model = build_model(cfg, self.shape)
        self.params = {k: v.float() for k, v in state["params"].items()}
        self.invert = store_inverts(cfg) if invert is None else invert

    def adapt(self, classes: list[SupportClass]) -> _Adapted:
        """The model adapted to a support set (the class order is the head's: give it sorted, as folders are)."""
        if not classes:
            raise PredictError("the support set has no classes: give at least one labelled image per class")
        xs, ys = [], []
        for label, c in enumerate(classes):
            if not c.blobs:
                raise PredictError(f"support class {c.name!r} has no images")
            xs.append(decode_images(c.members, c.blobs, self.shape, self.invert))
            ys += [label] * len(c.blobs)
        scores = class_scorer(self.cfg, self.model, self.params, torch.cat(xs), torch.tensor(ys))
        return _Adapted(self, [c.name for c in classes], scores)


@dataclass(frozen=True)
class _Adapted:
    predictor: Predictor
    names: list[str]
    scores: object  # class_scorer's ``scores(query_x) -> (queries, ways)``

    def label(self, members: list[str], read) -> list[tuple[str, float]]:
        """(class name, probability) of each query; ``read(i)`` gives the i-th query's encoded image.

        Queries are decoded and scored QUERY_CHUNK at a time, so memory stays flat in their number. A model whose
        query set is batch-normalised with its own statistics (MAML's transductive setting) sees them in these
        chunks, in the given order, as it saw 75-query sets in training."""
        p, out = self.predictor, []
        for lo in range(0, len(members), QUERY_CHUNK):
            chunk = members[lo:lo + QUERY_CHUNK]
            x = decode_images(chunk, [read(i) for i in range(lo, lo + len(chunk))], p.shape, p.invert)
            with torch.no_grad():
                probs = self.scores(x)
            best = probs.argmax(-1)
            out += [(self.names[int(b)], float(probs[i, b])) for i, b in enumerate(best.tolist())]
        return out


def checkpoint_image_shape(state: dict) -> tuple[int, int, int]:
    """(channels, height, width) the run's model takes: the store's if it is on this machine, else the
    checkpoint's own record of it."""
    from metatrain.pipeline.components import image_shape

    try:
        shape = image_shape(config_from_dict(state["config"]))
    except DataError:
        shape = None
    return tuple(shape or state.get("extra", {}).get("image_shape") or (1, 28, 28))


def predict(state: dict, support: str | Path, query: str | Path, invert: bool | None = None
            ) -> list[Prediction]:
    """Predictions for every query image, from a checkpoint ``state`` (see module docstring)."""
    predictor = Predictor(state, invert)
    support, query = Path(support), Path(query)
    classes, files = read_support(support), query_files(query)
    adapted = predictor.adapt(classes)
    labels = adapted.label([str(f) for f in files], lambda i: files[i].read_bytes())
    return [Prediction(str(f.relative_to(query)), name, prob) for f, (name, prob) in zip(files, labels)]


def write_predictions(predictions: list[Prediction], path: str | Path) -> None:
    Path(path).write_text(json.dumps([p.__dict__ for p in predictions], indent=2) + "\n")
