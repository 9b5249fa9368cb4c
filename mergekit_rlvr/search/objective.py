"""What a search optimizes: one object per objective, chosen once from the settings.

An :class:`Objective` says everything the search needs to know about one objective:
its names and directions (the Optuna study's), the settings defaults it changes,
the prompts it needs, how it measures a trial, how it drives the study, and how it
selects the trial to keep (summary.json, best.yml, plots). The runner, the study
and the report ask it instead of branching on the objective's name.

- ``dots`` (paper 000): consistency up, perplexity down; TPE trials until the study
  holds ``trials`` finished ones; the Pareto front and its selected point.
- ``reasoning_rate`` (paper 003): the largest merge ratio whose reasoning rate stays
  at least ``rho_min``, by grid or binary search (one ask/tell trial per point).

The measurements themselves live beside it: ``dots`` (consistency, perplexity) and
``reasoning`` (reasoning rate, the grid and binary strategies), on ``prompts`` and
``measurement``. Adding an objective: a subclass here, registered in
:data:`OBJECTIVES`, and its measurement module.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from mergekit_rlvr.errors import UserError
from mergekit_rlvr.search import report as rpt
from mergekit_rlvr.search.selection import excluded, is_finite, largest_alpha, select_dots

Row = Dict[str, Any]
Entry = Callable[[Row], Dict[str, Any]]  # a row as summary.json writes a trial


class Objective:
    """The interface; see the module docstring."""

    key: str = ""  # search.objective
    names: Tuple[str, ...] = ()  # the study's objective values, in order
    directions: Tuple[str, ...] = ()  # Optuna's, one per name
    methods: Tuple[str, ...] = ()  # merge methods whose recipes default to this objective
    defaults: Dict[str, Any] = {}  # settings defaults this objective changes
    retry_stale: bool = False  # a trial whose worker died is evaluated again (RetryFailedTrialCallback)

    def check_searched(self, names: Sequence[str]) -> None:
        """Refuse, in one line, a recipe whose coefficients this objective cannot search
        all at once (only called when search.coefficients does not name them)."""

    def planned_trials(self, settings) -> int:
        """How many trials the progress bar expects."""
        raise NotImplementedError

    def opens_engine_early(self, settings, finished: int) -> bool:
        """Open the engine before the progress bar starts (so its rate is the trials')."""
        return False

    def prompts(self, tokenizer, queries, settings) -> Any:
        raise NotImplementedError

    def measure(self, engine, prompts, settings, references, stop_rule_for=None):
        """One trial's Measurement on the engine's current weights."""
        raise NotImplementedError

    def run(self, study, evaluator, settings, searched: Sequence[str], progress) -> Any:
        """Drive the study: trials until done (``progress(study)`` after each)."""
        raise NotImplementedError

    def describe(self, complete: Sequence[Row], settings, searched: Sequence[str]) -> str:
        """The progress bar's postfix: the current best of the COMPLETE rows."""
        raise NotImplementedError

    def summarize(self, complete: Sequence[Row], settings, searched: Sequence[str], fixed: Dict[str, float],
                  entry: Entry) -> Dict[str, Any]:
        """summary.json's keys that depend on the objective ("selected" among them)."""
        raise NotImplementedError

    def plots(self, rows: Sequence[Row], summary: Dict[str, Any], selected: Optional[Row], settings,
              searched: Sequence[str]) -> Dict[str, bytes]:
        """PNG files by name (written only when some trial is COMPLETE)."""
        raise NotImplementedError


class Dots(Objective):
    key = "dots"
    names = ("consistency", "perplexity")
    directions = ("maximize", "minimize")
    retry_stale = True

    def planned_trials(self, settings) -> int:
        return settings.trials

    def opens_engine_early(self, settings, finished: int) -> bool:
        return finished < settings.trials

    def prompts(self, tokenizer, queries, settings):
        from mergekit_rlvr.search.dots import dots_prompts

        return dots_prompts(tokenizer, queries, settings)

    def measure(self, engine, prompts, settings, references, stop_rule_for=None):
        from mergekit_rlvr.search.dots import measure_dots

        generation, perplexity = prompts
        return measure_dots(engine, generation, perplexity, settings, stop_rule_for, references)

    def run(self, study, evaluator, settings, searched, progress):
        from mergekit_rlvr.search.loops import run_trials

        return run_trials(study, evaluator, settings, searched, progress=progress)

    def describe(self, complete, settings, searched) -> str:
        rows = [r for r in complete if is_finite(r)]
        if not rows:
            return ""
        best, _ = select_dots(rows, settings.select)
        return f"best #{best['number']} c={best['consistency']:.3f} ppl={best['perplexity']:.3g}"

    def summarize(self, complete, settings, searched, fixed, entry):
        out: Dict[str, Any] = {"excluded_non_finite": excluded(complete)}  # never selected, never on the front
        if complete and out["excluded_non_finite"] < len(complete):
            selected, front = select_dots(complete, settings.select)
            out["selected"] = {**entry(selected), "rule": settings.select}
            out["pareto_front"] = [entry(r) for r in front]
        else:
            out["selected"], out["pareto_front"] = None, []
        return out

    def plots(self, rows, summary, selected, settings, searched):
        on_front = {p["trial"] for p in summary["pareto_front"]}
        front = [r for r in rows if r["number"] in on_front]
        return {"pareto.png": rpt.pareto_png(rows, front, selected),
                "objectives.png": rpt.objectives_png(rows, searched, self.names, selected)}


class ReasoningRate(Objective):
    key = "reasoning_rate"
    names = ("reasoning_rate",)
    directions = ("maximize",)
    methods = ("reasoning_interp",)
    defaults = {"bounds": (0.0, 1.0), "samples": 1, "max_tokens": 1024}

    def check_searched(self, names):
        if len(names) != 1:
            raise UserError("objective reasoning_rate searches one coefficient (reasoning_interp's alpha);"
                            f" this recipe has {', '.join(names)}: name it in search.coefficients")

    def planned_trials(self, settings) -> int:
        return settings.grid + 1 if settings.strategy == "grid" else settings.max_steps

    def prompts(self, tokenizer, queries, settings):
        from mergekit_rlvr.search.reasoning import reasoning_prompts

        return reasoning_prompts(tokenizer, queries, settings)

    def measure(self, engine, prompts, settings, references, stop_rule_for=None):
        from mergekit_rlvr.search.reasoning import measure_reasoning

        return measure_reasoning(engine, prompts, settings)

    def run(self, study, evaluator, settings, searched, progress) -> Dict[float, float]:
        """Grid or binary search over the one searched coefficient; returns alpha ->
        reasoning rate of the points visited."""
        from mergekit_rlvr.search.loops import point_evaluator
        from mergekit_rlvr.search.reasoning import binary_search, grid_search

        evaluate = point_evaluator(study, evaluator, searched[0], settings.bounds, self.names[0], progress)
        if settings.strategy == "grid":
            return grid_search(evaluate, settings.bounds, settings.grid)
        full_rate = 0.999 if settings.detect == "logit" else 1.0
        return binary_search(evaluate, settings.bounds, settings.rho_min, settings.max_steps, full_rate)

    def describe(self, complete, settings, searched) -> str:
        name = searched[0]
        best = largest_alpha(complete, settings.rho_min, name) if complete else None
        return "" if best is None else f"{name}={best[name]:.4g} rate={best['reasoning_rate']:.3f}"

    def summarize(self, complete, settings, searched, fixed, entry):
        name = searched[0]
        best = largest_alpha(complete, settings.rho_min, name, fallback=settings.bounds[0])
        if best["number"] >= 0:
            selected = {**entry(best), "rule": f"largest {name} with reasoning_rate >= {settings.rho_min}"}
        else:
            selected = {"trial": None, "coefficients": {**fixed, name: settings.bounds[0]},
                        "objectives": {"reasoning_rate": None},
                        "rule": f"no evaluated {name} reached {settings.rho_min}: the lower bound"}
        evaluated = sorted(([r[name], r["reasoning_rate"]] for r in complete), key=lambda p: p[0])
        return {"selected": selected, "evaluated": evaluated}

    def plots(self, rows, summary, selected, settings, searched):
        return {"objectives.png": rpt.objectives_png(rows, searched, self.names, selected,
                                                     threshold=settings.rho_min, connect=True)}


#: every objective by its ``search.objective`` key
OBJECTIVES: Dict[str, Objective] = {o.key: o for o in (Dots(), ReasoningRate())}


def objective_of(settings) -> Objective:
    return OBJECTIVES[settings.objective]


def default_objective(merge_method: str) -> str:
    """The objective a recipe of ``merge_method`` gets when its search block names none."""
    return next((o.key for o in OBJECTIVES.values() if merge_method in o.methods), Dots.key)


def objective_with_directions(count: int) -> str:
    """Studies written before the objective was stored: their directions tell."""
    return next(o.key for o in OBJECTIVES.values() if len(o.directions) == count)
