"""The two ways a search drives its study.

- :func:`run_trials` (DoTS): Optuna's own ``study.optimize`` until the study holds
  ``trials`` finished trials, then :func:`settle`; the sampler picks each point.
- :func:`point_evaluator` (reasoning rate): the strategy picks each point, and each
  one is one ``study.ask()`` / ``study.tell()`` trial at that point, under Optuna's
  heartbeat like an optimize trial.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Dict, Sequence, Tuple

from mergekit_rlvr.search.evaluator import Evaluator
from mergekit_rlvr.search.settings import SearchSettings

Progress = Callable[[Any], None]


def _fail_stale(study) -> None:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def settle(study, poll_s: float) -> int:
    """Wait until no trial of the study is RUNNING: each one either finishes in its
    live worker or stops beating and is failed here once its grace period is over
    (``fail_stale_trials``, which also enqueues its point again). So every worker's
    report, written next, covers the whole study. Returns how many it failed."""
    from optuna.trial import TrialState

    failed = 0
    while True:
        before = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
        _fail_stale(study)
        failed += len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))) - before
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            return failed
        time.sleep(poll_s)  # polls the storage: heartbeats are what it waits on


def run_trials(study, evaluator: Evaluator, settings: SearchSettings, searched: Sequence[str],
               progress: Progress = lambda study: None) -> int:
    """Run trials until the study holds ``settings.trials`` finished ones, none running
    and no retried point waiting (a worker killed in its trial: its point is evaluated
    again, here or by another worker); returns how many this process ran."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    from mergekit_rlvr.search.pruning import dominance_stop_rule
    from mergekit_rlvr.search.study import finished_trials

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


def ask_at(study, params: Dict[str, float], distributions: Dict[str, Any]):
    """``study.ask(distributions)`` with the trial's parameters fixed at ``params``
    (Optuna's PartialFixedSampler over the study's own sampler, for this one ask)."""
    import optuna

    sampler = study.sampler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # the heartbeat runs around the trial (point_evaluator), as optimize runs it
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
        study.sampler = optuna.samplers.PartialFixedSampler(params, sampler)
        try:
            return study.ask(distributions)
        finally:
            study.sampler = sampler


def point_evaluator(study, evaluator: Evaluator, name: str, bounds: Tuple[float, float], measured: str,
                    progress: Progress = lambda study: None) -> Callable[[float], float]:
    """``evaluate(alpha)`` for a one-coefficient strategy: the study's COMPLETE trial
    at ``alpha`` when there is one (resume: not measured again), else one ask/tell
    trial at ``alpha``; returns the (single) objective ``measured``."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState

    from mergekit_rlvr.search.journal import trial_heartbeat

    def evaluate(alpha: float) -> float:
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.params.get(name) == alpha:
                return float(t.values[0])
        _fail_stale(study)  # as study.optimize does before each trial
        trial = ask_at(study, {name: alpha}, {name: FloatDistribution(*bounds)})
        try:
            with trial_heartbeat(study, trial):
                value = evaluator(trial, dict(trial.params)).values[measured]
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        study.tell(trial, value)
        progress(study)
        return value

    return evaluate
