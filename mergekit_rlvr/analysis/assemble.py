"""The report dictionary of ``mergekit-rlvr analyze`` from the accumulated statistics
(keys of the issue plus extras; ``report`` writes and plots it)."""

from __future__ import annotations

import math
from typing import Optional

from mergekit_rlvr.analysis import stats as S


def _ratio(num: float, den: float) -> Optional[float]:
    return num / den if den else None


def _vector(v, t, tp, settings) -> dict:
    kinds = [k for k in (*S.MODULE_KINDS, "other") if v.kind_parameters.get(k)]
    return {
        "l2_norm": math.sqrt(v.sumsq),
        "sparsity": 1.0 - v.updated / v.parameters,
        "layer_l2_norms": {str(i): math.sqrt(s) for i, s in sorted(v.layer_sumsq.items())},
        "module_top_share": {k: tp.kind_kept.get(k, 0) / v.kind_parameters[k] for k in kinds},
        # extras
        "parameters": v.parameters,
        "updated": v.updated,
        "changed_share": v.changed / v.parameters,
        "module_parameters": {k: v.kind_parameters[k] for k in kinds},
        "module_l2_norms": {k: math.sqrt(v.kind_sumsq[k]) for k in kinds},
        "module_top_composition": {k: _ratio(tp.kind_kept.get(k, 0), tp.kept) for k in kinds},
        "top_threshold": t.by_density[settings["top"]],
        "density_thresholds": {str(d): t.by_density[d] for d in settings["densities"]},
    }


def _by_density(conflicts, ti, tj, settings):
    """Sign conflict of the co-kept entries per density, the co-kept counts, and paper
    000 Fig. 1b's one vector at density d with the other at its top --top."""
    top = settings["top"]
    by_density, kept_counts, a_sparsified, b_sparsified = {}, {}, {}, {}
    for d in settings["densities"]:
        kept, conflict = conflicts.rate(ti[d], tj[d])
        by_density[str(d)] = _ratio(conflict, kept)
        kept_counts[str(d)] = kept
        a_sparsified[str(d)] = _ratio(*reversed(conflicts.rate(ti[d], tj[top])))
        b_sparsified[str(d)] = _ratio(*reversed(conflicts.rate(ti[top], tj[d])))
    return by_density, kept_counts, a_sparsified, b_sparsified


def _pair(name_a, name_b, a, b, st, conflicts, ti, tj, settings) -> dict:
    n = st.parameters
    na, nb = math.sqrt(a.sumsq), math.sqrt(b.sumsq)
    pa, pb = a.changed / n, b.changed / n
    random = pa * pb / (pa + pb - pa * pb) if (pa + pb - pa * pb) > 0 else None
    layers = sorted(set(a.layer_sumsq) & set(b.layer_sumsq))
    by_density, kept_counts, a_sparsified, b_sparsified = _by_density(conflicts, ti, tj, settings)
    return {
        "a": name_a,
        "b": name_b,
        "norm_ratio": _ratio(na, nb),
        "cosine": _ratio(st.dot, na * nb),
        "layer_cosine": {str(L): _ratio(st.layer_dot.get(L, 0.0),
                                        math.sqrt(a.layer_sumsq[L]) * math.sqrt(b.layer_sumsq[L]))
                         for L in layers},
        "sign_conflict": _ratio(st.conflict, st.overlap),
        "regions": {
            "overlap": st.overlap / n,
            "conflict": st.conflict / n,
            "private": st.private / n,
            "unchanged": (n - st.overlap - st.private) / n,
        },
        "jaccard": _ratio(st.changed_both, st.changed_either),
        "jaccard_random": random,
        "conflict_norm": math.sqrt(st.conflict_sumsq),
        "sign_conflict_by_density": by_density,
        # extras
        "co_updated_by_density": kept_counts,
        "sign_conflict_a_sparsified": a_sparsified,
        "sign_conflict_b_sparsified": b_sparsified,
    }


def assemble(base_arg, args, todo, vectors, pair_stats, thresholds, tops, conflicts, settings) -> dict:
    """The report dictionary: keys of the issue plus extras."""
    out_vectors = {arg: _vector(v, t, tp, settings) for arg, v, t, tp in zip(args, vectors, thresholds, tops)}
    out_pairs = [_pair(args[i], args[j], vectors[i], vectors[j], st, conflicts[(i, j)],
                       thresholds[i].index, thresholds[j].index, settings)
                 for (i, j), st in pair_stats.items()]
    return {
        "base": base_arg,
        "models": list(args),
        "settings": settings,
        "parameters": todo and sum(math.prod(todo.shapes[n]) for n in todo.names),
        "tensors": len(todo.names),
        "vectors": out_vectors,
        "pairs": out_pairs,
        "skipped": todo.skipped,
    }
