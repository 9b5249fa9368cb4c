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
from mergekit_rlvr.search.selection import is_finite, largest_alpha, select_dots
from mergekit_rlvr.search.settings import SearchSettings, load_settings
from mergekit_rlvr.search.results import report_files, summarize


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
    queries_path: Optional[str],
    out_dir: str,
    overrides: Optional[Mapping[str, Any]] = None,
    open_engine: Optional[Callable[[Any, Mapping[str, Any]], Any]] = None,
    progress: bool = True,
    report_only: bool = False,
) -> Dict[str, Any]:
    """Run (or resume) the search; write the report; return summary.json's content.
    ``report_only``: no engine and no trial, the report rebuilt from the storage."""
    from mergekit_rlvr.decompose import load_recipe
    from mergekit_rlvr.search import study as st

    started = time.perf_counter()
    recipe = load_recipe(recipe_path)
    settings = load_settings(recipe.get("search"), overrides, str(recipe.get("merge_method", "")))
    if queries_path is None and not report_only:
        raise UserError("--queries is required (except with --report-only)")
    queries = load_queries(queries_path) if queries_path is not None else None
    recipe_arg: Any = recipe_path
    if (overrides or {}).get("groups") is not None:  # the engine and best.yml use the same groups
        recipe["search"] = {**(recipe.get("search") or {}), "groups": settings.groups}
        recipe_arg = recipe
    fixed = recipe_coefficients(recipe)
    names = list(fixed)
    searched = _searched(settings, names)
    objectives = st.objective_names(settings)
    url = st.storage_url(settings, out_dir)
    if report_only and not settings.storage and not os.path.exists(os.path.join(out_dir, "study.db")):
        raise UserError(f"--report-only: no study in {out_dir} (study.db) and no --storage given")
    os.makedirs(out_dir, exist_ok=True)
    study = st.open_study(settings, url, searched, create=not report_only)
    before = len(st.finished_trials(study))
    timings: Dict[str, Any] = {"setup_s": time.perf_counter() - started}
    if not report_only:
        timings = _run_trials(study, settings, recipe_arg, queries, fixed, searched, objectives, open_engine,
                              progress, started)

    rows = st.trial_rows(study, searched, fixed, objectives)
    summary = summarize(rows, settings, searched, names, fixed, objectives, url, study.study_name)
    summary["timings"] = {
        **timings,
        "trials_this_run": len(rows) - before,
        # sums over every finished trial of the study:
        "trial_wall_s": sum(r["wall_s"] for r in rows if math.isfinite(r["wall_s"])),
        "generate_s": sum(r["generate_s"] for r in rows if math.isfinite(r["generate_s"])),
        "score_s": sum(r["score_s"] for r in rows if math.isfinite(r["score_s"])),
        "swap_s": sum(r["swap_s"] for r in rows if math.isfinite(r["swap_s"])),
    }
    if queries is not None:
        summary["queries"] = {"file": os.path.abspath(queries_path), "count": len(queries)}
    rpt.write_report(out_dir, report_files(recipe, rows, summary, settings, searched, names, objectives))
    return summary


def _run_trials(study, settings, recipe_arg, queries, fixed, searched, objectives, open_engine, progress,
                started) -> Dict[str, Any]:
    """The trial loop on one engine (opened here, closed at the end); its timings."""
    from mergekit_rlvr.search import study as st
    from mergekit_rlvr.search.objectives import dots_prompts, measure_dots
    from mergekit_rlvr.search.reasoning import measure_reasoning, reasoning_prompts

    prompts: Dict[str, List[str]] = {}

    def start_engine():
        engine = (open_engine or (lambda r, k: open_hotswap(r, k)[0]))(recipe_arg, dict(settings.engine))
        tokenizer = engine.get_tokenizer()
        if settings.objective == "dots":
            prompts["gen"], prompts["ppl"] = dots_prompts(tokenizer, queries, settings)
        else:
            prompts["gen"] = reasoning_prompts(tokenizer, queries, settings)
        return engine

    references = [q.answer for q in queries] if any(q.answer is not None for q in queries) else None
    if settings.objective == "dots":
        def measure(engine, stop_rule_for=None):
            return measure_dots(engine, prompts["gen"], prompts["ppl"], settings, stop_rule_for, references)
    else:
        def measure(engine, stop_rule_for=None):
            return measure_reasoning(engine, prompts["gen"], settings)

    evaluator = st.Evaluator(start_engine, measure, fixed)
    before = len(st.finished_trials(study))
    total = settings.trials if settings.objective == "dots" else (
        settings.grid + 1 if settings.strategy == "grid" else settings.max_steps)
    if settings.objective == "dots" and before < settings.trials:
        evaluator.get_engine()  # before the progress bar, so that its rate is the trials'
    early_start_s = evaluator.engine_start_s
    bar = _Progress(total, before, _describer(settings, searched, fixed, objectives), enabled=progress)
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
    return {"engine_start_s": evaluator.engine_start_s if evaluator.engine is not None else None,
            "engine_close_s": engine_close_s,
            "setup_s": setup_s,  # recipe, queries, study
            "search_s": search_s}  # the trial loop, engine start excluded


def _describer(settings, searched, fixed, objectives) -> Callable[[Any], str]:
    from mergekit_rlvr.search import study as st

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

    return describe


# select-queries lives in mergekit_rlvr.search.select; kept importable from here
from mergekit_rlvr.search.select import run_select_queries  # noqa: E402,F401
