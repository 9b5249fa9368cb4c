"""One trial's evaluation: swap the coefficients on the engine, measure, and record
what the report and optuna-dashboard read back (the trial's user attributes)."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict

WORKER = f"{socket.gethostname()}:{os.getpid()}"


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
