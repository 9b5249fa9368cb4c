"""The Optuna study behind a search: its name, samplers, resume, the trial loop.

Every finished trial is in the study's storage (sqlite in the output directory by
default, or any Optuna storage: mergekit_rlvr.search.storage), written when the trial
ends; a process killed at any moment loses at most the trial in flight, which the
heartbeat marks failed once its grace period has passed (and, for DoTS, enqueues
again for a live worker). Rerunning with a larger ``trials`` continues from the
finished trials; several processes on one storage cooperate on one study: each stops
when the study holds ``trials`` finished trials, then waits until no trial is running
(a worker still in its last trial may add one more: ``trials`` + 1 at most per
concurrent worker that started one in the same moment), so that every worker's
report covers the whole study.

A trial swaps coefficients on the one running engine and measures; it never writes
weights or starts an engine. The engine is opened lazily, so a rerun with nothing
left to do only rewrites the report.
"""

from __future__ import annotations

import math
import os
import socket
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence

from mergekit_rlvr.errors import UserError
from mergekit_rlvr.search.settings import SearchSettings
from mergekit_rlvr.search.storage import open_storage, public_url
from mergekit_rlvr.search.storage import storage_url as _storage_url

FINISHED = ("COMPLETE", "PRUNED")


def storage_url(settings: SearchSettings, out_dir: str) -> str:
    return _storage_url(settings.storage, out_dir)


def study_name(settings: SearchSettings) -> str:
    """The name stored in the database: --study-name as given, else search-<objective>
    (so a default output directory holds a dots and a reasoning_rate study side by side)."""
    return settings.study_name or f"search-{settings.objective}"


def make_sampler(settings: SearchSettings, seed: int):
    import optuna

    if settings.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():  # multivariate: one joint draw (and one storage read) per trial
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True, multivariate=True)


def objective_names(settings: SearchSettings) -> List[str]:
    return ["consistency", "perplexity"] if settings.objective == "dots" else ["reasoning_rate"]


def directions(settings: SearchSettings) -> List[str]:
    return ["maximize", "minimize"] if settings.objective == "dots" else ["maximize"]


def _check_objective(storage, name: str, settings: SearchSettings, url: str) -> None:
    """A study of another objective under this name is refused in one line."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return
    stored = storage.get_study_user_attrs(study_id).get("objective")
    if stored is None:  # older studies: their directions tell
        stored = "dots" if len(storage.get_study_directions(study_id)) == 2 else "reasoning_rate"
    if stored != settings.objective:
        raise UserError(f"study {name!r} in {public_url(url)} holds objective {stored}, not {settings.objective}"
                        " (use another --study-name, --out or --storage)")


def open_study(settings: SearchSettings, url: str, searched: Sequence[str], create: bool = True):
    """Create or load the study; check that a loaded one has the same objective and
    searched the same coefficients. The sampler's seed mixes in the number of trials
    already stored, so a resumed study does not replay its first random trials (and,
    with an explicit shared storage, the process id, so that cooperating workers draw
    different ones). ``create=False``: a missing study is an error."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(url, settings.heartbeat_interval, settings.grace_period,
                           retry=settings.objective == "dots")
    name = study_name(settings)
    _check_objective(storage, name, settings, url)
    if not create and name not in {s.study_name for s in storage.get_all_studies()}:
        raise UserError(f"no study {name!r} in {public_url(url)} (check --study-name and --storage)")
    study = optuna.create_study(storage=storage, study_name=name, directions=directions(settings),
                                load_if_exists=True)
    stored = study.user_attrs.get("coefficients")
    if stored is None:
        study.set_user_attr("coefficients", list(searched))
        study.set_user_attr("bounds", list(settings.bounds))
        study.set_user_attr("objective", settings.objective)
        with warnings.catch_warnings():  # experimental in Optuna 5; optuna-dashboard's axis labels
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(objective_names(settings))
    elif list(stored) != list(searched):
        raise UserError(f"study {name!r} in {public_url(url)} searched coefficients {stored}, not {list(searched)}"
                        " (use another --out, --storage or --study-name)")
    seed = settings.seed + len(study.get_trials(deepcopy=False))
    if settings.storage:
        seed = (seed * 1_000_003 + os.getpid()) % (2**31)
    study.sampler = make_sampler(settings, seed)
    return study


def settle(study, poll_s: float) -> int:
    """Wait until no trial of the study is RUNNING: each one either finishes in its
    live worker or stops beating and is failed here once its grace period is over
    (``fail_stale_trials``, which also enqueues its point again). So every worker's
    report, written next, covers the whole study. Returns how many it failed."""
    import optuna
    from optuna.trial import TrialState

    failed = 0
    while True:
        before = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        failed += len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))) - before
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            return failed
        time.sleep(poll_s)  # polls the storage: heartbeats are what it waits on


WORKER = f"{socket.gethostname()}:{os.getpid()}"


def finished_trials(study) -> List[Any]:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def trial_rows(study, searched: Sequence[str], fixed: Dict[str, float], names: Sequence[str]) -> List[Dict[str, Any]]:
    """One dict per finished trial: number, state, every coefficient (searched and fixed,
    in engine order), objectives, timings."""
    rows = []
    for t in sorted(finished_trials(study), key=lambda t: t.number):
        row: Dict[str, Any] = {"number": t.number, "state": t.state.name}
        for name, value in fixed.items():
            row[name] = float(t.params.get(name, value))
        record = t.user_attrs.get("measure", {})
        if t.values is not None:
            row.update(zip(names, (float(v) for v in t.values)))
        else:  # pruned: the partial measurement
            for name in names:
                row[name] = float(record.get("partial", {}).get(name, math.nan))
        for key in ("wall_s", "swap_s", "generate_s", "score_s"):
            row[key] = float(record.get(key, math.nan))
        if "accuracy" in record:
            row["accuracy"] = float(record["accuracy"])
        rows.append(row)
    return rows


@dataclass
class Evaluator:
    """Measures one coefficient setting on the engine (opened on first use)."""

    open_engine: Callable[[], Any]
    measure: Callable[..., Any]  # (engine, stop_rule_for) -> Measurement, on the current weights
    fixed: Dict[str, float]  # every coefficient's value outside the search
    engine: Any = None
    engine_start_s: float = 0.0

    def get_engine(self):
        if self.engine is None:
            start = time.perf_counter()
            self.engine = self.open_engine()
            self.engine_start_s = time.perf_counter() - start
        return self.engine

    def __call__(self, trial, coefficients: Dict[str, float], stop_rule_for=None):
        import optuna

        trial.set_user_attr("worker", WORKER)  # host:pid, which worker ran (or runs) it
        engine = self.get_engine()
        start = time.perf_counter()  # engine start is not the trial's time
        values = {**self.fixed, **coefficients}
        engine.set_coefficients(values)
        swap_s = time.perf_counter() - start
        measurement = self.measure(engine, stop_rule_for)
        record = {"swap_s": swap_s, "generate_s": measurement.generate_s, "score_s": measurement.score_s,
                  "per_query": [round(v, 6) for v in measurement.per_query]}
        if measurement.accuracy is not None:
            record["accuracy"] = measurement.accuracy
        if measurement.stopped_early:
            record["partial"] = dict(measurement.values)
        record["wall_s"] = time.perf_counter() - start
        trial.set_user_attr("measure", record)  # what the report reads back
        for key, value in dashboard_attrs(values, measurement, record).items():
            trial.set_user_attr(key, value)
        if measurement.stopped_early:
            raise optuna.TrialPruned()
        return measurement


def dashboard_attrs(values: Dict[str, float], measurement, record: Dict[str, Any]) -> Dict[str, Any]:
    """Scalar user attributes that optuna-dashboard shows per trial (and can sort
    and plot): the objectives (partial ones for a pruned trial), accuracy when the
    queries have answers, the timings, and every coefficient by its name as the
    recipe writes it (fixed ones too; the searched ones are also the trial's params)."""
    out: Dict[str, Any] = {name: float(v) for name, v in measurement.values.items()}
    if measurement.accuracy is not None:
        out["accuracy"] = float(measurement.accuracy)
    for key in ("swap_s", "generate_s", "wall_s"):
        out[key] = float(record[key])
    out["coefficients"] = {name: float(v) for name, v in values.items()}
    return out


def dominance_stop_rule(study, perplexity: float) -> Callable[[float, int, int], bool]:
    """Stop a trial whose best possible consistency (every remaining query at 1) is
    still dominated by a finished trial: it cannot reach the Pareto front, so the
    front and the selected trial stay what they would have been."""
    from optuna.trial import TrialState

    front = [t.values for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]

    def rule(total_so_far: float, done: int, total: int) -> bool:
        best_possible = (total_so_far + (total - done)) / total
        return any(c >= best_possible and p <= perplexity and (c > best_possible or p < perplexity)
                   for c, p in front)

    return rule


def run_dots(study, evaluator: Evaluator, settings: SearchSettings, searched: Sequence[str],
             progress: Callable[[Any], None] = lambda study: None) -> int:
    """Run trials until the study holds ``settings.trials`` finished ones, none running
    and no retried point waiting (a worker killed in its trial: its point is evaluated
    again, here or by another worker); returns how many this process ran."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    remaining = settings.trials - len(finished_trials(study))
    lo, hi = settings.bounds
    ran = 0

    def objective(trial):
        nonlocal ran
        coefficients = {name: trial.suggest_float(name, lo, hi) for name in searched}
        rule_for = None
        if settings.prune and settings.perplexity == "prompt":
            rule_for = lambda perplexity: dominance_stop_rule(study, perplexity)  # noqa: E731
        measurement = evaluator(trial, coefficients, rule_for)
        ran += 1
        return measurement.values["consistency"], measurement.values["perplexity"]

    def callback(study, trial):
        progress(study)

    if remaining > 0:
        study.optimize(objective, n_trials=remaining, catch=(),
                       callbacks=[MaxTrialsCallback(settings.trials, states=(TrialState.COMPLETE, TrialState.PRUNED)),
                                  callback])
    while True:  # a point whose worker died is evaluated even when the study is full by then
        settle(study, max(0.2, settings.heartbeat_interval / 2))
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if not waiting:
            return ran
        study.optimize(objective, n_trials=len(waiting), catch=(), callbacks=[callback])


def run_reasoning(study, evaluator: Evaluator, settings: SearchSettings, name: str,
                  progress: Callable[[Any], None] = lambda study: None) -> Dict[float, float]:
    """Grid or binary search over ``name``; a setting already in the study is read back,
    not measured again (resume). Returns alpha -> reasoning rate of the points visited."""
    from optuna.trial import TrialState

    from mergekit_rlvr.search.reasoning import binary_search, grid_search

    def evaluate(alpha: float) -> float:
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.params.get(name) == alpha:
                return float(t.values[0])
        study.enqueue_trial({name: alpha}, skip_if_exists=False)
        result = {}

        def objective(trial):
            value = trial.suggest_float(name, *settings.bounds)
            result["rate"] = evaluator(trial, {name: value}).values["reasoning_rate"]
            return result["rate"]

        study.optimize(objective, n_trials=1, callbacks=[lambda s, t: progress(s)])
        return result["rate"]

    if settings.strategy == "grid":
        return grid_search(evaluate, settings.bounds, settings.grid)
    full_rate = 0.999 if settings.detect == "logit" else 1.0
    return binary_search(evaluate, settings.bounds, settings.rho_min, settings.max_steps, full_rate)
