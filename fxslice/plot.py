"""A picture of what a plan did: widths before and after along the depth, and what it cost.

``plot_plan(plan, "plan.png")`` draws, from the plan alone (no weights):

* every residual state's width before and after, in graph order, with the share of the PCA variance
  it dropped;
* every MLP's inner width before and after (``shrink_mlp`` / ``slice(budget=…)``), when there are any;
* a perplexity / parameter curve, from rows such as ``benchmarks/quality.py`` prints (``parameters`` and
  ``perplexity`` per row), when given;
* the validation loss of ``fxslice.heal`` over its steps, when given (the ``history`` of ``heal.json``).

Needs matplotlib (``pip install fxslice[plot]``); a PNG, or anything matplotlib writes, by extension.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .plan import Plan

__all__ = ["plot_plan"]


def plot_plan(plan: Plan, path: str | os.PathLike, curve: list[dict] | None = None,
              heal_history: list[dict] | None = None, title: str | None = None) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plotting needs matplotlib: pip install 'fxslice[plot]' (or pip install matplotlib)") from error
    mlps = (plan.details.get("shrink_mlp") or {}).get("mlps") or []
    curve = [r for r in curve or [] if "parameters" in r and "perplexity" in r]
    validations = [h for h in heal_history or [] if h.get("validation") is not None]
    panels = [p for p, wanted in (("states", bool(plan.states)), ("mlps", bool(mlps)), ("curve", bool(curve)),
                                  ("heal", bool(validations))) if wanted]
    if not panels:
        raise ValueError("the plan records no residual states or inner widths (no rotate, slice or shrink_mlp ran) "
                         "and no curve or healing history was given: nothing to plot")
    figure, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        if panel == "states":
            _widths(ax, [s.width for s in plan.states], list(plan.widths), "residual state (graph order)",
                    "residual widths")
            # The stream's variance sits in a few directions, so the kept share is near 1 everywhere: what
            # was dropped, on a log scale, is what tells the states apart.
            dropped = [None if s.kept_variance is None else max(1.0 - s.kept_variance, 1e-12) for s in plan.states]
            if any(v is not None for v in dropped):
                twin = ax.twinx()
                twin.semilogy(range(len(dropped)), [float("nan") if v is None else v for v in dropped], "g.:")
                twin.set_ylabel("variance dropped (PCA)", color="g")
        elif panel == "mlps":
            _widths(ax, [m[1] for m in mlps], [m[2] for m in mlps], "MLP (graph order)", "MLP inner widths")
        elif panel == "curve":
            for row in sorted(curve, key=lambda r: r["parameters"]):
                ax.scatter(row["parameters"] / 1e6, row["perplexity"], color="C3")
                ax.annotate(str(row.get("row", "")), (row["parameters"] / 1e6, row["perplexity"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel("parameters (millions)")
            ax.set_ylabel("perplexity")
            ax.set_title("perplexity against parameters")
        else:
            ax.plot([h["step"] for h in validations], [h["validation"] for h in validations], "o-")
            ax.set_xlabel("healing step")
            ax.set_ylabel("validation loss")
            ax.set_title("healing: validation loss")
        ax.grid(alpha=0.3)
    figure.suptitle(title or plan.class_name)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _widths(ax: Any, before: list[int], after: list[int], xlabel: str, title: str) -> None:
    positions = range(len(before))
    ax.bar(positions, before, color="0.85", label="before")
    ax.bar(positions, after, color="C0", label="after")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("width")
    ax.set_title(f"{title}: {sum(before)} → {sum(after)} in all")
    ax.legend(loc="lower left", fontsize=8)
