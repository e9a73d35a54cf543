"""The ``metatrain`` command line (also ``python -m metatrain.pipeline``).

    metatrain prepare omniglot --source ../shared/data/omniglot --out data/omniglot
    metatrain prepare imagefolder --source my_images/ --out data/mine --channels 3
    metatrain sample --data data/omniglot --ways 5 --shots 1 --queries 15 --split evaluation
    metatrain train configs/omniglot_fomaml_5w1s.yaml --out runs/fomaml [--set train.steps=300] [--resume RUN_ID]
    metatrain eval --run RUN_ID [--tasks 600]     |     metatrain eval --model models:/NAME@champion
    metatrain predict --model models:/NAME@champion --support DIR --query DIR [--json OUT]
    metatrain retrain configs/omniglot_fomaml_5w1s.yaml --model omniglot-fomaml --budget-steps 500
    metatrain study studies/omniglot_shots_ways.yaml [--parallel 2]

Every user-facing failure is a ``MetatrainError``: printed as one line ``metatrain: error: ...`` with exit code 2.
An ``OSError`` (disk full, permission denied; also from inside a Ray actor) is one such line with its path and what
to do, exit code 1. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from metatrain.tasks.errors import MetatrainError

OMNIGLOT_SOURCE_ENV = "METATRAIN_OMNIGLOT_SOURCE"


class CliError(MetatrainError):
    """A bad command-line flag."""


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="turn raw images into a Parquet task store")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="{omniglot,imagefolder}")
    om = kinds.add_parser("omniglot", help="the Omniglot archives images_background.zip and images_evaluation.zip")
    om.add_argument("--source", default=None,
                    help=f"folder holding the two archives (or their unpacked folders); default ${OMNIGLOT_SOURCE_ENV}")
    om.add_argument("--out", default="data/omniglot", help="store folder to write (default: data/omniglot)")
    om.add_argument("--size", type=int, default=28, help="image side in pixels after resizing (default 28; 105 = none)")
    im = kinds.add_parser("imagefolder", help="your own images: one sub-folder per class")
    im.add_argument("--source", required=True, help="folder with one sub-folder of images per class")
    im.add_argument("--out", required=True, help="store folder to write")
    im.add_argument("--size", type=int, default=28, help="image side in pixels after resizing (default 28)")
    im.add_argument("--channels", type=int, default=1, help="1 = grayscale (default), 3 = RGB")
    im.add_argument("--split", default="all", help="partition name for these classes (default: all); a folder of "
                    "split folders (train/ val/ test/ of class folders) gives one partition per split folder")


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="draw one episode from a store and print it")
    p.add_argument("--data", default="data/omniglot", help="store folder (default: data/omniglot)")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--split", default="evaluation", help="class split, e.g. background, evaluation, maml/test")
    p.add_argument("--rotations", choices=("auto", "on", "off"), default="auto",
                   help="rotation classes: auto = on for training splits only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=0)
    p.add_argument("--slot", type=int, default=0)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="meta-train on Ray, tracked in MLflow")
    p.add_argument("config", nargs="?", default=None, help="YAML config (configs/*.yaml); defaults if omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=500 (repeatable)")
    p.add_argument("--out", default=None, help="run folder (default: runs/run-<time>)")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else local)")
    p.add_argument("--resume", default=None, metavar="RUN_ID", help="continue this MLflow run from its checkpoint")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                   "else sqlite:///OUT/mlflow.db)")
    p.add_argument("--register", default=None, metavar="NAME", help="register the final model under NAME")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a run or a registered model on test episodes")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", default=None, metavar="RUN_ID", help="an MLflow run made by metatrain train")
    which.add_argument("--model", default=None, metavar="URI", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("--tasks", type=int, default=None, help="test episodes (default: the run's train.eval_tasks)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=None, help="folder for eval.json and eval_tasks.parquet")
    _add_checkpoint(p)
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")


def _add_checkpoint(p) -> None:
    p.add_argument("--checkpoint", default=None, choices=("final", "best", "latest"),
                   help="with --run: which of its checkpoints (default final; an unfinished run has none)")


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="adapt a trained model to your labelled support images and label your queries")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", default=None, help="registered model, models:/NAME@ALIAS or models:/NAME/VERSION")
    src.add_argument("--run", default=None, help="a run id (its final checkpoint unless --checkpoint)")
    p.add_argument("--support", required=True, help="folder with one sub-folder of images per class")
    p.add_argument("--query", required=True, help="folder of images to label")
    p.add_argument("--json", default=None, help="also write the predictions to this JSON file")
    _add_checkpoint(p)
    p.add_argument("--invert", choices=("auto", "yes", "no"), default="auto",
                   help="invert pixels to ink-high: auto = as the training store did (Omniglot: yes)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI)")


def _add_retrain(sub) -> None:
    p = sub.add_parser("retrain", help="train a challenger from the @champion, promote it only if it is better")
    p.add_argument("config", help="YAML config of the challenger (same model as the champion)")
    p.add_argument("--model", required=True, help="registered model name")
    p.add_argument("--budget-steps", type=int, default=None, help="training steps (default: the config's)")
    p.add_argument("--margin", type=float, default=None,
                   help="accuracy gain needed to promote (default: 95%% CI half-width of the paired difference)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=V")
    p.add_argument("--out", default=None, help="run folder (default runs/retrain-NAME-<time>)")
    p.add_argument("--tracking-uri", default=None, help="MLflow registry (default $MLFLOW_TRACKING_URI)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    p.add_argument("--quiet", action="store_true")


def _add_study(sub) -> None:
    p = sub.add_parser("study", help="a Ray Tune study: one trial per cell of a grid or sample of a search space")
    p.add_argument("study", help="study file (studies/*.yaml)")
    p.add_argument("--out", default=None,
                   help="study folder (default runs/studies/NAME); running again resumes its Tune experiment")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default OUT/mlflow.db)")
    p.add_argument("--parallel", type=int, default=None,
                   help="trials at once: max_concurrent_trials (default: as many as the cluster holds)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metatrain", description="Distributed meta-learning on Ray with MLflow.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prepare(sub)
    _add_sample(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_predict(sub)
    _add_retrain(sub)
    _add_study(sub)
    return parser


def cmd_prepare(args) -> int:
    from metatrain.tasks.prepare import OMNIGLOT_IMAGES, prepare_imagefolder, prepare_omniglot
    from tqdm import tqdm

    with tqdm(total=OMNIGLOT_IMAGES if args.kind == "omniglot" else None, unit="img", desc="prepare",
              disable=None, leave=False) as bar:
        if args.kind == "omniglot":
            source = args.source or os.environ.get(OMNIGLOT_SOURCE_ENV)
            if not source:
                raise CliError(f"no Omniglot source: pass --source DIR or set {OMNIGLOT_SOURCE_ENV}")
            result = prepare_omniglot(source, args.out, args.size, progress=bar.update)
        else:
            result = prepare_imagefolder(args.source, args.out, args.size, args.channels, args.split,
                                         progress=bar.update)
    m = result.manifest
    verb = "wrote" if result.rebuilt else "nothing to do:"
    print(f"{verb} {result.path} ({result.reason})")
    for split, s in sorted(m["splits"].items()):
        print(f"  {split:<12} {s['classes']:>6} classes {s['images']:>8} images")
    print(f"  {'total':<12} {m['classes']:>6} classes {m['images']:>8} images, "
          f"{'x'.join(map(str, m['image_shape']))} uint8")
    return 0


def _ascii(img, width: int = 28) -> list[str]:
    """A (1, H, W) image in [0, 1] as text rows, downsampled to ``width`` columns, ink drawn as '#'."""
    import torch.nn.functional as F

    small = F.adaptive_max_pool2d(img.mean(0, keepdim=True)[None], (width // 2, width))[0, 0]
    return ["".join(" .:#"[min(3, int(v * 4))] for v in row) for row in small.tolist()]


def cmd_sample(args) -> int:
    from metatrain.tasks.samplers import EpisodeSampler
    from metatrain.tasks.store import TaskStore

    store = TaskStore.open(args.data)
    rotations = {"auto": None, "on": True, "off": False}[args.rotations]
    sampler = EpisodeSampler(store, ways=args.ways, shots=args.shots, queries=args.queries, split=args.split,
                             rotations=rotations, seed=args.seed)
    ep = sampler.episode(args.step, args.slot)
    print(f"episode (seed={args.seed}, step={args.step}, slot={args.slot}) of {store.path}, split {args.split!r} "
          f"({sampler.num_classes} classes): {args.ways}-way {args.shots}-shot, {args.queries} queries/class")
    print(f"  support_x {tuple(ep.support_x.shape)} {ep.support_x.dtype}, support_y {ep.support_y.tolist()}")
    print(f"  query_x   {tuple(ep.query_x.shape)} {ep.query_x.dtype}, query_y   {len(ep.query_y)} labels")
    for label, (c, r) in enumerate(zip(ep.classes.tolist(), ep.rotations.tolist())):
        print(f"  label {label}: class {c:>5} {store.class_names[c]} (rotated {90 * r} deg)")
    shown = ep.support_x[:: args.shots][:8]  # first shot of up to 8 labels, side by side
    rows = [_ascii(img) for img in shown]
    print("  " + " | ".join(f"label {i:<22}" for i in range(len(rows))))
    for line in zip(*rows):
        print("  " + " | ".join(line))
    return 0


def cmd_train(args) -> int:
    from metatrain.pipeline.jobs.train import train

    train(args.config, args.overrides, out=args.out, ray_address=args.ray_address, resume=args.resume,
          tracking_uri=args.tracking_uri, register=args.register, quiet=args.quiet)
    return 0


def cmd_eval(args) -> int:
    from metatrain.pipeline.jobs.train import evaluate

    evaluate(args.run, args.model, tasks=args.tasks, overrides=args.overrides, out=args.out,
             tracking_uri=args.tracking_uri, checkpoint=args.checkpoint)
    return 0


def cmd_predict(args) -> int:
    from metatrain.pipeline.jobs.predict import predict, write_predictions
    from metatrain.pipeline.jobs.runs import RunError, checkpoint_of
    from metatrain.pipeline.tracking import explicit_tracking_uri

    uri = explicit_tracking_uri(args.tracking_uri)
    if args.model and not uri:
        raise RunError("--model needs the registry: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    if args.json:
        _check_json_out(Path(args.json), Path(args.support), Path(args.query))
    state, what = checkpoint_of(args.run, args.model, uri, args.checkpoint)
    print(f"checkpoint: {what}, step {state['step']}", file=sys.stderr)
    invert = None if args.invert == "auto" else args.invert == "yes"
    predictions = predict(state, args.support, args.query, invert=invert)
    width = max(len(p.file) for p in predictions)
    for p in predictions:
        print(f"{p.file:<{width}}  {p.label}  {p.probability:.3f}")
    if args.json:
        write_predictions(predictions, args.json)
        print(f"wrote {len(predictions)} predictions of {what} to {args.json}", file=sys.stderr)
    return 0


def _check_json_out(path: Path, *inputs: Path) -> None:
    """--json must be a file we may write, outside the task it labels (the next predict would read it)."""
    if path.is_dir():
        raise CliError(f"--json {path} is a folder; give a file name")
    for folder in inputs:
        if path.resolve().is_relative_to(folder.resolve()):
            raise CliError(f"--json {path} lies inside {folder}, the task it labels; write it elsewhere")
    if not path.parent.is_dir():
        raise CliError(f"--json {path}: folder {path.parent} does not exist")


def cmd_retrain(args) -> int:
    from metatrain.pipeline.jobs.retrain import retrain

    retrain(args.config, args.model, budget_steps=args.budget_steps, overrides=args.overrides,
            tracking_uri=args.tracking_uri, out=args.out, margin=args.margin, ray_address=args.ray_address,
            quiet=args.quiet)
    return 0  # promoted or kept: both are a successful retrain (the message says which)


def cmd_study(args) -> int:
    from metatrain.pipeline.jobs.study import run_study

    if args.parallel is not None and args.parallel < 1:
        raise CliError(f"--parallel must be >= 1, got {args.parallel}")
    run_study(args.study, out=args.out, tracking_uri=args.tracking_uri, parallel=args.parallel,
              ray_address=args.ray_address)
    return 0


COMMANDS = {"prepare": cmd_prepare, "sample": cmd_sample, "train": cmd_train, "eval": cmd_eval,
            "predict": cmd_predict, "retrain": cmd_retrain, "study": cmd_study}


# What to do about the I/O errors a user can fix (disk full, permissions, a path of the wrong kind).
_IO_ADVICE = {errno.ENOSPC: "the disk is full: free space there or pass another --out",
              errno.EDQUOT: "the disk quota is used up: free space there or pass another --out",
              errno.EACCES: "check its permissions or pass another path",
              errno.EPERM: "check its permissions or pass another path",
              errno.EROFS: "the file system is read-only: pass another path",
              errno.ENOTDIR: "a part of that path is a file, not a folder",
              errno.EISDIR: "that is a folder where a file is needed",
              errno.ENOENT: "it does not exist"}


def io_error_line(e: OSError, where: str | None = None) -> str:
    """One line for an OSError: the path, the system's reason and what to do. A Ray task's error (the parameter
    server's checkpoint on a full disk) is its worker's OSError, traceback and all, in ``.cause``."""
    e = e.cause if isinstance(getattr(e, "cause", None), OSError) else e
    path = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None) or \
        (f"writing under {where}" if where else "(no path)")
    reason = e.strerror or " ".join(str(e).split())[:200]
    advice = _IO_ADVICE.get(e.errno)
    return f"{path}: {reason}" + (f"; {advice}" if advice else "")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except MetatrainError as e:
        print(f"metatrain: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine's fault, not the input's: exit 1
        print(f"metatrain: error: {io_error_line(e, getattr(args, 'out', None))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("metatrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
