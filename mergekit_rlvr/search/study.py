"""The Optuna study behind a search: its name, opening (or resuming) it, and its
finished trials as rows.

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

The rest follows Optuna's own layout: the sampler (``samplers``), the storage
(``storage``, ``sqlite``, ``journal``), one trial's evaluation (``evaluator``), the
pruning stop rule (``pruning``) and the two loops (``loops``). A trial swaps
coefficients on the one running engine and measures; it never writes weights or
starts an engine. The engine is opened lazily, so a rerun with nothing left to do
only rewrites the report.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Dict, List, Sequence

from mergekit_rlvr.errors import UserError
from mergekit_rlvr.search.objective import objective_of, objective_with_directions
from mergekit_rlvr.search.samplers import make_sampler
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


def _check_objective(storage, name: str, settings: SearchSettings, url: str) -> None:
    """A study of another objective under this name is refused in one line."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return
    stored = storage.get_study_user_attrs(study_id).get("objective")
    if stored is None:  # older studies: their directions tell
        stored = objective_with_directions(len(storage.get_study_directions(study_id)))
    if stored != settings.objective:
        raise UserError(f"study {name!r} in {public_url(url)} holds objective {stored}, not {settings.objective}"
                        " (use another --study-name, --out or --storage)")


def _stamp(study, settings: SearchSettings, searched: Sequence[str], url: str) -> None:
    """A new study records what it searches; a loaded one must have searched the same."""
    import optuna

    stored = study.user_attrs.get("coefficients")
    if stored is None:
        study.set_user_attr("coefficients", list(searched))
        study.set_user_attr("bounds", list(settings.bounds))
        study.set_user_attr("objective", settings.objective)
        with warnings.catch_warnings():  # experimental in Optuna 5; optuna-dashboard's axis labels
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(objective_of(settings).names))
    elif list(stored) != list(searched):
        raise UserError(f"study {study.study_name!r} in {public_url(url)} searched coefficients {stored},"
                        f" not {list(searched)} (use another --out, --storage or --study-name)")


def open_study(settings: SearchSettings, url: str, searched: Sequence[str], create: bool = True):
    """Create or load the study; check that a loaded one has the same objective and
    searched the same coefficients. The sampler's seed mixes in the number of trials
    already stored, so a resumed study does not replay its first random trials (and,
    with an explicit shared storage, the process id, so that cooperating workers draw
    different ones). ``create=False``: a missing study is an error."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    objective = objective_of(settings)
    storage = open_storage(url, settings.heartbeat_interval, settings.grace_period, retry=objective.retry_stale)
    name = study_name(settings)
    _check_objective(storage, name, settings, url)
    if not create and name not in {s.study_name for s in storage.get_all_studies()}:
        raise UserError(f"no study {name!r} in {public_url(url)} (check --study-name and --storage)")
    study = optuna.create_study(storage=storage, study_name=name, directions=list(objective.directions),
                                load_if_exists=True)
    _stamp(study, settings, searched, url)
    seed = settings.seed + len(study.get_trials(deepcopy=False))
    if settings.storage:
        seed = (seed * 1_000_003 + os.getpid()) % (2**31)
    study.sampler = make_sampler(settings, seed)
    return study


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
