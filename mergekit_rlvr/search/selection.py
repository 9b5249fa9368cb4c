"""Choosing the trial to keep, from a table of finished trials (pure; no Optuna).

A row is a dict with at least ``number`` and the objective values. DoTS (paper 000,
Sec. 4.3 and App. A.2): the Pareto front maximizing consistency and minimizing
perplexity; ``max_consistency`` takes the front's highest consistency (ties: lower
perplexity, then the earlier trial), ``knee`` the front point nearest the ideal
(max consistency, min perplexity) after min-max normalization over the front.
Reasoning interpolation (paper 003, Eq. 5): the largest alpha whose reasoning rate is
at least rho_min.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

Row = Dict[str, float]


def dominates(a: Row, b: Row) -> bool:
    """a is at least as good in both objectives and better in one."""
    ge = a["consistency"] >= b["consistency"] and a["perplexity"] <= b["perplexity"]
    gt = a["consistency"] > b["consistency"] or a["perplexity"] < b["perplexity"]
    return ge and gt


def is_finite(row: Row) -> bool:
    """Both objectives are finite numbers (an infinite perplexity, e.g. a degenerate
    merge, would switch the knee's perplexity term off and win)."""
    return math.isfinite(row["consistency"]) and math.isfinite(row["perplexity"])


def excluded(rows: Sequence[Row]) -> int:
    """How many rows no selection will pick (a non-finite objective)."""
    return sum(1 for r in rows if not is_finite(r))


def pareto_front(rows: Sequence[Row]) -> List[Row]:
    """Rows with finite objectives that no other such row dominates (duplicates of a
    front point all stay), by trial number."""
    finite = [r for r in rows if is_finite(r)]
    front = [r for r in finite if not any(dominates(o, r) for o in finite)]
    return sorted(front, key=lambda r: r["number"])


def max_consistency(front: Sequence[Row]) -> Row:
    return min(front, key=lambda r: (-r["consistency"], r["perplexity"], r["number"]))


def knee(front: Sequence[Row]) -> Row:
    """Nearest to the ideal (1, 0) in min-max normalized (consistency, perplexity)
    over the front; a constant objective normalizes to 0 distance."""
    def gap(key, best_is_max):
        values = [r[key] for r in front]
        lo, hi = min(values), max(values)
        if not math.isfinite(hi - lo) or hi == lo:
            return lambda r: 0.0
        return (lambda r: (hi - r[key]) / (hi - lo)) if best_is_max else (lambda r: (r[key] - lo) / (hi - lo))

    gc, gp = gap("consistency", True), gap("perplexity", False)
    return min(front, key=lambda r: (math.hypot(gc(r), gp(r)), r["number"]))


def select_dots(rows: Sequence[Row], how: str = "max_consistency") -> (Row, List[Row]):
    """(selected row, Pareto front); trials with a non-finite objective are never selected."""
    front = pareto_front(rows)
    if not front:
        raise ValueError("no finished trial with finite objectives to select from")
    return (knee(front) if how == "knee" else max_consistency(front)), front


def largest_alpha(rows: Sequence[Row], rho_min: float, name: str = "alpha", fallback: Optional[float] = None) -> Optional[Row]:
    """Eq. 5: the row with the largest ``name`` whose reasoning rate >= rho_min. Without
    one, a row ``{name: fallback}`` (the reasoning model itself) or None."""
    ok = [r for r in rows if r["reasoning_rate"] >= rho_min]
    if ok:
        return max(ok, key=lambda r: (r[name], -r["number"]))
    return None if fallback is None else {name: fallback, "number": -1, "reasoning_rate": float("nan")}
