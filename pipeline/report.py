"""The results table: markdown, and a PNG bar chart."""
import math

import numpy as np


def row_label(result: dict) -> str:
    """``method [+SWAD] [[teachers]]``: the teachers named only when not the run's first alone."""
    return (result["method"] + (" +SWAD" if result.get("model") == "swad" else "")
            + (f" [{result['teachers']}]" if result.get("teachers") else ""))


def _mean_se(values: list) -> tuple:
    if not values:
        return math.nan, math.nan
    se = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
    return float(np.mean(values)), se


def summarize(results: list, rows: list, holdouts: list) -> dict:
    """label -> {holdout or 'average': (mean %, standard error %, seeds)} over seeds."""
    table = {}
    for label in rows:
        mine = [r for r in results if row_label(r) == label and r["holdout"] in holdouts]
        cells = {}
        for h in holdouts:
            accs = [100 * r["holdout_acc"] for r in mine if r["holdout"] == h]
            cells[h] = (*_mean_se(accs), len(accs))
        seeds = sorted({r["seed"] for r in mine})
        per_seed = [np.mean([100 * r["holdout_acc"] for r in mine if r["seed"] == s]) for s in seeds
                    if {r["holdout"] for r in mine if r["seed"] == s} == set(holdouts)]
        if len(seeds) <= 1:  # seed-free rows (zero-shot) and single-seed runs
            per_seed = [np.mean([c[0] for c in cells.values()])] if all(c[2] for c in cells.values()) else []
        cells["average"] = (*_mean_se(per_seed), len(per_seed))
        table[label] = cells
    return table


def cell(mean, se, n) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.1f}" if math.isnan(se) else f"{mean:.1f} ± {se:.1f}"


def markdown(table: dict, holdouts: list, notes: dict | None = None) -> str:
    """The table; ``notes`` (label -> text) adds a last column, e.g. the selected hyperparameters."""
    extra = notes is not None
    lines = ["| method | " + " | ".join(holdouts) + " | average |" + (" hyperparameters |" if extra else ""),
             "|---" * (len(holdouts) + 2 + extra) + "|"]
    for label, cells in table.items():
        lines.append(f"| {label} | " + " | ".join(cell(*cells[h]) for h in [*holdouts, "average"]) + " |"
                     + (f" {notes.get(label) or '-'} |" if extra else ""))
    return "\n".join(lines) + "\n"


def bar_chart(table: dict, holdouts: list, path) -> bool:
    """Grouped bars with standard-error whiskers; False if matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    columns = [*holdouts, "average"]
    width = 0.8 / max(len(table), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(columns), 4))
    for i, (label, cells) in enumerate(table.items()):
        means = [cells[c][0] for c in columns]
        errors = [0 if math.isnan(cells[c][1]) else cells[c][1] for c in columns]
        ax.bar(np.arange(len(columns)) + i * width, means, width, yerr=errors, label=label, capsize=2)
    ax.set_xticks(np.arange(len(columns)) + width * (len(table) - 1) / 2, columns)
    ax.set_ylabel("held-out accuracy (%)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True

