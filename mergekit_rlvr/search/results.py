"""What a search reports from its study's finished trials: summary.json's content and
the report files (trials.csv, summary.json, best.yml, plots). The same rows give the
same report whichever worker (or ``search --report-only``) writes it."""

from __future__ import annotations

import math
from typing import Any, Dict, Sequence

from mergekit_rlvr.search import report as rpt
from mergekit_rlvr.search.objective import objective_of
from mergekit_rlvr.search.settings import SearchSettings
from mergekit_rlvr.search.storage import public_url


def summarize(rows, settings: SearchSettings, searched, names, fixed, objectives, url, study_name) -> Dict[str, Any]:
    complete = [r for r in rows if r["state"] == "COMPLETE"]

    def entry(row):
        out = {"trial": row["number"], "coefficients": {n: row[n] for n in names},
               "objectives": {o: row[o] for o in objectives}}
        if "accuracy" in row:  # against the queries' answers: reported, never used to select
            out["accuracy"] = row["accuracy"]
        return out

    summary: Dict[str, Any] = {"objective": settings.objective, "searched": list(searched),
                               "storage": public_url(url), "study_name": study_name,
                               "finished_trials": len(rows), "complete_trials": len(complete)}
    summary.update(objective_of(settings).summarize(complete, settings, searched, fixed, entry))
    summary["settings"] = settings.to_dict()
    if summary["settings"].get("storage"):
        summary["settings"]["storage"] = public_url(summary["settings"]["storage"])
    return summary


def report_files(recipe, rows, summary, settings: SearchSettings, searched, names, objectives) -> Dict[str, bytes]:
    reported = ["accuracy"] if any("accuracy" in r for r in rows) else []
    files = {"trials.csv": rpt.trials_csv(rows, names, objectives, reported),
             "summary.json": rpt.summary_json(summary)}
    selected = summary["selected"]
    if selected is not None:
        files["best.yml"] = rpt.best_yaml(recipe, selected["coefficients"])
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    if complete:
        sel_row = None if selected is None else {**selected["coefficients"], **selected["objectives"],
                                                 "number": selected["trial"]}
        files.update(objective_of(settings).plots(rows, summary, sel_row, settings, searched))
    return files


def timing_totals(rows: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    """Sums over every finished trial of the study (summary.json's timings)."""
    return {out: sum(r[key] for r in rows if math.isfinite(r[key]))
            for out, key in (("trial_wall_s", "wall_s"), ("generate_s", "generate_s"), ("score_s", "score_s"),
                             ("swap_s", "swap_s"))}
