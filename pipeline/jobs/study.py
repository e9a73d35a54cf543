"""Task-distribution studies: one training run per cell of a grid, nested under one MLflow run, results in Parquet.

    metatrain study studies/omniglot_shots_ways.yaml [--out runs/studies/NAME] [--tracking-uri URI] [--parallel N]

A study file names a base config (or a template with ``{algorithm}``), overrides for every cell, and a ``grid``
(cartesian product) or a ``cells`` list over these axes:

    algorithm         the config template's {algorithm} (configs/omniglot_{algorithm}_5w1s.yaml by default)
    ways, shots, queries, rotations (on/off/auto), train_split, test_split (alphabet subsets: evaluation:A,B),
    inner_steps, eval_inner_steps

``ways`` is the test width: data.ways and data.eval_ways, except for ProtoNets, which keep their wider training
episodes (data.eval_ways only). Each cell is ``metatrain train`` with its overrides, tagged as a child of the study's
run (``mlflow.parentRunId``); cells run in parallel as Ray tasks (``--parallel``, default: as many as the cluster's
CPUs hold whole cells, each cell's workers in its own placement group, so cells never share a worker's CPU), or one
after another in this process with ``--parallel 1``. Per-task results of every cell go into one Parquet dataset
partitioned by cell (``OUT/results/cell=<id>/part-0.parquet``, with the cell's axis values as columns; read it with
pandas, pyarrow.dataset or DuckDB). A summary (mean accuracy ± 95% CI per cell) is printed and logged with plots of
accuracy against shots and against ways. Re-running a study skips the cells whose results exist.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from metatrain.tasks.errors import MetatrainError, did_you_mean

from metatrain.pipeline.config_parsing import read_yaml

AXES = ("algorithm", "ways", "shots", "queries", "rotations", "train_split", "test_split", "inner_steps",
        "eval_inner_steps")
FIELDS = {"shots": "data.shots", "queries": "data.queries", "rotations": "data.rotations",
          "train_split": "data.train_split", "test_split": "data.test_split",
          "inner_steps": "algorithm.inner_steps", "eval_inner_steps": "algorithm.eval_inner_steps"}
KEYS = ("name", "config", "config_template", "set", "grid", "cells", "parallel")


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
class Study:
    name: str
    cells: tuple[Cell, ...]
    parallel: int | None
    path: Path


def _err(path: Path, msg: str) -> StudyError:
    return StudyError(f"study file {path}: {msg}")


def load_study(path: str | Path) -> Study:
    """Parse and check a study file; every cell's config is loaded (and so validated) before anything runs."""
    from metatrain.pipeline.config import load_config

    path = Path(path)
    data = read_yaml(path, "study file", StudyError) or {}
    if not isinstance(data, dict):
        raise _err(path, "must be a mapping")
    for key in data:
        if key not in KEYS:
            raise _err(path, f"unknown key {key!r} (known: {', '.join(KEYS)})")
    name = str(data.get("name") or path.stem)
    if ("grid" in data) == ("cells" in data):
        raise _err(path, "give exactly one of 'grid' (axes -> lists of values) or 'cells' (a list of mappings)")
    if "grid" in data:
        grid = data["grid"]
        if not isinstance(grid, dict) or not grid or any(not isinstance(v, list) or not v for v in grid.values()):
            raise _err(path, "grid must map each axis to a non-empty list of values")
        axes = list(grid)
        combos = [dict(zip(axes, vals)) for vals in itertools.product(*(grid[a] for a in axes))]
    else:
        combos = data["cells"]
        if not isinstance(combos, list) or not combos or not all(isinstance(c, dict) and c for c in combos):
            raise _err(path, "cells must be a non-empty list of non-empty mappings")
    for combo in combos:
        for axis in combo:
            if axis not in AXES:
                raise _err(path, f"unknown axis {axis!r}{did_you_mean(axis, AXES)}; axes: {', '.join(AXES)}")
    common = data.get("set") or []
    if not isinstance(common, list) or not all(isinstance(x, str) for x in common):
        raise _err(path, "set must be a list of 'section.field=value' strings")
    template = data.get("config_template", "configs/omniglot_{algorithm}_5w1s.yaml")
    parallel = data.get("parallel")
    if parallel is not None and (not isinstance(parallel, int) or parallel < 1):
        raise _err(path, f"parallel must be an integer >= 1, got {parallel!r}")
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
    return Study(name, tuple(cells), parallel, path)


def _cell_done(out: Path, cell: Cell) -> bool:
    return (out / "results" / f"cell={cell.id}" / "part-0.parquet").is_file() and \
        (out / "cells" / cell.id / "eval.json").is_file()


def _record(out: Path, cell: Cell) -> None:
    """Add the cell's per-task results to the study's dataset, with its axis values as columns.

    pyarrow writes the hive partition ``cell=<id>``; it is written under a hidden folder (which pyarrow datasets
    skip) and renamed into place, so a crash never leaves a half-written cell that looks done.
    """
    table = pq.read_table(out / "cells" / cell.id / "eval_tasks.parquet")
    for axis, value in sorted(cell.values.items()):
        table = table.append_column(axis, pa.array([str(value)] * table.num_rows))
    table = table.append_column("cell", pa.array([cell.id] * table.num_rows))
    staging, final = out / "results" / f".staging-{cell.id}", out / "results" / f"cell={cell.id}"
    shutil.rmtree(staging, ignore_errors=True)
    pads.write_dataset(table, staging, format="parquet", partitioning=["cell"], partitioning_flavor="hive",
                       basename_template="part-{i}.parquet")
    shutil.rmtree(final, ignore_errors=True)
    (staging / final.name).rename(final)
    shutil.rmtree(staging, ignore_errors=True)


def _run_cell(cell: Cell, out: str, uri: str, parent: str, study: str, in_ray_task: bool) -> str:
    from metatrain.pipeline.jobs.train import train

    result = train(cell.config, list(cell.overrides), out=str(Path(out) / "cells" / cell.id), tracking_uri=uri,
                   quiet=True, handle_signals=not in_ray_task,
                   tags={"mlflow.parentRunId": parent, "metatrain.study": study, "metatrain.cell": cell.id,
                         **{f"metatrain.axis.{k}": str(v) for k, v in cell.values.items()}})
    return result.run_id


def summary_rows(out: Path, study: Study) -> list[dict]:
    rows = []
    for cell in study.cells:
        s = json.loads((out / "cells" / cell.id / "eval.json").read_text())
        rows.append({"cell": cell.id, **{a: cell.values.get(a, "") for a in AXES if any(a in c.values
                                                                                         for c in study.cells)},
                     "accuracy": s.get("accuracy", float("nan")), "ci95": s.get("ci95", float("nan")),
                     "tasks": s["tasks"]})
    return rows


def summary_table(rows: list[dict]) -> str:
    axes = [k for k in rows[0] if k not in ("cell", "accuracy", "ci95", "tasks")]
    lines = ["| " + " | ".join(axes) + " | accuracy | tasks |", "|" + "---|" * len(axes) + "---:|---:|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r[a]) for a in axes) +
                     f" | {100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f}% | {r['tasks']} |")
    return "\n".join(lines)


def run_study(path: str | Path, *, out: str | None = None, tracking_uri: str | None = None,
              parallel: int | None = None, ray_address: str | None = None) -> list[dict]:
    """Run every unfinished cell of a study, then write and log the summary; returns the summary rows."""
    import ray

    from metatrain.pipeline.figures import study_figures
    from metatrain.pipeline.jobs.runs import check_out_dir
    from metatrain.pipeline.jobs.train import init_ray
    from metatrain.pipeline.tracking import RunTracker, check_tracking, resolve_tracking_uri

    study = load_study(path)
    out_dir = Path(out) if out else Path("runs") / "studies" / study.name
    state_file = out_dir / "study.json"
    check_out_dir(out_dir)  # a file, a task store, a training run's folder: refused
    try:
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    except ValueError:
        raise StudyError(f"{state_file} is not valid JSON: not a study's folder, or a damaged one") from None
    if state and state.get("study", study.name) != study.name:
        raise StudyError(f"--out {out_dir} holds study {state['study']!r}, not {study.name!r}; choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    uri = resolve_tracking_uri(tracking_uri, out_dir)
    check_tracking(uri)
    # The parent run is a RunTracker like every run: FAILED / KILLED / ended at exit, journaled metrics.
    tracker = RunTracker(uri, experiment=f"study-{study.name}", run_id=state.get("parent_run_id"),
                         run_name=study.name, artifact_root=out_dir / "mlartifacts", system_metrics=False,
                         spill_dir=out_dir / "mlflow-spill")
    tracker.start(tags={"metatrain.study": study.name, "metatrain.study_file": str(study.path)})
    parent = tracker.run_id
    if not state.get("parent_run_id"):
        state_file.write_text(json.dumps({"parent_run_id": parent, "tracking_uri": uri, "study": study.name}) + "\n")
    todo = [c for c in study.cells if not _cell_done(out_dir, c)]
    skipped = len(study.cells) - len(todo)
    if skipped:
        print(f"metatrain: study {study.name}: {skipped} of {len(study.cells)} cells already done, skipping them")
    started_ray = init_ray(ray_address)
    try:
        with tracker:  # FINISHED; FAILED on an exception; KILLED on Ctrl-C
            from metatrain.pipeline.config import load_config

            cpus = ray.cluster_resources().get("CPU", 1)
            cfgs = [load_config(x.config, x.overrides) for x in todo]
            per_cell = max((c.workers.count * c.workers.cpus for c in cfgs), default=1)
            width = parallel or study.parallel or max(1, int(cpus // max(per_cell, 1)))
            if width == 1:
                for cell in todo:
                    print(f"metatrain: study {study.name}: cell {cell.id}", flush=True)
                    _run_cell(cell, str(out_dir), uri, parent, study.name, False)
                    _record(out_dir, cell)
            else:
                remote = ray.remote(num_cpus=0)(_run_cell)
                pending, queue = {}, list(todo)
                while queue or pending:
                    while queue and len(pending) < width:
                        cell = queue.pop(0)
                        pending[remote.remote(cell, str(out_dir), uri, parent, study.name, True)] = cell
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    cell = pending.pop(ready[0])
                    ray.get(ready[0])  # a failed cell raises here; the others' results are already recorded
                    _record(out_dir, cell)
            rows = summary_rows(out_dir, study)
            table = summary_table(rows)
            print(table)
            (out_dir / "summary.md").write_text(table + "\n")
            tracker.log_artifact(out_dir / "summary.md")
            for name, fig in study_figures(rows).items():
                fig.savefig(out_dir / name, dpi=100)
                tracker.log_artifact(out_dir / name)
            tracker.log_metrics({f"cell.{r['cell'][:200]}.accuracy": r["accuracy"] for r in rows}, step=0)
            print(f"study {study.name}: {len(rows)} cells; per-task results in {out_dir / 'results'} "
                  f"(partitioned by cell); summary {out_dir / 'summary.md'}")
            return rows
    finally:
        if started_ray:
            ray.shutdown()


__all__ = ["AXES", "Cell", "Study", "StudyError", "load_study", "run_study", "summary_table"]
