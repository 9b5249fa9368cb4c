"""What a search reports from its study's finished trials: summary.json's content and
the report files (trials.csv, summary.json, best.yml, plots). The same rows give the
same report whichever worker (or ``search --report-only``) writes it."""

from __future__ import annotations

from typing import Any, Dict

from mergekit_rlvr.search import report as rpt
from mergekit_rlvr.search.selection import excluded, largest_alpha, select_dots
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
    if settings.objective == "dots":
        summary["excluded_non_finite"] = excluded(complete)  # never selected, never on the front
        if complete and summary["excluded_non_finite"] < len(complete):
            selected, front = select_dots(complete, settings.select)
            summary["selected"] = {**entry(selected), "rule": settings.select}
            summary["pareto_front"] = [entry(r) for r in front]
        else:
            summary["selected"], summary["pareto_front"] = None, []
    else:
        name = searched[0]
        best = largest_alpha(complete, settings.rho_min, name, fallback=settings.bounds[0])
        if best["number"] >= 0:
            summary["selected"] = {**entry(best), "rule": f"largest {name} with reasoning_rate >= {settings.rho_min}"}
        else:
            coefficients = dict(fixed)
            coefficients[name] = settings.bounds[0]
            summary["selected"] = {"trial": None, "coefficients": coefficients,
                                   "objectives": {"reasoning_rate": None},
                                   "rule": f"no evaluated {name} reached {settings.rho_min}: the lower bound"}
        summary["evaluated"] = sorted(([r[name], r["reasoning_rate"]] for r in complete), key=lambda p: p[0])
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
        if settings.objective == "dots":
            front = [r for r in rows if r["number"] in {p["trial"] for p in summary["pareto_front"]}]
            files["pareto.png"] = rpt.pareto_png(rows, front, sel_row)
        files["objectives.png"] = rpt.objectives_png(
            rows, searched, objectives, sel_row, settings.rho_min if settings.objective == "reasoning_rate" else None)
    return files
