"""The files a search leaves in its output directory, each written atomically
(temporary name in the same directory, then rename): trials.csv, summary.json,
best.yml and PNG plots (``mergekit_rlvr.io.atomic.write_atomic``)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

from mergekit_rlvr.io.atomic import write_atomic

TIMING_COLUMNS = ("wall_s", "swap_s", "generate_s", "score_s")


def trials_csv(rows: Sequence[Mapping[str, Any]], coefficients: Sequence[str], objectives: Sequence[str],
               reported: Sequence[str] = ()) -> bytes:
    """One row per finished trial: trial, state, a column per coefficient, objectives,
    reported-only columns (accuracy against the queries' answers), timings."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["trial", "state", *coefficients, *objectives, *reported, *TIMING_COLUMNS])
    for row in rows:
        writer.writerow([row["number"], row["state"], *(repr(float(row[c])) for c in coefficients),
                         *(repr(float(row[o])) for o in objectives),
                         *("" if row.get(c) is None else repr(float(row[c])) for c in reported),
                         *(f"{row[t]:.6f}" for t in TIMING_COLUMNS)])
    return out.getvalue().encode()


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def summary_json(summary: Mapping[str, Any]) -> bytes:
    return (json.dumps(_json_safe(dict(summary)), indent=2) + "\n").encode()


def best_yaml(recipe: Mapping[str, Any], coefficients: Mapping[str, float]) -> bytes:
    """The input recipe with the selected coefficients written where mergekit reads them."""
    import yaml

    from mergekit_rlvr.decompose import recipe_with_coefficients

    return yaml.safe_dump(recipe_with_coefficients(dict(recipe), dict(coefficients)), sort_keys=False).encode()


def _figure(width: float, height: float):
    """A figure on the Agg canvas without pyplot (no global state, faster import)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]


def pareto_png(rows, front, selected) -> bytes:
    fig = _figure(5.5, 4.2)
    ax = fig.subplots()
    done = [r for r in rows if r["state"] == "COMPLETE"]
    ax.scatter([r["perplexity"] for r in done], [r["consistency"] for r in done], s=18, c="0.6", label="trials")
    pruned = [r for r in rows if r["state"] == "PRUNED"]
    if pruned:
        ax.scatter([r["perplexity"] for r in pruned], [r["consistency"] for r in pruned], s=14, marker="x",
                   c="0.75", label="pruned (partial)")
    ordered = sorted(front, key=lambda r: r["perplexity"])
    ax.plot([r["perplexity"] for r in ordered], [r["consistency"] for r in ordered], "o-", c="tab:blue",
            ms=5, label="Pareto front")
    ax.scatter([selected["perplexity"]], [selected["consistency"]], marker="*", s=220, c="tab:red",
               zorder=5, label=f"selected (trial {selected['number']})")
    ax.set_xlabel("perplexity (lower is better)")
    ax.set_ylabel("consistency (higher is better)")
    ax.set_title("DoTS coefficient search")
    ax.legend(fontsize=8)
    return _png(fig)


def objectives_png(rows, coefficients: Sequence[str], objectives: Sequence[str], selected,
                   threshold: Optional[float] = None, connect: bool = False) -> bytes:
    """A panel per (objective, coefficient): the objective against that coefficient
    (at most five panels a row; per-group coefficients make many). ``connect``: a line
    through the points (a one-dimensional search); ``threshold``: a dashed level."""
    done = [r for r in rows if r["state"] == "COMPLETE"]
    columns = min(len(coefficients), 5)
    per_objective = -(-len(coefficients) // columns)
    fig = _figure(4.2 * columns, 3.2 * len(objectives) * per_objective)
    axes = fig.subplots(len(objectives) * per_objective, columns, squeeze=False)
    block = per_objective * columns  # panels of one objective, the last row padded
    for k, ax in enumerate(axes.flat):
        ax.set_visible(k % block < len(coefficients))
    for i, objective in enumerate(objectives):
        for j, name in enumerate(coefficients):
            ax = axes.flat[i * block + j]
            points = sorted((r[name], r[objective]) for r in done)
            style = "o-" if connect else "o"
            ax.plot([p[0] for p in points], [p[1] for p in points], style, ms=4, c="tab:blue")
            if selected is not None and name in selected and objective in selected and \
                    isinstance(selected[objective], float) and math.isfinite(selected[objective]):
                ax.scatter([selected[name]], [selected[objective]], marker="*", s=200, c="tab:red", zorder=5)
            if threshold is not None:
                ax.axhline(threshold, ls="--", c="0.5", lw=1)
            ax.set_xlabel(_short(name))
            ax.set_ylabel(objective)
    fig.tight_layout()
    return _png(fig)


def write_report(out_dir: str, files: Dict[str, bytes]) -> List[str]:
    """Write each file atomically; summary.json last, so its presence means a whole report."""
    order = sorted(files, key=lambda name: name == "summary.json")
    for name in order:
        write_atomic(os.path.join(out_dir, name), files[name])
    return [os.path.join(out_dir, name) for name in order]
