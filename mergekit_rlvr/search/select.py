"""`select-queries` end to end (paper 000, Sec. 4.2, Alg. 1 stage 1): score every
pool query on each source model, keep D(x) <= 1 - 1/m, pick the adaptation set.

Which models are scored (``sources``):

- ``models`` (default, Sec. 4.2: "m = 5 inference paths from both the SFT model and
  the RLVR model"): each source checkpoint itself. The engine is opened on a copy
  of the recipe with the method's ``source_parameters`` (its kernel's: density 1
  and no rescale for every model for ``dots``, lambda 1 for ``task_arithmetic``),
  so coefficient 1 on one model and 0 on the others serves exactly
  theta_base + tau_i = theta_i, on the same single engine.
- ``sparsified``: the recipe's own vectors (theta_base + tau~_i, the sparsified and
  rescaled sources), as this command did before.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Callable, Dict, List, Mapping, Optional

from mergekit_rlvr.errors import UserError

SOURCES = ("models", "sparsified")


def source_recipe(recipe: Mapping[str, Any], sources: str = "models") -> Dict[str, Any]:
    """The recipe the engine is opened on: its vectors with coefficient 1 (the others
    0) are the source models themselves (``models``) or the recipe's sparsified
    sources (``sparsified``). ``search.groups`` is dropped (one coefficient per model
    is all selection needs)."""
    if sources not in SOURCES:
        raise UserError(f"--sources must be one of {', '.join(SOURCES)}, got {sources!r}")
    out = copy.deepcopy(dict(recipe))
    if isinstance(out.get("search"), dict) and "groups" in out["search"]:
        out["search"] = {k: v for k, v in out["search"].items() if k != "groups"}
    if sources == "sparsified":
        return out
    shared, per_model = _source_parameters(out, "recipe")
    params = dict(out.get("parameters") or {})
    for key, value in shared.items():
        if value is None:
            params.pop(key, None)
        else:
            params[key] = value
    out["parameters"] = params
    for entry in out.get("models") or []:
        if isinstance(entry, dict) and entry.get("parameters"):
            entry["parameters"] = {**entry["parameters"], **per_model}
    return out


def _source_parameters(recipe: Mapping[str, Any], where: str):
    """The method's ``source_parameters`` (``kernels``); UserError when it has none."""
    from mergekit_rlvr.kernels.coefficients import description, with_source_models

    method = recipe.get("merge_method")
    if method not in with_source_models():
        raise UserError(f"{where}: select-queries needs one coefficient per source model"
                        f" ({' or '.join(with_source_models())}), not merge_method {method!r}")
    return description(method).source_parameters


def default_threshold(samples: int) -> float:
    """Sec. 4.2: discard D(x) > 1 - 1/m (Alg. 1's 0.8 is m = 5)."""
    return 1.0 - 1.0 / samples


def _checked_threshold(n: int, samples: int, threshold: Optional[float]) -> float:
    """The numbers given on the command line, checked; the threshold in use."""
    if n < 1:
        raise UserError(f"-n must be at least 1, got {n}")
    if samples < 1:
        raise UserError(f"--samples must be at least 1, got {samples}")
    threshold = default_threshold(samples) if threshold is None else float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise UserError(f"--threshold must be in [0, 1], got {threshold}")
    return threshold


def run_select_queries(
    recipe_path: str,
    pool_path: str,
    out_path: str,
    n: int = 64,
    samples: int = 5,
    threshold: Optional[float] = None,
    seed: int = 0,
    overrides: Optional[Mapping[str, Any]] = None,
    open_engine: Optional[Callable[[Any, Mapping[str, Any]], Any]] = None,
    sources: str = "models",
    strategy: str = "stratified",
    easy_fraction: float = 0.5,
    source_key: str = "data_source",
) -> Dict[str, Any]:
    """Each source model alone (its coefficient 1, the others 0, on one engine)
    answers every pool query ``samples`` times; D(x) = 1 - mean C(x); keep
    D <= threshold (default 1 - 1/samples) and pick ``n`` by ``strategy``
    (:func:`mergekit_rlvr.search.queries.select_queries`). Writes JSONL rows (the
    input row plus ``difficulty``, ``consistency`` per source, ``split``)."""
    from mergekit_rlvr.decompose import load_recipe
    from mergekit_rlvr.io.atomic import write_atomic
    from mergekit_rlvr.search.engine import close_engine
    from mergekit_rlvr.search.engine import open_engine as open_hotswap
    from mergekit_rlvr.search.queries import difficulty, load_queries, select_queries
    from mergekit_rlvr.search.runner import recipe_coefficients
    from mergekit_rlvr.search.settings import load_settings

    threshold = _checked_threshold(n, samples, threshold)
    recipe = load_recipe(recipe_path)
    _source_parameters(recipe, f"recipe {recipe_path}")
    settings = load_settings(recipe.get("search"), {**(overrides or {}), "samples": samples, "seed": seed,
                                                    "objective": "dots"}, str(recipe.get("merge_method", "")))
    pool = load_queries(pool_path)
    engine_recipe = source_recipe(recipe, sources)
    names = list(recipe_coefficients(engine_recipe))
    engine = (open_engine or (lambda r, k: open_hotswap(r, k)[0]))(engine_recipe, dict(settings.engine))
    try:
        per_source = _score_sources(engine, names, pool, settings)
    finally:
        if open_engine is None:
            close_engine(engine)
    scores = [difficulty([per_source[name][i] for name in names]) for i in range(len(pool))]
    groups = [str(q.row.get(source_key)) for q in pool] if strategy == "diverse" else None
    chosen = select_queries(scores, n, threshold, seed, strategy=strategy, easy_fraction=easy_fraction,
                            groups=groups)
    lines = []
    for pick in chosen:
        row = dict(pool[pick.index].row)
        row.update({"difficulty": pick.difficulty, "split": pick.split, "pool_index": pick.index,
                    "consistency": {name: per_source[name][pick.index] for name in names}})
        lines.append(json.dumps(row, ensure_ascii=False))
    write_atomic(out_path, ("\n".join(lines) + ("\n" if lines else "")).encode())
    return {"pool": len(pool), "kept": sum(1 for d in scores if d <= threshold + 1e-9), "selected": len(chosen),
            "threshold": threshold, "sources": sources, "strategy": strategy, "out": out_path}


def _score_sources(engine, names: List[str], pool, settings) -> Dict[str, List[float]]:
    """C(x) of every pool query on each source alone (its coefficient 1, the others 0)."""
    from tqdm import tqdm

    from mergekit_rlvr.search.dots import query_consistencies
    from mergekit_rlvr.search.prompts import query_prompts

    tokenizer = engine.get_tokenizer()
    prompts = query_prompts(tokenizer, pool, settings)
    per_source: Dict[str, List[float]] = {}
    for name in tqdm(names, desc="select-queries", unit="model"):
        engine.set_coefficients({other: (1.0 if other == name else 0.0) for other in names})
        per_source[name], _ = query_consistencies(engine, prompts, settings)
    return per_source
