"""`search` and `select-queries` end to end: recipe + queries in, report out.

Both take an ``open_engine`` callable (recipe, engine kwargs) -> engine, so that the
commands use HotSwapLLM and callers may pass anything that follows
``mergekit_rlvr.search.engine.Engine``."""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional

from mergekit_rlvr.errors import UserError
from mergekit_rlvr.search import report as rpt
from mergekit_rlvr.search import study as st
from mergekit_rlvr.search.engine import close_engine
from mergekit_rlvr.search.engine import open_engine as open_hotswap
from mergekit_rlvr.search.objective import Objective, objective_of
from mergekit_rlvr.search.progress import Progress, describer
from mergekit_rlvr.search.queries import load_queries
from mergekit_rlvr.search.results import report_files, summarize, timing_totals
from mergekit_rlvr.search.settings import SearchSettings, load_settings

Opener = Callable[[Any, Mapping[str, Any]], Any]


def recipe_coefficients(recipe: Mapping[str, Any]) -> Dict[str, float]:
    """The recipe's own coefficient values by name (engine order), from the recipe
    alone; with ``search.groups``, from mergekit's plan (configs and indexes only)."""
    from mergekit_rlvr.decompose import _model_string, coefficient_names_of, decompose
    from mergekit_rlvr.groups import of_recipe
    from mergekit_rlvr.kernels.coefficients import coefficient

    if of_recipe(recipe) is not None:
        return decompose(recipe).coefficient_dict()

    names = coefficient_names_of(recipe)
    meaning = coefficient(recipe.get("merge_method"))
    params = recipe.get("parameters") or {}
    if not meaning.per_model:  # the method's default (mergekit's spec) when the recipe leaves it out
        return {names[0]: float(params.get(meaning.parameter, meaning.default))}
    weights = {}
    for entry in recipe.get("models") or []:
        weight = (entry.get("parameters") or {}).get(meaning.parameter, params.get(meaning.parameter, 1.0))
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
    objective_of(settings).check_searched(all_names)
    return list(all_names)


def _inputs(recipe_path: str, queries_path: Optional[str], overrides: Optional[Mapping[str, Any]],
            report_only: bool):
    """(recipe, what the engine opens, settings, queries or None)."""
    from mergekit_rlvr.decompose import load_recipe

    recipe = load_recipe(recipe_path)
    settings = load_settings(recipe.get("search"), overrides, str(recipe.get("merge_method", "")))
    if queries_path is None and not report_only:
        raise UserError("--queries is required (except with --report-only)")
    queries = load_queries(queries_path) if queries_path is not None else None
    recipe_arg: Any = recipe_path
    if (overrides or {}).get("groups") is not None:  # the engine and best.yml use the same groups
        recipe["search"] = {**(recipe.get("search") or {}), "groups": settings.groups}
        recipe_arg = recipe
    return recipe, recipe_arg, settings, queries


def run_search(
    recipe_path: str,
    queries_path: Optional[str],
    out_dir: str,
    overrides: Optional[Mapping[str, Any]] = None,
    open_engine: Optional[Opener] = None,
    progress: bool = True,
    report_only: bool = False,
) -> Dict[str, Any]:
    """Run (or resume) the search; write the report; return summary.json's content.
    ``report_only``: no engine and no trial, the report rebuilt from the storage."""
    started = time.perf_counter()
    recipe, recipe_arg, settings, queries = _inputs(recipe_path, queries_path, overrides, report_only)
    objective = objective_of(settings)
    fixed = recipe_coefficients(recipe)
    names = list(fixed)
    searched = _searched(settings, names)
    url = st.storage_url(settings, out_dir)
    if report_only and not settings.storage and not os.path.exists(os.path.join(out_dir, "study.db")):
        raise UserError(f"--report-only: no study in {out_dir} (study.db) and no --storage given")
    os.makedirs(out_dir, exist_ok=True)
    study = st.open_study(settings, url, searched, create=not report_only)
    before = len(st.finished_trials(study))
    timings: Dict[str, Any] = {"setup_s": time.perf_counter() - started}
    if not report_only:
        timings = _run_trials(study, objective, settings, recipe_arg, queries, fixed, searched, open_engine,
                              progress, started)
    rows = st.trial_rows(study, searched, fixed, objective.names)
    summary = summarize(rows, settings, searched, names, fixed, objective.names, url, study.study_name)
    summary["timings"] = {**timings, "trials_this_run": len(rows) - before, **timing_totals(rows)}
    if queries is not None:
        summary["queries"] = {"file": os.path.abspath(queries_path), "count": len(queries)}
    rpt.write_report(out_dir, report_files(recipe, rows, summary, settings, searched, names, objective.names))
    return summary


def _evaluator(objective: Objective, settings: SearchSettings, recipe_arg, queries, fixed,
               open_engine: Optional[Opener]):
    """The Evaluator of this search: the engine opened on first use, the objective's
    prompts built from its tokenizer, the objective's measurement."""
    from mergekit_rlvr.search.evaluator import Evaluator

    prompts: Dict[str, Any] = {}
    references = [q.answer for q in queries] if any(q.answer is not None for q in queries) else None

    def start_engine():
        engine = (open_engine or (lambda r, k: open_hotswap(r, k)[0]))(recipe_arg, dict(settings.engine))
        prompts["objective"] = objective.prompts(engine.get_tokenizer(), queries, settings)
        return engine

    def measure(engine, stop_rule_for=None):
        return objective.measure(engine, prompts["objective"], settings, references, stop_rule_for)

    return Evaluator(start_engine, measure, fixed)


def _run_trials(study, objective: Objective, settings, recipe_arg, queries, fixed, searched, open_engine,
                progress, started) -> Dict[str, Any]:
    """The trial loop on one engine (opened here, closed at the end); its timings."""
    evaluator = _evaluator(objective, settings, recipe_arg, queries, fixed, open_engine)
    before = len(st.finished_trials(study))
    if objective.opens_engine_early(settings, before):
        evaluator.get_engine()  # before the progress bar, so that its rate is the trials'
    early_start_s = evaluator.engine_start_s
    bar = Progress(objective.planned_trials(settings), before, describer(objective, settings, searched, fixed),
                   enabled=progress)
    search_start = time.perf_counter()
    setup_s = search_start - started - early_start_s
    try:
        objective.run(study, evaluator, settings, searched, bar)
    finally:
        bar.close()
        search_s = time.perf_counter() - search_start - (evaluator.engine_start_s - early_start_s)
        close_start = time.perf_counter()
        if evaluator.engine is not None and open_engine is None:
            close_engine(evaluator.engine)
        engine_close_s = time.perf_counter() - close_start
    return {"engine_start_s": evaluator.engine_start_s if evaluator.engine is not None else None,
            "engine_close_s": engine_close_s,
            "setup_s": setup_s,  # recipe, queries, study
            "search_s": search_s}  # the trial loop, engine start excluded


# select-queries lives in mergekit_rlvr.search.select; kept importable from here
from mergekit_rlvr.search.select import run_select_queries  # noqa: E402,F401
