"""The Optuna sampler a study draws its trials with (``search.sampler``)."""

from __future__ import annotations

import warnings

from mergekit_rlvr.search.settings import SearchSettings


def make_sampler(settings: SearchSettings, seed: int):
    """``tpe`` (the paper's; multivariate, constant liar for cooperating workers),
    ``nsga2`` (the DoTS authors' code) or ``random``."""
    import optuna

    if settings.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():  # multivariate: one joint draw (and one storage read) per trial
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True, multivariate=True)
