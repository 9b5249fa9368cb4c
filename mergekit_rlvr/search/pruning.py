"""The stop rule that prunes a DoTS trial mid-measurement (``search.prune``)."""

from __future__ import annotations

from typing import Callable


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
