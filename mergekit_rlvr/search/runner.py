"""`search` and `select-queries` end to end: recipe + queries in, report out.

Both take an ``open_engine`` callable (recipe, engine kwargs) -> engine, so that the
commands use HotSwapLLM and callers may pass anything that follows
``mergekit_rlvr.search.engine.Engine``."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional

from mergekit_rlvr.errors import UserError
from mergekit_rlvr.search import report as rpt
from mergekit_rlvr.search.engine import close_engine
from mergekit_rlvr.search.engine import open_engine as open_hotswap
from mergekit_rlvr.search.queries import load_queries
from mergekit_rlvr.search.selection import excluded, is_finite, largest_alpha, select_dots
from mergekit_rlvr.search.settings import SearchSettings, load_settings
from mergekit_rlvr.search.study import public_url


def recipe_coefficients(recipe: Mapping[str, Any]) -> Dict[str, float]:
    """The recipe's own coefficient values by name (engine order), from the recipe
    alone; with ``search.groups``, from mergekit's plan (configs and indexes only)."""
    from mergekit_rlvr.decompose import _model_string, coefficient_names_of, decompose
    from mergekit_rlvr.groups import of_recipe

    if of_recipe(recipe) is not None:
        return decompose(recipe).coefficient_dict()

    names = coefficient_names_of(recipe)
    method = recipe.get("merge_method")
    params = recipe.get("parameters") or {}
    if method in ("sar", "reasoning_interp"):
        default = 1.0 if method == "sar" else 0.5
        return {names[0]: float(params.get(names[0], default))}
    weights = {}
    for entry in recipe.get("models") or []:
        weight = (entry.get("parameters") or {}).get("weight", params.get("weight", 1.0))
        weights[_model_string(entry.get("model"))] = weight
    return {name: float(weights.get(name, 1.0)) if isinstance(weights.get(name, 1.0), (int, float)) else 1.0
            for name in names}


def _searched(settings: SearchSettings, all_names: List[str]) -> List[str]:
    if settings.coefficients:
        unknown = [n for n in settings.coefficients if n not in all_names]
        if unknown:
            raise UserError(f"search.coefficients: {unknown[0]!r} is not a coefficient of the recipe"
                            f" ({', '.join(all_names)})")
        return [n for n in all_names if n in settings.coefficients]
    if settings.objective == "reasoning_rate" and len(all_names) != 1:
        raise UserError("objective reasoning_rate searches one coefficient (reasoning_interp's alpha);"
                        f" this recipe has {', '.join(all_names)}: name it in search.coefficients")
    return list(all_names)


class _Progress:
    """tqdm bar over finished trials, with the current best in its postfix."""

    def __init__(self, total: int, initial: int, describe: Callable[[Any], str], enabled: bool = True):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc="search", unit="trial", disable=not enabled,
                        dynamic_ncols=True)
        self.describe = describe
        self.enabled = enabled

    def __call__(self, study) -> None:
        from mergekit_rlvr.search.study import finished_trials

        if not self.enabled:
            return
        done = len(finished_trials(study))
        if self.bar.total is not None and done > self.bar.total:
            self.bar.total = done
        self.bar.n = done
        self.bar.set_postfix_str(self.describe(study), refresh=True)

    def close(self):
        self.bar.close()


def run_search(
    recipe_path: str,
    queries_path: str,
    out_dir: str,
    overrides: Optional[Mapping[str, Any]] = None,
    open_engine: Optional[Callable[[Any, Mapping[str, Any]], Any]] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Run (or resume) the search; write the report; return summary.json's content."""
    from mergekit_rlvr.decompose import load_recipe
    from mergekit_rlvr.search import study as st
    from mergekit_rlvr.search.objectives import dots_prompts, measure_dots
    from mergekit_rlvr.search.reasoning import measure_reasoning, reasoning_prompts

    started = time.perf_counter()
    recipe = load_recipe(recipe_path)
    settings = load_settings(recipe.get("search"), overrides, str(recipe.get("merge_method", "")))
    queries = load_queries(queries_path)
    recipe_arg: Any = recipe_path
    if (overrides or {}).get("groups") is not None:  # the engine and best.yml use the same groups
        recipe["search"] = {**(recipe.get("search") or {}), "groups": settings.groups}
        recipe_arg = recipe
    fixed = recipe_coefficients(recipe)
    names = list(fixed)
    searched = _searched(settings, names)
    objectives = st.objective_names(settings)
    os.makedirs(out_dir, exist_ok=True)
    url = st.storage_url(settings, out_dir)
    study = st.open_study(settings, url, searched)

    engine_kwargs = dict(settings.engine)
    prompts: Dict[str, List[str]] = {}

    def start_engine():
        engine = (open_engine or (lambda r, k: open_hotswap(r, k)[0]))(recipe_arg, engine_kwargs)
        tokenizer = engine.get_tokenizer()
        if settings.objective == "dots":
            prompts["gen"], prompts["ppl"] = dots_prompts(tokenizer, queries, settings)
        else:
            prompts["gen"] = reasoning_prompts(tokenizer, queries, settings)
        return engine

    if settings.objective == "dots":
        def measure(engine, stop_rule_for=None):
            return measure_dots(engine, prompts["gen"], prompts["ppl"], settings, stop_rule_for, references)
    else:
        def measure(engine, stop_rule_for=None):
            return measure_reasoning(engine, prompts["gen"], settings)

    references = [q.answer for q in queries] if any(q.answer is not None for q in queries) else None
    evaluator = st.Evaluator(start_engine, measure, fixed)
    before = len(st.finished_trials(study))

    def describe(study) -> str:
        rows = [r for r in st.trial_rows(study, searched, fixed, objectives) if r["state"] == "COMPLETE"]
        if settings.objective == "dots":
            rows = [r for r in rows if is_finite(r)]
        if not rows:
            return ""
        if settings.objective == "dots":
            best, _ = select_dots(rows, settings.select)
            return f"best #{best['number']} c={best['consistency']:.3f} ppl={best['perplexity']:.3g}"
        best = largest_alpha(rows, settings.rho_min, searched[0])
        return "" if best is None else f"{searched[0]}={best[searched[0]]:.4g} rate={best['reasoning_rate']:.3f}"

    total = settings.trials if settings.objective == "dots" else (
        settings.grid + 1 if settings.strategy == "grid" else settings.max_steps)
    if settings.objective == "dots" and before < settings.trials:
        evaluator.get_engine()  # before the progress bar, so that its rate is the trials'
    early_start_s = evaluator.engine_start_s
    bar = _Progress(total, before, describe, enabled=progress)
    search_start = time.perf_counter()
    setup_s = search_start - started - early_start_s
    try:
        if settings.objective == "dots":
            st.run_dots(study, evaluator, settings, searched, progress=bar)
        else:
            st.run_reasoning(study, evaluator, settings, searched[0], progress=bar)
    finally:
        bar.close()
        search_s = time.perf_counter() - search_start - (evaluator.engine_start_s - early_start_s)
        close_start = time.perf_counter()
        if evaluator.engine is not None and open_engine is None:
            close_engine(evaluator.engine)
        engine_close_s = time.perf_counter() - close_start

    rows = st.trial_rows(study, searched, fixed, objectives)
    summary = _summarize(rows, settings, searched, names, fixed, objectives, url, study.study_name)
    summary["timings"] = {
        "engine_start_s": evaluator.engine_start_s if evaluator.engine is not None else None,
        "engine_close_s": engine_close_s,
        "setup_s": setup_s,  # recipe, queries, study
        "search_s": search_s,  # the trial loop, engine start excluded
        "trials_this_run": len(rows) - before,
        # sums over every finished trial of the study:
        "trial_wall_s": sum(r["wall_s"] for r in rows if math.isfinite(r["wall_s"])),
        "generate_s": sum(r["generate_s"] for r in rows if math.isfinite(r["generate_s"])),
        "score_s": sum(r["score_s"] for r in rows if math.isfinite(r["score_s"])),
        "swap_s": sum(r["swap_s"] for r in rows if math.isfinite(r["swap_s"])),
    }
    summary["queries"] = {"file": os.path.abspath(queries_path), "count": len(queries)}
    reported = ["accuracy"] if any("accuracy" in r for r in rows) else []
    files = {"trials.csv": rpt.trials_csv(rows, names, objectives, reported),
             "summary.json": rpt.summary_json(summary)}
    selected = summary["selected"]
    if selected is not None:
        files["best.yml"] = rpt.best_yaml(recipe, selected["coefficients"])
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    if complete:
        sel_row = None if selected is None else {**selected["coefficients"], **selected["objectives"],
                                                 "number": selected["trial"]}
        if settings.objective == "dots":
            front = [r for r in rows if r["number"] in {p["trial"] for p in summary["pareto_front"]}]
            files["pareto.png"] = rpt.pareto_png(rows, front, sel_row)
        files["objectives.png"] = rpt.objectives_png(
            rows, searched, objectives, sel_row, settings.rho_min if settings.objective == "reasoning_rate" else None)
    rpt.write_report(out_dir, files)
    return summary


def _summarize(rows, settings: SearchSettings, searched, names, fixed, objectives, url, study_name) -> Dict[str, Any]:
    complete = [r for r in rows if r["state"] == "COMPLETE"]

    def entry(row):
        out = {"trial": row["number"], "coefficients": {n: row[n] for n in names},
               "objectives": {o: row[o] for o in objectives}}
        if "accuracy" in row:  # against the queries' answers: reported, never used to select
            out["accuracy"] = row["accuracy"]
        return out

    summary: Dict[str, Any] = {"objective": settings.objective, "searched": list(searched),
                               "storage": public_url(url), "study_name": study_name,
                               "finished_trials": len(rows), "complete_trials": len(complete)}
    if settings.objective == "dots":
        summary["excluded_non_finite"] = excluded(complete)  # never selected, never on the front
        if complete and summary["excluded_non_finite"] < len(complete):
            selected, front = select_dots(complete, settings.select)
            summary["selected"] = {**entry(selected), "rule": settings.select}
            summary["pareto_front"] = [entry(r) for r in front]
        else:
            summary["selected"], summary["pareto_front"] = None, []
    else:
        name = searched[0]
        best = largest_alpha(complete, settings.rho_min, name, fallback=settings.bounds[0])
        if best["number"] >= 0:
            summary["selected"] = {**entry(best), "rule": f"largest {name} with reasoning_rate >= {settings.rho_min}"}
        else:
            coefficients = dict(fixed)
            coefficients[name] = settings.bounds[0]
            summary["selected"] = {"trial": None, "coefficients": coefficients,
                                   "objectives": {"reasoning_rate": None},
                                   "rule": f"no evaluated {name} reached {settings.rho_min}: the lower bound"}
        summary["evaluated"] = sorted(([r[name], r["reasoning_rate"]] for r in complete), key=lambda p: p[0])
    summary["settings"] = settings.to_dict()
    if summary["settings"].get("storage"):
        summary["settings"]["storage"] = public_url(summary["settings"]["storage"])
    return summary


# select-queries lives in mergekit_rlvr.search.select; kept importable from here
from mergekit_rlvr.search.select import run_select_queries  # noqa: E402,F401
