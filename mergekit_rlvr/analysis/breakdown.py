"""Per matrix type and per layer breakdowns of ``analyze``'s pass 1 (pure, no I/O):

- paper 004 Table 5: Jaccard overlap of the changed-weight masks (|Delta| >
  eta * max(|theta|, |theta_base|)) of each pair, per matrix type (q_proj, k_proj, ...,
  down_proj), per layer and per (layer, type), each with the Jaccard of random masks of
  the same densities, p_a p_b / (p_a + p_b - p_a p_b) (the paper's reference: 30% masks
  give 0.18);
- paper 004 Fig. 3: the cosine of the two updates restricted to the overlap region
  (entries changed in both), per matrix type, per module kind (attention, mlp) and per
  layer. Exact, over all overlap entries (the paper projects onto 256 random orthogonal
  directions first, an estimate of the same cosine);
- paper 001 Fig. 2: update sparsity per layer, 1 - #(|Delta| > epsilon) / n.

A cell is one (layer, matrix type); every chunk of a tensor adds to its tensor's cell,
and the report sums cells, so the figures do not depend on chunking either.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, Hashable, List, Optional, Tuple

from mergekit_rlvr.analysis.stats import layer_index, module_kind

Cell = Tuple[Optional[int], str, str]  # (layer, matrix type, module kind)


def matrix_type(name: str) -> str:
    """The module a tensor belongs to: ``q_proj`` for ``model.layers.3.self_attn.q_proj.weight``."""
    parts = name.split(".")
    if len(parts) > 1 and parts[-1] in ("weight", "bias"):
        return parts[-2]
    return parts[-1]


def cell_of(name: str) -> Cell:
    return layer_index(name), matrix_type(name), module_kind(name)


class VectorCells:
    """Per cell: parameters, updated (|Delta| > epsilon) and changed (eta) counts of one vector."""

    def __init__(self):
        self.cells: Dict[Cell, List[int]] = defaultdict(lambda: [0, 0, 0])

    def add(self, name: str, n: int, terms) -> None:
        """``terms``: this model's entry of ``pass1_kernel``'s per-model list."""
        cell = self.cells[cell_of(name)]
        cell[0] += n
        cell[1] += int(terms[1])
        cell[2] += int(terms[2])

    def layer_sparsity(self) -> Dict[str, float]:
        sums = _sum(self.cells, lambda c: c[0])
        return {str(L): 1.0 - sums[L][1] / sums[L][0] for L in sorted(k for k in sums if k is not None) if sums[L][0]}


class PairCells:
    """Per cell: changed in both, and over those entries Delta_a . Delta_b, ||Delta_a||^2, ||Delta_b||^2."""

    def __init__(self):
        self.cells: Dict[Cell, List[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0.0])

    def add(self, name: str, terms) -> None:
        """``terms``: this pair's entry of ``pass1_kernel`` (changed_both is 4th, the
        overlap dot and squared norms the last three)."""
        cell = self.cells[cell_of(name)]
        cell[0] += int(terms[3])
        cell[1] += float(terms[5])
        cell[2] += float(terms[6])
        cell[3] += float(terms[7])


def _sum(cells: Dict[Cell, list], key) -> Dict[Hashable, list]:
    """Cells summed by ``key(cell) -> group``."""
    out: Dict[Hashable, list] = {}
    for cell, values in cells.items():
        group = key(cell)
        if group not in out:
            out[group] = [0] * len(values)
        out[group] = [x + y for x, y in zip(out[group], values)]
    return out


def _jaccard(both: int, a: int, b: int) -> Optional[float]:
    either = a + b - both
    return both / either if either else None


def _random_jaccard(a: int, b: int, n: int) -> Optional[float]:
    if not n:
        return None
    pa, pb = a / n, b / n
    union = pa + pb - pa * pb
    return pa * pb / union if union > 0 else None


def _cosine(dot: float, sa: float, sb: float) -> Optional[float]:
    return dot / math.sqrt(sa * sb) if sa > 0 and sb > 0 else None


def pair_breakdown(a: VectorCells, b: VectorCells, pair: PairCells) -> dict:
    """The pair's report entries (keys as strings: layers by number, types by name)."""
    groupings = {
        "type": lambda c: c[1],
        "layer": lambda c: c[0],
        "kind": lambda c: c[2],
    }
    out: dict = {}
    for label, key in groupings.items():
        va, vb, pp = _sum(a.cells, key), _sum(b.cells, key), _sum(pair.cells, key)
        groups = [g for g in sorted(va, key=_order) if g is not None or label != "layer"]
        if label != "kind":
            out[f"jaccard_by_{label}"] = {str(g): _jaccard(pp.get(g, [0])[0], va[g][2], vb[g][2]) for g in groups}
            out[f"jaccard_random_by_{label}"] = {str(g): _random_jaccard(va[g][2], vb[g][2], va[g][0]) for g in groups}
        out[f"overlap_cosine_by_{label}"] = {str(g): _cosine(*pp[g][1:]) if g in pp else None for g in groups}
    total = [sum(v[i] for v in pair.cells.values()) for i in range(4)]
    out["overlap_cosine"] = _cosine(*total[1:])
    layers = sorted({c[0] for c in a.cells if c[0] is not None})
    by_cell = {label: _sum(cells, lambda c: (c[0], c[1])) for label, cells in
               (("a", a.cells), ("b", b.cells), ("pair", pair.cells))}
    out["jaccard_by_layer_type"] = {
        str(L): {t: _jaccard(by_cell["pair"].get((L, t), [0])[0], by_cell["a"][(L, t)][2], by_cell["b"][(L, t)][2])
                 for t in sorted({c[1] for c in by_cell["a"] if c[0] == L})}
        for L in layers}
    return out


def _order(group):
    return (0, group, "") if isinstance(group, int) else (1, 0, str(group))
