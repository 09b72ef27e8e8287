"""The report of ``meanflow eval``: one flat row per scored setting, a text table, and the
sweep's plot of the score against the NFE.

Image runs are ranked by FID (Inception or domain); runs of 2-D points (metric ``distances``) by
the energy distance, with the sliced Wasserstein distance and precision / recall beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The scores a row may carry, in table order, and their column titles.
SCORE_TITLES = {"fid": "FID", "inception_score_mean": "IS", "inception_score_std": "IS std", "accuracy": "accuracy",
                "energy_distance": "energy", "sliced_wasserstein": "sliced W2", "precision": "precision",
                "recall": "recall"}
# Per report metric: the headline score (the table's first score column, the plot's y axis) and its label.
HEADLINES = {"inception": ("fid", "FID"), "domain": ("fid", "domain FID"),
             "distances": ("energy_distance", "energy distance")}
_SIDE_COLUMNS = ("inception_score_mean", "accuracy", "sliced_wasserstein", "precision", "recall")


def table_rows(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per (weights, steps, intermediate) across reports."""
    rows = []
    for report in reports:
        for entry in report["scores"]:
            row = {"weights": report["weights"], "steps": entry["steps"], "intermediate": entry["intermediate"],
                   "nfe": entry["nfe"], "sampler": entry.get("sampler")}
            row.update({key: entry[key] for key in SCORE_TITLES if key in entry})
            rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], metric: str) -> str:
    """A fixed-width text table of the rows."""
    headline, label = HEADLINES[metric]
    extra = [key for key in _SIDE_COLUMNS if key != headline and any(key in row for row in rows)]
    header = f"{'weights':>14} {'sampler':>12} {'steps':>5} {'t_mid':>6} {'NFE':>4} {label:>15}" + "".join(
        f" {SCORE_TITLES[key]:>9}" for key in extra)
    lines = [header, "-" * len(header)]
    for row in rows:
        middle = "-" if row["intermediate"] is None else f"{row['intermediate']:g}"
        line = (f"{row['weights']:>14} {row['sampler'] or '-':>12} {row['steps']:>5} {middle:>6} {row['nfe']:>4} "
                f"{row[headline]:>15.4f}")
        for key in extra:
            line += f" {row[key]:>9.4f}" if key in row else f" {'-':>9}"
        lines.append(line)
    return "\n".join(lines)


def plot_sweep(rows: list[dict[str, Any]], path: Path, metric: str) -> Path:
    """Score against NFE: a line per weights over the uniform grids, the 2-step intermediate
    times as labelled points."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import write_bytes_atomic

    headline, label = HEADLINES[metric]
    figure, axes = plt.subplots(figsize=(6, 4))
    for index, weights in enumerate(dict.fromkeys(row["weights"] for row in rows)):
        color = f"C{index % 10}"
        uniform = sorted((row["nfe"], row[headline]) for row in rows
                         if row["weights"] == weights and row["intermediate"] is None)
        if uniform:
            axes.plot(*zip(*uniform, strict=True), marker="o", color=color, label=weights)
        for row in rows:
            if row["weights"] == weights and row["intermediate"] is not None:
                axes.scatter(row["nfe"], row[headline], marker="x", color=color)
                axes.annotate(f"t={row['intermediate']:g}", (row["nfe"], row[headline]), fontsize=7,
                              xytext=(4, 2), textcoords="offset points")
    axes.set_xlabel("NFE")
    axes.set_ylabel(label + (" (not comparable with Inception FID)" if metric == "domain" else ""))
    axes.set_xscale("log", base=2)
    scores = [row[headline] for row in rows if row[headline] > 0]
    if scores and max(scores) > 10 * min(scores):
        axes.set_yscale("log")  # scores over orders of magnitude (few steps, or a poor EMA rate)
    nfes = sorted({row["nfe"] for row in rows})
    axes.set_xticks(nfes, [str(nfe) for nfe in nfes])
    axes.minorticks_off()
    axes.grid(alpha=0.3)
    axes.legend(title="weights", fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return write_bytes_atomic(path, buffer.getvalue())


def print_summary(report: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Print what was scored (checkpoint, samples, reference, features) and the table of the rows."""
    features = report["feature_extractor"] or "none (points compared directly)"
    print(f"checkpoint {report['checkpoint']} (step {report['step']}), {report['num_samples']} samples, "
          f"seed {report['seed']}, reference {report['reference']['source']}, features {features}, "
          f"sampler {report['sampler']['name']} ({report['sampler']['source']})")
    if "note" in report:
        print(f"note: {report['note']}")
    print(format_table(rows, report["metric"]))


__all__ = ["HEADLINES", "SCORE_TITLES", "format_table", "plot_sweep", "print_summary", "table_rows"]
