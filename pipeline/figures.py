"""The run's and the study's plots, as matplotlib ``Figure`` objects built directly: no pyplot, no global backend
switch, no display needed, nothing to close. The jobs save them as PNGs and log those."""

from __future__ import annotations


def _figure(size=(5, 3.5), cols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots(1, cols)


def _finish(ax, xlabel: str, ylabel: str, title: str | None = None) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    if ax.get_legend_handles_labels()[1]:  # a legend only where something is labelled
        ax.legend(loc="best", fontsize=7)


def learning_curve_figure(history: list[dict]):
    """Train loss (left) and train/val accuracy (right) against step; keys missing at a step are skipped
    (validation runs only every N steps)."""
    fig, (ax_loss, ax_acc) = _figure((9, 3.5), cols=2)
    for ax, keys, ylabel, title in ((ax_loss, ("train/loss",), "loss", "training loss"),
                                    (ax_acc, ("train/acc", "val/acc"), "accuracy", "accuracy")):
        for key in keys:
            pts = [(h["step"], float(h[key])) for h in history if "step" in h and h.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=key, marker="o" if len(pts) < 30 else None, markersize=3)
        _finish(ax, "step", ylabel, title)
    return fig


def instance_accuracy_figure(summary: dict):
    """A sequence learner's accuracy by instance (1st, 2nd, ... showing of a class) with 95% CIs."""
    fig, ax = _figure()
    ks = sorted(summary["instance_accuracy"], key=int)
    ax.errorbar([int(k) for k in ks], [100 * summary["instance_accuracy"][k] for k in ks],
                yerr=[100 * summary["instance_ci95"][k] for k in ks], marker="o", capsize=3)
    ax.set_ylim(0, 100)
    _finish(ax, "instance (k-th showing of a class)", "accuracy (%)",
            f"{summary['algorithm']}, {summary['ways']} classes, {summary['tasks']} episodes")
    return fig


def study_figures(rows: list[dict]) -> dict:
    """{"accuracy_vs_shots.png": fig, "accuracy_vs_ways.png": fig} for the axes a study varies."""
    figs = {}
    for x in ("shots", "ways"):
        if len({r.get(x) for r in rows}) < 2:
            continue
        fig, ax = _figure()
        series: dict[str, list] = {}
        for r in rows:
            label = " ".join(f"{k}={r[k]}" for k in ("algorithm", "ways", "shots") if k in r and k != x and r[k] != "")
            series.setdefault(label or "all", []).append((float(r[x]), 100 * r["accuracy"], 100 * r["ci95"]))
        for label, pts in sorted(series.items()):
            xs, ys, ci = zip(*sorted(pts))
            ax.errorbar(xs, ys, yerr=ci, marker="o", capsize=3, label=label)
        _finish(ax, x, "test accuracy (%)")
        figs[f"accuracy_vs_{x}.png"] = fig
    return figs
