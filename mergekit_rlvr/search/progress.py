"""The search's progress bar: tqdm over finished trials, the current best in its postfix."""

from __future__ import annotations

from typing import Any, Callable


class Progress:
    """Called with the study after each trial; ``describe(study)`` is the postfix."""

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


def describer(objective, settings, searched, fixed) -> Callable[[Any], str]:
    """The objective's view of the best COMPLETE trial so far."""
    from mergekit_rlvr.search.study import trial_rows

    def describe(study) -> str:
        rows = trial_rows(study, searched, fixed, objective.names)
        return objective.describe([r for r in rows if r["state"] == "COMPLETE"], settings, searched)

    return describe
