"""What a scaling study concludes from its trials (paper Sec. 4.4, Figure 5): the results table, the Pareto
frontier of transfer accuracy against pretraining compute, power-law fits of error against compute, the
compute-optimal model for a budget, and the Figure-5-style plot.

Pure numpy / scipy / matplotlib over plain dict rows (one per trial): no Ray, no torch, so it can be re-run on a
finished study's `results.json` anywhere.

Fits. Error e = 1 − transfer accuracy is fitted as e(C) = a · C^(−b), C in exaFLOPs, with `scipy.optimize.curve_fit`
in log space (a straight line in log-log, as the paper's Figure 5 reads). A saturating form e = c + a · C^(−b) has one
more parameter than a 2-size × 2-budget grid can pin down, so vitray does not fit it. Per family the fit runs
through the family's own frontier (the best error reached at each compute, the envelope a scaling law describes);
per model it runs through that model's budgets, and the compute-optimal model for a budget C is the one whose fit
predicts the lowest error at C.
"""
from __future__ import annotations

import csv
import io
import math
import warnings

import numpy as np

COLUMNS = (
    "trial", "family", "model", "params", "budget", "budget_unit", "steps", "images_seen", "pretrain_exaflops",
    "accelerator", "accelerator_days", "wall_clock_s", "final_loss", "transfer", "transfer_accuracy", "status",
    "checkpoint",
)
FAMILY_STYLE = {"vit": ("tab:blue", "o", "ViT"), "bit": ("tab:orange", "s", "BiT ResNet"),
                "hybrid": ("tab:green", "^", "Hybrid")}


def table_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: (r["family"], r.get("pretrain_exaflops") or 0)):
        writer.writerow(row)
    return out.getvalue()


def _finished(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "finished" and r.get("transfer_accuracy") is not None]


def pareto_frontier(rows: list[dict]) -> list[dict]:
    """The trials no other trial beats with less or equal compute: increasing compute, increasing accuracy."""
    frontier, best = [], -math.inf
    for r in sorted(_finished(rows), key=lambda r: (r["pretrain_exaflops"], -r["transfer_accuracy"])):
        if r["transfer_accuracy"] > best:
            frontier.append(r)
            best = r["transfer_accuracy"]
    return frontier


def _log_line(log_c: np.ndarray, log_a: float, b: float) -> np.ndarray:
    return log_a - b * log_c


def fit_power_law(compute: list[float], accuracy: list[float]) -> dict | None:
    """e = a · C^(−b) through (C, 1 − accuracy); None when fewer than two distinct compute values. Errors are floored
    at 1e-4 (a perfect score has no logarithm)."""
    c = np.asarray(compute, dtype=float)
    e = np.clip(1.0 - np.asarray(accuracy, dtype=float), 1e-4, None)
    if len(np.unique(c)) < 2:
        return None
    from scipy.optimize import OptimizeWarning, curve_fit

    with warnings.catch_warnings():  # two points determine the line exactly: no covariance, and that is fine
        warnings.simplefilter("ignore", OptimizeWarning)
        (log_a, b), cov = curve_fit(_log_line, np.log(c), np.log(e), p0=(float(np.log(e).mean()), 0.1))
    residual = np.log(e) - _log_line(np.log(c), log_a, b)
    return {"a": float(np.exp(log_a)), "b": float(b), "points": len(c),
            "rms_log_residual": float(np.sqrt(np.mean(residual**2))),
            "stderr_b": float(np.sqrt(cov[1, 1])) if np.isfinite(cov[1, 1]) else None}


def predict_error(fit: dict, exaflops: float) -> float:
    return fit["a"] * exaflops ** (-fit["b"])


def fits(rows: list[dict]) -> dict:
    """{"families": {family: fit}, "models": {model: fit}} (fits that cannot be made are left out)."""
    done = _finished(rows)
    out: dict = {"families": {}, "models": {}}
    for family in sorted({r["family"] for r in done}):
        own = [r for r in done if r["family"] == family]
        points = pareto_frontier(own)
        if len({r["pretrain_exaflops"] for r in points}) < 2:
            points = own
        fit = fit_power_law([r["pretrain_exaflops"] for r in points], [r["transfer_accuracy"] for r in points])
        if fit:
            out["families"][family] = fit
    for model in sorted({r["model"] for r in done}):
        own = [r for r in done if r["model"] == model]
        fit = fit_power_law([r["pretrain_exaflops"] for r in own], [r["transfer_accuracy"] for r in own])
        if fit:
            out["models"][model] = {**fit, "family": own[0]["family"], "params": own[0].get("params")}
    return out


def compute_optimal(model_fits: dict, budgets_exaflops: list[float]) -> list[dict]:
    """For each budget: the model (over all families, and within each) whose fit predicts the lowest error."""
    out = []
    for budget in budgets_exaflops:
        predicted = {m: predict_error(f, budget) for m, f in model_fits.items()}
        if not predicted:
            continue
        row: dict = {"exaflops": budget, "best": min(predicted, key=predicted.get), "per_family": {}}
        row["predicted_accuracy"] = 1.0 - predicted[row["best"]]
        for family in sorted({f["family"] for f in model_fits.values()}):
            own = {m: e for m, e in predicted.items() if model_fits[m]["family"] == family}
            best = min(own, key=own.get)
            row["per_family"][family] = {"model": best, "predicted_accuracy": 1.0 - own[best]}
        out.append(row)
    return out


def budget_grid(rows: list[dict], points: int = 5) -> list[float]:
    """Log-spaced budgets across the compute the study covered: where its fits may be read."""
    c = [r["pretrain_exaflops"] for r in _finished(rows)]
    if not c:
        return []
    return [float(x) for x in np.geomspace(min(c), max(c), points)]


def figure5(rows: list[dict], fit_table: dict, title: str = "") -> bytes:
    """PNG: transfer accuracy against pretraining exaFLOPs (log axis), one colour/marker per family, each family's
    power-law fit dashed, the Pareto frontier over all trials drawn through its points."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    done = _finished(rows)
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    for family in sorted({r["family"] for r in done}):
        colour, marker, label = FAMILY_STYLE.get(family, ("tab:gray", "D", family))
        own = [r for r in done if r["family"] == family]
        ax.scatter([r["pretrain_exaflops"] for r in own], [100 * r["transfer_accuracy"] for r in own],
                   c=colour, marker=marker, s=40, label=label, zorder=3)
        fit = fit_table["families"].get(family)
        if fit:
            c = np.geomspace(min(r["pretrain_exaflops"] for r in own), max(r["pretrain_exaflops"] for r in own), 50)
            ax.plot(c, 100 * (1 - predict_error(fit, c)), "--", c=colour, lw=1,
                    label=f"{label} fit: err = {fit['a']:.3g}·C^{-fit['b']:.3f}")
        unit = {"epochs": "ep", "steps": " steps", "exaflops": " EF"}
        for r in own:
            ax.annotate(f"{r['model']} {r['budget']:g}{unit.get(r['budget_unit'], '')}",
                        (r["pretrain_exaflops"], 100 * r["transfer_accuracy"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    front = pareto_frontier(rows)
    if front:
        ax.plot([r["pretrain_exaflops"] for r in front], [100 * r["transfer_accuracy"] for r in front], "-", c="k",
                lw=1.5, label="Pareto frontier", zorder=2)
    ax.set_xscale("log")
    ax.set_xlabel("Pretraining compute [exaFLOPs]")
    ax.set_ylabel(f"Transfer accuracy [%] ({done[0]['transfer'] if done else 'transfer'})")
    ax.set_title(title or "Performance versus pretraining compute (ViT paper, Figure 5)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def report(rows: list[dict], fit_table: dict, optimal: list[dict]) -> str:
    """The printed summary: fits with their parameters, then the compute-optimal model per budget."""
    lines = [f"{len(_finished(rows))} of {len(rows)} trials finished"]
    for family, f in fit_table["families"].items():
        lines.append(f"fit {family}: error = {f['a']:.4g} · C^{-f['b']:.4f} (C in exaFLOPs; {f['points']} points,"
                     f" rms log residual {f['rms_log_residual']:.3f})")
    for row in optimal:
        per = ", ".join(f"{fam}: {v['model']} ({v['predicted_accuracy']:.3f})" for fam, v in row["per_family"].items())
        lines.append(f"compute-optimal at {row['exaflops']:.3g} EF: {row['best']} (predicted accuracy"
                     f" {row['predicted_accuracy']:.3f}); per family {per}")
    return "\n".join(lines)
