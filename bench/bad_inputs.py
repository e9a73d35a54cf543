"""The bad-input table: each case of tests/test_bad_inputs.py run once, its error line and the integrity verdict.

    python bench/bad_inputs.py            # about a minute: trains one tiny run, then feeds it 24 bad inputs
    python bench/bad_inputs.py --only study-search-typo,study-trials-changed    # those rows, numbered as in the table

Every row is also a test (``pytest tests/test_bad_inputs.py``); this script prints them as the Markdown table the
README quotes. "intact" means: exit code 2, exactly one ``metatrain: error:`` line matching the expected message,
the store's and the run's files byte-identical, no MLflow run status changed or left RUNNING, no checkpoint written
to a fresh --out, no pickled code run.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.chdir(REPO)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)

import ray  # noqa: E402
from test_bad_inputs import CASES, run_case, trained_run  # noqa: E402


class GradientCase:
    kind, what = "gradient", "a worker's contribution with a NaN (parameter server, in process)"


def bad_gradient() -> tuple[str, str]:
    """What tests/test_bad_inputs.py::test_a_bad_gradient_is_rejected_counted_and_not_applied checks."""
    import torch

    from metatrain.pipeline.config import OptimConfig
    from metatrain.pipeline.distributed.parameter_server import ParameterServerCore

    ps = ParameterServerCore({"w": torch.zeros(3)}, OptimConfig(name="sgd", lr=1.0), total_steps=5,
                             checkpoint_dir=None, checkpoint_every=5)
    meta = {"worker": 1, "step": 1, "version": 0, "n_tasks": 1, "blocks": [[0]]}
    out = ps.apply_gradients(1, [meta], [[{"w": torch.tensor([1.0, float("nan"), 0.0])}]])
    ok = not out["applied"] and ps.version == 0 and ps.counters["rejected"] == 1 and not ps.get_weights()[1]["w"].any()
    return f"rejected (ps/rejected = 1): {out['rejected'][0]}", "yes" if ok else "NO"


def main() -> None:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        with contextlib.redirect_stdout(sys.stderr):  # prepare's and train's own report: not part of the table
            base = trained_run(Path(d) / "trained")
        only = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else None
        for i, case in enumerate(CASES, 1):
            if only is not None and case.id not in only:
                continue
            tmp = Path(d) / f"case{i}"
            tmp.mkdir()
            try:
                error, verdict = run_case(case, base, tmp), "yes"
            except AssertionError as e:
                error, verdict = "", f"NO: {str(e).splitlines()[0][:80]}"
            # Temporary paths say nothing to a reader: show them by role.
            for key, value in sorted(base.items(), key=lambda kv: -len(str(kv[1]))):
                error = error.replace(str(value), key)
            error = error.replace(str(tmp), "TMP").replace(d, "TMP")
            rows.append((i, case, error, verdict))
    ray.shutdown()
    if only is None:
        rows.append((len(CASES) + 1, GradientCase(), *bad_gradient()))
    print("| # | input | case | error (one line, exit code 2) | intact |")
    print("|---:|---|---|---|---|")
    for i, case, error, verdict in rows:
        # Plain text, not a code span: the errors quote commands in backticks themselves.
        print(f"| {i} | {case.kind} | {case.what} | {error.replace('|', '/')} | {verdict} |")
    failed = sum(v != "yes" for *_, v in rows)
    print(f"\n{len(rows)} cases, {len(rows) - failed} with one clear error and nothing corrupted")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
