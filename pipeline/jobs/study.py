"""Task-distribution studies: every cell of a grid, or every sample of a search space, is a Ray Tune trial.

    metatrain study studies/omniglot_shots_ways.yaml [--out runs/studies/NAME] [--tracking-uri URI] [--parallel N]

A study file names a base config (or a template with ``{algorithm}``), overrides for every cell (``set``), and
``grid`` (cartesian product) or ``cells`` (a list) over these axes:

    algorithm         the config template's {algorithm} (configs/omniglot_{algorithm}_5w1s.yaml by default)
    ways, shots, queries, rotations (on/off/auto), train_split, test_split (alphabet subsets: evaluation:A,B),
    inner_steps, eval_inner_steps

``ways`` is the test width: data.ways and data.eval_ways, except for ProtoNets, which keep their wider training
episodes (data.eval_ways only). On top of the cells, ``search`` maps ANY config field to a distribution, one of
``{loguniform: [lo, hi]}``, ``{uniform: [lo, hi]}``, ``{randint: [lo, hi]}`` (hi excluded), ``{choice: [...]}``,
``{grid: [...]}``; ``num_samples`` draws that many samples per cell (the grids are crossed, not sampled);
``max_concurrent_trials`` (or the older ``parallel``) caps the trials at once; ``scheduler: {name: asha, metric:
val/acc, mode: max, grace_period: 1, reduction_factor: 2, max_t: ...}`` stops bad trials early on their
validations (``grace_period`` and ``max_t`` count validations); ``max_failures`` retries a failed trial (default 1).
The Tune side (trials, resources, resume, signals) is pipeline/jobs/study_trial.py.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from metatrain.tasks.errors import MetatrainError, did_you_mean

from metatrain.pipeline.config_parsing import read_yaml

AXES = ("algorithm", "ways", "shots", "queries", "rotations", "train_split", "test_split", "inner_steps",
        "eval_inner_steps")
FIELDS = {"shots": "data.shots", "queries": "data.queries", "rotations": "data.rotations",
          "train_split": "data.train_split", "test_split": "data.test_split",
          "inner_steps": "algorithm.inner_steps", "eval_inner_steps": "algorithm.eval_inner_steps"}
KEYS = ("name", "config", "config_template", "set", "grid", "cells", "search", "num_samples",
        "max_concurrent_trials", "parallel", "scheduler", "max_failures")
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")
SCHEDULER_KEYS = ("name", "metric", "mode", "grace_period", "reduction_factor", "max_t")


class StudyError(MetatrainError):
    """A study file is invalid (the message names the key or axis)."""


@dataclass(frozen=True)
class Cell:
    values: dict
    """Axis -> value for this cell."""
    config: str
    overrides: tuple[str, ...]

    @property
    def id(self) -> str:
        text = json.dumps({"config": self.config, "overrides": list(self.overrides)}, sort_keys=True)
        readable = "-".join(f"{k}{v}" for k, v in sorted(self.values.items()))[:60].replace("/", "_").replace(":", "_")
        return f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class Scheduler:
    """ASHA over each trial's validations (``grace_period``, ``max_t``: validations, Tune's training iterations)."""
    name: str
    metric: str
    mode: str
    grace_period: int
    reduction_factor: float
    max_t: int


@dataclass(frozen=True)
class Study:
    name: str
    cells: tuple[Cell, ...]
    parallel: int | None
    path: Path
    grid: dict | None = None
    """axis -> values when the file gives a grid (each axis becomes a ``tune.grid_search``); None for ``cells``."""
    search: dict = field(default_factory=dict)
    """config field -> (distribution, arguments)."""
    num_samples: int = 1
    scheduler: Scheduler | None = None
    max_failures: int = 1

    @property
    def sampled(self) -> bool:
        """Whether a trial's values are drawn (then two trials may draw the same cell: each gets its own folder)."""
        return any(kind != "grid" for kind, _ in self.search.values())

    @property
    def trial_count(self) -> int:
        grids = math.prod(len(args) for kind, args in self.search.values() if kind == "grid")
        return len(self.cells) * grids * self.num_samples

    @property
    def digest(self) -> str:
        """What the trials are: a Tune experiment made from other trials cannot be resumed with this file."""
        text = json.dumps([[c.config, list(c.overrides)] for c in self.cells] +
                          [self.search, self.num_samples], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def cell_of(self, values: dict, drawn: dict | None = None) -> Cell:
        """The cell of a trial: its axis values, plus the search fields' values it drew (their overrides last)."""
        base = next(c for c in self.cells if c.values == values)
        if not drawn:
            return base
        extra = tuple(f"{k}={v}" for k, v in sorted(drawn.items()))
        return Cell({**base.values, **drawn}, base.config, base.overrides + extra)


def _err(path: Path, msg: str) -> StudyError:
    return StudyError(f"study file {path}: {msg}")


def _combos(path: Path, data: dict) -> tuple[list[dict], dict | None]:
    """The cells' axis values, and the grid they came from (None for a ``cells`` list or a search alone)."""
    if "grid" in data and "cells" in data:
        raise _err(path, "give exactly one of 'grid' (axes -> lists of values) or 'cells' (a list of mappings)")
    if "grid" in data:
        grid = data["grid"]
        if not isinstance(grid, dict) or not grid or any(not isinstance(v, list) or not v for v in grid.values()):
            raise _err(path, "grid must map each axis to a non-empty list of values")
        axes = list(grid)
        combos = [dict(zip(axes, vals)) for vals in itertools.product(*(grid[a] for a in axes))]
    elif "cells" in data:
        grid, combos = None, data["cells"]
        if not isinstance(combos, list) or not combos or not all(isinstance(c, dict) and c for c in combos):
            raise _err(path, "cells must be a non-empty list of non-empty mappings")
    elif data.get("search"):
        grid, combos = None, [{}]  # one cell: the base config, searched over
    else:
        raise _err(path, "give exactly one of 'grid' (axes -> lists of values) or 'cells' (a list of mappings), "
                         "or a 'search' over config fields")
    for combo in combos:
        for axis in combo:
            if axis not in AXES:
                raise _err(path, f"unknown axis {axis!r}{did_you_mean(axis, AXES)}; axes: {', '.join(AXES)}")
    return combos, grid


def _cells(path: Path, data: dict, combos: list[dict]) -> list[Cell]:
    from metatrain.pipeline.config import load_config

    common = data.get("set") or []
    if not isinstance(common, list) or not all(isinstance(x, str) for x in common):
        raise _err(path, "set must be a list of 'section.field=value' strings")
    template = data.get("config_template", "configs/omniglot_{algorithm}_5w1s.yaml")
    cells = []
    for combo in combos:
        if "algorithm" in combo:
            config = template.format(algorithm=combo["algorithm"])
        elif "config" in data:
            config = str(data["config"])
        else:
            raise _err(path, "no config: give 'config', or an 'algorithm' axis with 'config_template'")
        if not Path(config).is_file():
            raise _err(path, f"config {config} (cell {combo}) does not exist")
        overrides = list(common)
        for axis, value in combo.items():
            if axis == "ways":
                record = load_config(config, overrides).algorithm.record
                overrides += [f"data.eval_ways={value}"] if record.trains_on_more_ways else [f"data.ways={value}",
                                                                                             f"data.eval_ways={value}"]
            elif axis != "algorithm":
                overrides.append(f"{FIELDS[axis]}={value}")
        try:
            load_config(config, overrides)
        except MetatrainError as e:
            raise _err(path, f"cell {combo}: {e}") from None
        cell = Cell(dict(combo), config, tuple(overrides))
        twin = next((i for i, c in enumerate(cells) if c.id == cell.id or (c.config, c.overrides) == (config,
                                                                                                 cell.overrides)), None)
        if twin is not None:  # one output folder and one MLflow run for two cells: both would train into it
            raise _err(path, f"cells {twin + 1} and {len(cells) + 1} are the same cell {combo} (id {cell.id})")
        cells.append(cell)
    return cells


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _distribution(path: Path, name: str, spec) -> tuple[str, list]:
    """(kind, arguments) of one search field, its bounds checked."""
    where = f"search {name}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise _err(path, f"{where}: give one distribution as a mapping, e.g. {{loguniform: [0.01, 1.0]}}; one of "
                         f"{', '.join(DISTRIBUTIONS)}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise _err(path, f"{where}: unknown distribution {kind!r}{did_you_mean(str(kind), DISTRIBUTIONS)}; one of "
                         f"{', '.join(DISTRIBUTIONS)}")
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise _err(path, f"{where}: {kind} takes a non-empty list of values")
        if len({json.dumps(a, sort_keys=True, default=str) for a in args}) < len(args):
            raise _err(path, f"{where}: {kind} lists a value twice ({args})")
        return kind, list(args)
    if not isinstance(args, list) or len(args) != 2 or not all(map(_number, args)) or not args[0] < args[1]:
        raise _err(path, f"{where}: {kind} takes [low, high] with low < high, got {args!r}")
    if kind == "loguniform" and args[0] <= 0:
        raise _err(path, f"{where}: loguniform needs low > 0, got {args[0]!r}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise _err(path, f"{where}: randint takes integers [low, high) , got {args!r}")
    return kind, list(args)


def _search(path: Path, data: dict, cells: list[Cell]) -> dict:
    """The search fields, each checked against every cell's config at its bounds (or every listed value)."""
    from metatrain.pipeline.config import load_config

    search = data.get("search") or {}
    if not isinstance(search, dict):
        raise _err(path, "search must map config fields (section.field) to distributions")
    out = {}
    for name, spec in search.items():
        kind, args = _distribution(path, str(name), spec)
        fixed = {o.split("=", 1)[0] for c in cells for o in c.overrides}
        if name in fixed:
            raise _err(path, f"search {name}: also set by the study's 'set' or an axis; give it in one place")
        probes = args if kind in ("choice", "grid") else [args[0], args[1] - 1 if kind == "randint" else args[1]]
        for cell, value in [(cells[0], v) for v in probes] + [(c, probes[0]) for c in cells[1:]]:
            try:
                load_config(cell.config, list(cell.overrides) + [f"{name}={value}"])
            except MetatrainError as e:
                raise _err(path, f"search {name} = {value!r}: {e}") from None
        out[str(name)] = (kind, args)
    return out


def _positive(path: Path, data: dict, key: str, default: int | None) -> int | None:
    value = data.get(key, default)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise _err(path, f"{key} must be an integer >= 1, got {value!r}")
    return value


def _scheduler(path: Path, spec, cells: list[Cell]) -> Scheduler | None:
    """ASHA, fed by the trials' validations: every cell must validate (train.val_every > 0)."""
    from metatrain.pipeline.config import load_config

    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("name") != "asha":
        raise _err(path, f"scheduler must be a mapping with name: asha (and metric, mode), got {spec!r}")
    unknown = [k for k in spec if k not in SCHEDULER_KEYS]
    if unknown:
        raise _err(path, f"scheduler: unknown key {unknown[0]!r}; known: {', '.join(SCHEDULER_KEYS)}")
    metric, mode = spec.get("metric"), spec.get("mode")
    if not isinstance(metric, str) or not metric.startswith("val/"):
        raise _err(path, f"scheduler.metric must be a validation metric (val/acc, val/loss, val/mse, "
                         f"val/final_loss), got {metric!r}")
    if mode not in ("max", "min"):
        raise _err(path, f"scheduler.mode must be max or min, got {mode!r}")
    reports = []
    for cell in cells:
        train = load_config(cell.config, list(cell.overrides)).train
        if not train.val_every:
            raise _err(path, f"scheduler asha stops trials on their validations, but cell {cell.values or '(base)'} "
                             f"never validates: set train.val_every > 0")
        reports.append(train.steps // train.val_every + 1)  # the validations and the final report
    grace = _positive(path, spec, "grace_period", 1)
    max_t = _positive(path, spec, "max_t", max(reports))
    factor = spec.get("reduction_factor", 2)
    if not _number(factor) or factor <= 1:
        raise _err(path, f"scheduler.reduction_factor must be a number > 1, got {factor!r}")
    if max_t < grace:
        raise _err(path, f"scheduler.max_t ({max_t}) must be at least its grace_period ({grace})")
    return Scheduler("asha", metric, mode, grace, float(factor), max_t)


def load_study(path: str | Path) -> Study:
    """Parse and check a study file; every cell's config, and every search field at its bounds, is loaded (and so
    validated) before anything runs."""
    path = Path(path)
    data = read_yaml(path, "study file", StudyError) or {}
    if not isinstance(data, dict):
        raise _err(path, "must be a mapping")
    for key in data:
        if key not in KEYS:
            raise _err(path, f"unknown key {key!r}{did_you_mean(str(key), KEYS)} (known: {', '.join(KEYS)})")
    name = str(data.get("name") or path.stem)
    combos, grid = _combos(path, data)
    cells = _cells(path, data, combos)
    search = _search(path, data, cells)
    if "parallel" in data and "max_concurrent_trials" in data:
        raise _err(path, "give max_concurrent_trials or its older name parallel, not both")
    parallel = _positive(path, data, "max_concurrent_trials" if "max_concurrent_trials" in data else "parallel", None)
    num_samples = _positive(path, data, "num_samples", 1)
    failures = data.get("max_failures", 1)
    if not isinstance(failures, int) or isinstance(failures, bool) or failures < 0:
        raise _err(path, f"max_failures must be an integer >= 0, got {failures!r}")
    study = Study(name, tuple(cells), parallel, path, grid, search, num_samples,
                  _scheduler(path, data.get("scheduler"), cells), failures)
    if num_samples > 1 and not study.sampled:
        raise _err(path, f"num_samples {num_samples} would train every cell {num_samples} times with the same "
                         f"config: draw something (a search field with loguniform, uniform, randint or choice)")
    return study


def summary_rows(out: Path, study: Study) -> list[dict]:
    """One row per finished trial (its folder's trial.json, or a cell of an earlier study version without one)."""
    from metatrain.pipeline.jobs.study_trial import cell_done

    found = {}
    for folder in sorted((out / "cells").glob("*/eval.json")):
        name = folder.parent.name
        if not cell_done(out, name):
            continue
        marker = folder.parent / "trial.json"
        values = json.loads(marker.read_text())["values"] if marker.is_file() else \
            next((c.values for c in study.cells if c.id == name), None)
        if values is not None:
            found[name] = (values, json.loads(folder.read_text()))
    columns = [a for a in AXES if any(a in c.values for c in study.cells)] + list(study.search)
    rows = []
    for name, (values, s) in found.items():
        rows.append({"cell": name, **{a: values.get(a, "") for a in columns},
                     "accuracy": s.get("accuracy", float("nan")), "ci95": s.get("ci95", float("nan")),
                     "tasks": s["tasks"]})
    return rows


def summary_table(rows: list[dict]) -> str:
    axes = [k for k in rows[0] if k not in ("cell", "accuracy", "ci95", "tasks")]
    shown = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(axes) + " | accuracy | tasks |", "|" + "---|" * len(axes) + "---:|---:|"]
    for r in rows:
        lines.append("| " + " | ".join(shown(r[a]) for a in axes) +
                     f" | {100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f}% | {r['tasks']} |")
    return "\n".join(lines)


def _study_state(out_dir: Path, study: Study) -> dict:
    """OUT/study.json (the parent run, the study's name and what its trials are), checked against this file."""
    state_file = out_dir / "study.json"
    try:
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    except ValueError:
        raise StudyError(f"{state_file} is not valid JSON: not a study's folder, or a damaged one") from None
    if state and state.get("study", study.name) != study.name:
        raise StudyError(f"--out {out_dir} holds study {state['study']!r}, not {study.name!r}; choose another --out")
    if state.get("digest", study.digest) != study.digest and (out_dir / "tune").is_dir():
        raise StudyError(f"--out {out_dir} holds study {study.name!r} with other trials (its cells, search or "
                         f"num_samples changed since): its Tune experiment cannot resume them; choose another --out")
    return state


def run_study(path: str | Path, *, out: str | None = None, tracking_uri: str | None = None,
              parallel: int | None = None, ray_address: str | None = None) -> list[dict]:
    """Run (or resume) a study's trials on Ray Tune, then write and log the summary; returns the summary rows."""
    import os

    import ray

    from metatrain.pipeline.figures import study_figures
    from metatrain.pipeline.jobs.runs import check_out_dir
    from metatrain.pipeline.jobs.study_trial import TrialContext, run_trials
    from metatrain.pipeline.jobs.train import init_ray
    from metatrain.pipeline.tracking import RunTracker, check_tracking, resolve_tracking_uri

    study = load_study(path)
    out_dir = Path(out) if out else Path("runs") / "studies" / study.name
    check_out_dir(out_dir)  # a file, a task store, a training run's folder: refused
    state = _study_state(out_dir, study)
    out_dir.mkdir(parents=True, exist_ok=True)
    uri = resolve_tracking_uri(tracking_uri, out_dir)
    check_tracking(uri)
    # The parent run is a RunTracker like every run: FAILED / KILLED / ended at exit, journaled metrics.
    tracker = RunTracker(uri, experiment=f"study-{study.name}", run_id=state.get("parent_run_id"),
                         run_name=study.name, artifact_root=out_dir / "mlartifacts", system_metrics=False,
                         spill_dir=out_dir / "mlflow-spill")
    tracker.start(tags={"metatrain.study": study.name, "metatrain.study_file": str(study.path)})
    parent = tracker.run_id
    (out_dir / "study.json").write_text(json.dumps({"parent_run_id": parent, "tracking_uri": uri,
                                                    "study": study.name, "digest": study.digest}) + "\n")
    done = len(summary_rows(out_dir, study))
    if done:
        print(f"metatrain: study {study.name}: {done} of {study.trial_count} trials already done")
    started_ray = init_ray(ray_address)
    try:
        with tracker:  # FINISHED; FAILED on an exception; KILLED on Ctrl-C / SIGTERM
            ctx = TrialContext(study, str(out_dir.resolve()), uri, parent, os.getcwd())
            grid = run_trials(ctx, parallel)
            rows = summary_rows(out_dir, study)
            if rows:
                table = summary_table(rows)
                print(table)
                (out_dir / "summary.md").write_text(table + "\n")
                tracker.log_artifact(out_dir / "summary.md")
                for name, fig in study_figures(rows).items():
                    fig.savefig(out_dir / name, dpi=100)
                    tracker.log_artifact(out_dir / name)
                tracker.log_metrics({f"cell.{r['cell'][:200]}.accuracy": r["accuracy"] for r in rows}, step=0)
            print(f"study {study.name}: {len(rows)} of {len(grid)} trials finished ({len(grid) - len(rows)} stopped "
                  f"early or failed); per-task results in {out_dir / 'results'} (partitioned by cell); summary "
                  f"{out_dir / 'summary.md'}")
            if grid.num_errors:
                first = str(grid.errors[0]).strip().splitlines()[-1][:300]
                raise StudyError(f"{grid.num_errors} of {len(grid)} trials failed after {study.max_failures} "
                                 f"retries (first: {first}); their Tune logs are in {out_dir / 'tune'}; run the "
                                 f"study again to retry them")
            return rows
    finally:
        if started_ray:
            ray.shutdown()


__all__ = ["AXES", "Cell", "Scheduler", "Study", "StudyError", "load_study", "run_study", "summary_table"]
