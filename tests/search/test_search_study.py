"""The search loop on a real Optuna study (sqlite) with the scripted engine of
tests/support/fake_engine.py: reports, resume without repeating trials, kill -9, several
processes on one storage, pruning, the reasoning-rate strategies. The same loop on
the real vLLM engine is in test_search_vllm.py."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mergekit_rlvr.errors import UserError
from mergekit_rlvr.search.runner import run_search
from support.fake_engine import FakeEngine, fake_opener, write_fake_recipe, write_queries

TESTS = Path(__file__).resolve().parent.parent  # tests/


def swaps(log):
    if not os.path.exists(log):
        return []
    return [json.loads(line) for line in open(log)]


def complete(out, name="search-dots"):
    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{out}/study.db")
    return study.get_trials(deepcopy=False)


def test_dots_report_and_selection(tmp_path):
    recipe = write_fake_recipe(tmp_path / "r.yml", extra={"trials": 12, "sampler": "random"})
    queries = write_queries(tmp_path / "q.jsonl", 3)
    out = tmp_path / "out"
    summary = run_search(recipe, queries, str(out), open_engine=fake_opener(), progress=False)
    assert {"trials.csv", "summary.json", "best.yml", "pareto.png", "objectives.png", "study.db"} <= set(os.listdir(out))
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]

    with open(out / "trials.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 12
    assert list(table[0])[:6] == ["trial", "state", "a", "b", "consistency", "perplexity"]
    assert "wall_s" in table[0]
    rows = [{"number": int(r["trial"]), "consistency": float(r["consistency"]),
             "perplexity": float(r["perplexity"]), "a": float(r["a"]), "b": float(r["b"])} for r in table]
    # the known answer: the front's highest consistency, computed here from the table
    best_c = max(r["consistency"] for r in rows)
    expected = min((r for r in rows if r["consistency"] == best_c), key=lambda r: (r["perplexity"], r["number"]))
    assert summary["selected"]["trial"] == expected["number"]
    assert summary["selected"]["coefficients"] == {"a": expected["a"], "b": expected["b"]}
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["selected"]["trial"] == expected["number"] and on_disk["pareto_front"]
    assert on_disk["settings"]["sampler"] == "random" and on_disk["timings"]["search_s"] > 0
    assert on_disk["excluded_non_finite"] == 0

    # queries carry answer 1/2, and the fake's majority is 1/2 in some spelling (the
    # other samples are all different): accuracy, reported only, is 1 in every trial
    assert all(float(raw["accuracy"]) == 1.0 for raw in table)
    assert on_disk["selected"]["accuracy"] == 1.0

    best = yaml.safe_load((out / "best.yml").read_text())
    assert [m["parameters"]["weight"] for m in best["models"]] == [expected["a"], expected["b"]]
    assert best["merge_method"] == "dots" and best["base_model"] == "base"


def test_dashboard_reads_per_trial_attributes(tmp_path):
    """The default sqlite study, as optuna-dashboard opens it (optuna.load_study on
    <out>/study.db): objective names, and per trial the objectives, accuracy, timings
    and every coefficient by name (the fixed one too)."""
    import optuna

    recipe = write_fake_recipe(tmp_path / "r.yml", extra={"trials": 3, "sampler": "random",
                                                         "coefficients": ["a"]})
    out = tmp_path / "out"
    summary = run_search(recipe, write_queries(tmp_path / "q.jsonl", 2), str(out), open_engine=fake_opener(),
                         progress=False)
    study = optuna.load_study(study_name=summary["study_name"], storage=f"sqlite:///{out}/study.db")
    assert study.metric_names == ["consistency", "perplexity"]
    trials = study.get_trials()
    assert len(trials) == 3
    for t in trials:
        attrs = t.user_attrs
        a = t.params["a"]
        assert attrs["coefficients"] == {"a": a, "b": 1.0}
        assert [attrs["consistency"], attrs["perplexity"]] == t.values
        assert attrs["perplexity"] == pytest.approx(10 + (a - 1) ** 2)  # the fake's known answer
        assert attrs["accuracy"] == 1.0
        assert 0 <= attrs["swap_s"] <= attrs["wall_s"] and attrs["generate_s"] >= 0

    # and optuna-dashboard's own API serves them from the file as it is
    dashboard = pytest.importorskip("optuna_dashboard")
    app = dashboard.wsgi(f"sqlite:///{out}/study.db")
    studies = _wsgi_get(app, "/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == [summary["study_name"]]
    detail = _wsgi_get(app, f"/api/studies/{studies[0]['study_id']}", "after=0")
    assert detail["objective_names"] == ["consistency", "perplexity"]
    sortable = {a["key"] for a in detail["union_user_attrs"] if a["sortable"]}
    assert {"consistency", "perplexity", "accuracy", "swap_s", "wall_s"} <= sortable
    shown = {a["key"]: a["value"] for a in detail["trials"][0]["user_attrs"]}
    assert json.loads(shown["coefficients"]) == trials[0].user_attrs["coefficients"]


def _wsgi_get(app, path, query=""):
    from wsgiref.util import setup_testing_defaults

    environ = {"PATH_INFO": path, "QUERY_STRING": query}
    setup_testing_defaults(environ)
    status = []
    body = b"".join(app(environ, lambda s, headers, exc=None: status.append(s)))
    assert status == ["200 OK"], body[:500]
    return json.loads(body)


def test_consistency_counts_equivalent_spellings(tmp_path):
    """The fake answers 1/2 as '1/2', '\\frac{1}{2}' and '0.5' in turn: all one vote."""
    engine = FakeEngine()
    engine.set_coefficients({"a": 1.5, "b": 0.5})  # consistency 1
    from mergekit_rlvr.search.dots import measure_dots
    from mergekit_rlvr.search.settings import load_settings

    m = measure_dots(engine, ["q0", "q1"], ["q0", "q1"], load_settings({"samples": 6}))
    assert m.values["consistency"] == 1.0 and m.values["perplexity"] == pytest.approx(10.25)


def test_resume_continues_without_repeating(tmp_path):
    recipe = write_fake_recipe(tmp_path / "r.yml")
    queries = write_queries(tmp_path / "q.jsonl", 2)
    out, log = tmp_path / "out", str(tmp_path / "swaps.jsonl")
    run_search(recipe, queries, str(out), {"trials": 3}, open_engine=fake_opener(log), progress=False)
    first = swaps(log)
    assert len(first) == 3
    run_search(recipe, queries, str(out), {"trials": 6}, open_engine=fake_opener(log), progress=False)
    second = swaps(log)[3:]
    assert len(second) == 3 and not [s for s in second if s in first]
    trials = complete(out)
    assert [t.number for t in trials] == list(range(6)) and all(t.state.name == "COMPLETE" for t in trials)
    assert [dict(t.params) for t in trials[:3]] == first
    # nothing left to do: no engine is opened, the report is rewritten
    def no_engine(recipe, kwargs):
        raise AssertionError("engine opened with nothing to do")
    summary = run_search(recipe, queries, str(out), {"trials": 6}, open_engine=no_engine, progress=False)
    assert summary["finished_trials"] == 6


def _spawn(recipe, queries, out, trials, log, delay, storage=None):
    args = [sys.executable, str(TESTS / "support" / "fake_engine.py"), recipe, queries, str(out), str(trials), log,
            str(delay)] + ([storage] if storage else [])
    path = os.pathsep.join([str(TESTS), str(TESTS.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env = dict(os.environ, PYTHONPATH=path, PYTHONWARNINGS="ignore")  # this checkout's code, not the venv's
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_workers_cooperate_and_kill_9_loses_at_most_the_trial_in_flight(tmp_path):
    """Two worker processes share one storage; one is killed with SIGKILL in the
    middle of a trial; the other finishes the study; a rerun with more trials runs
    only the new ones."""
    import optuna

    recipe = write_fake_recipe(tmp_path / "r.yml", extra={"heartbeat_interval": 1, "grace_period": 2})
    queries = write_queries(tmp_path / "q.jsonl", 2)
    storage = f"sqlite:///{tmp_path}/shared.db"
    logs = [str(tmp_path / "w0.jsonl"), str(tmp_path / "w1.jsonl")]
    procs = [_spawn(recipe, queries, tmp_path / f"out{i}", 10, logs[i], 0.3, storage) for i in range(2)]
    deadline = time.time() + 240
    while time.time() < deadline and len(swaps(logs[0])) < 3 and procs[0].poll() is None:
        time.sleep(0.05)
    assert procs[0].poll() is None, procs[0].stderr.read()[-3000:]
    # the third swap is logged inside its trial (the objective swaps, then generates for 0.3 s)
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait()
    assert procs[1].wait(timeout=300) == 0, procs[1].stderr.read()[-3000:]
    killed, survivor = swaps(logs[0]), swaps(logs[1])
    assert len(killed) >= 3 and survivor, "both workers ran trials"

    trials = optuna.load_study(study_name="search-dots", storage=storage).get_trials()
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert 10 <= len(done) <= 11  # each worker stops once 10 are finished (one may be in flight then)
    # the killed trial: failed by the heartbeat (the survivor waits for it before its
    # report), its point evaluated again by the survivor
    assert sorted(t.state.name for t in trials if t.state.name != "COMPLETE") == ["FAIL"]
    done_params = [dict(t.params) for t in done]
    assert all(p in done_params for p in killed) and all(p in done_params for p in survivor)
    assert len({tuple(sorted(p.items())) for p in done_params}) == len(done)

    log = str(tmp_path / "resume.jsonl")
    run_search(recipe, queries, str(tmp_path / "out"), {"trials": len(done) + 2, "storage": storage},
               open_engine=fake_opener(log), progress=False)
    after = optuna.load_study(study_name="search-dots", storage=storage).get_trials()
    assert sum(t.state.name == "COMPLETE" for t in after) == len(done) + 2
    assert len(swaps(log)) == 2 and not [p for p in swaps(log) if p in done_params]


def test_study_name_is_stored_as_given_and_report_only_rebuilds(tmp_path):
    """--study-name NAME is NAME in the storage; a study of the other objective under
    it is refused in one line; --report-only rewrites the report with no engine."""
    import optuna

    recipe = write_fake_recipe(tmp_path / "r.yml")
    queries = write_queries(tmp_path / "q.jsonl", 2)
    storage = f"sqlite:///{tmp_path}/shared.db"
    summary = run_search(recipe, queries, str(tmp_path / "w0"), {"trials": 3, "storage": storage,
                                                                 "study_name": "bar"},
                         open_engine=fake_opener(), progress=False)
    study = optuna.load_study(study_name="bar", storage=storage)
    assert summary["study_name"] == "bar" and len(study.trials) == 3
    assert {t.user_attrs["worker"].split(":")[1] for t in study.trials} == {str(os.getpid())}

    other = write_fake_recipe(tmp_path / "rr.yml", "reasoning_rate")
    with pytest.raises(UserError, match="study 'bar' in .* holds objective dots, not reasoning_rate"):
        run_search(other, queries, str(tmp_path / "w1"), {"storage": storage, "study_name": "bar"},
                   open_engine=fake_opener(names=("alpha",)), progress=False)

    def no_engine(recipe, kwargs):
        raise AssertionError("engine opened by --report-only")
    for name in ("trials.csv", "summary.json"):
        (tmp_path / "w0" / name).unlink()
    rebuilt = run_search(recipe, None, str(tmp_path / "w0"), {"storage": storage, "study_name": "bar"},
                         open_engine=no_engine, report_only=True)
    assert rebuilt["selected"] == summary["selected"] and rebuilt["finished_trials"] == 3
    with open(tmp_path / "w0" / "trials.csv") as f:
        assert [int(r["trial"]) for r in csv.DictReader(f)] == [0, 1, 2]
    with pytest.raises(UserError, match="--report-only: no study in"):
        run_search(recipe, None, str(tmp_path / "none"), report_only=True)
    with pytest.raises(UserError, match="no study 'baz' in sqlite:///"):
        run_search(recipe, None, str(tmp_path / "none"), {"storage": storage, "study_name": "baz"}, report_only=True)
    assert "baz" not in optuna.get_all_study_names(storage)


def test_pruning_keeps_the_selected_trial(tmp_path):
    recipe = write_fake_recipe(tmp_path / "r.yml", extra={"trials": 16, "sampler": "random", "chunks": 4})
    queries = write_queries(tmp_path / "q.jsonl", 8)
    plain = run_search(recipe, queries, str(tmp_path / "plain"), open_engine=fake_opener(), progress=False)
    pruned = run_search(recipe, queries, str(tmp_path / "pruned"), {"prune": True}, open_engine=fake_opener(),
                        progress=False)
    assert pruned["selected"] == plain["selected"]
    assert pruned["pareto_front"] == plain["pareto_front"]
    states = [t.state.name for t in complete(tmp_path / "pruned")]
    assert "PRUNED" in states  # the rule did stop some trials


@pytest.mark.parametrize("strategy, detect, expected, steps", [
    ("binary", "logit", 0.625, 4),  # 1.0 (rate 0), 0.5 (1), 0.75 (0.625), 0.625 (0.9375 in [0.9, 1): stop)
    ("grid", "prefix", 0.6, 11),  # 4 samples: 0.6 -> 1.0, 0.7 -> 3/4
])
def test_reasoning_rate_search(tmp_path, strategy, detect, expected, steps):
    recipe = write_fake_recipe(tmp_path / "r.yml", "reasoning_rate", {"strategy": strategy, "detect": detect})
    queries = write_queries(tmp_path / "q.jsonl", 3)
    out, log = tmp_path / "out", str(tmp_path / "swaps.jsonl")
    opener = fake_opener(log, names=("alpha",))
    summary = run_search(recipe, queries, str(out), open_engine=opener, progress=False)
    assert summary["selected"]["coefficients"] == {"alpha": expected}
    assert len(swaps(log)) == steps
    assert yaml.safe_load((out / "best.yml").read_text())["parameters"]["alpha"] == expected
    with open(out / "trials.csv") as f:
        assert list(csv.DictReader(f))[0].keys() >= {"alpha", "reasoning_rate"}
    # rerun: every point is read back from the study, nothing is measured again
    run_search(recipe, queries, str(out), open_engine=opener, progress=False)
    assert len(swaps(log)) == steps


def test_study_of_other_coefficients_is_refused(tmp_path):
    recipe = write_fake_recipe(tmp_path / "r.yml")
    queries = write_queries(tmp_path / "q.jsonl", 2)
    run_search(recipe, queries, str(tmp_path / "out"), {"trials": 1}, open_engine=fake_opener(), progress=False)
    with pytest.raises(UserError, match="searched coefficients"):
        run_search(recipe, queries, str(tmp_path / "out"), {"trials": 2, "coefficients": ["a"]},
                   open_engine=fake_opener(), progress=False)


@pytest.mark.parametrize("case, message", [
    ("queries", "missing.jsonl: no such query file"),
    ("setting", "search.sampler: 'cmaes' is not one of"),
    ("recipe", "recipe "),
])
def test_cli_bad_input_is_one_line(tmp_path, case, message):
    recipe = write_fake_recipe(tmp_path / "r.yml", extra={"sampler": "cmaes"} if case == "setting" else None)
    queries = str(tmp_path / "missing.jsonl") if case == "queries" else write_queries(tmp_path / "q.jsonl", 1)
    if case == "recipe":
        recipe = str(tmp_path / "nope.yml")
    out = tmp_path / "out"
    proc = subprocess.run([str(Path(sys.executable).parent / "mergekit-rlvr"), "search", recipe,
                           "--queries", queries, "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not out.exists()  # nothing written


def test_select_queries_refuses_single_coefficient_recipes(tmp_path):
    from mergekit_rlvr.search.runner import run_select_queries

    recipe = write_fake_recipe(tmp_path / "r.yml", "reasoning_rate")
    with pytest.raises(UserError, match="one coefficient per source model"):
        run_select_queries(recipe, write_queries(tmp_path / "q.jsonl", 2), str(tmp_path / "sel.jsonl"),
                           open_engine=fake_opener(names=("alpha",)))
    assert not (tmp_path / "sel.jsonl").exists()


def test_select_queries_scores_source_models_with_threshold_one_minus_one_over_m(tmp_path):
    from mergekit_rlvr.search.runner import run_select_queries

    recipe = write_fake_recipe(tmp_path / "r.yml", extra={})
    seen = []

    def opener(recipe, kwargs):
        seen.append(recipe)
        return FakeEngine()

    out = tmp_path / "sel.jsonl"
    result = run_select_queries(recipe, write_queries(tmp_path / "q.jsonl", 6), str(out), n=4, samples=4,
                                open_engine=opener)
    assert result["threshold"] == 0.75 and result["sources"] == "models"  # 1 - 1/m at m = 4
    assert seen[0]["parameters"] == {"density": 1.0, "rescale": "none"}
    run_select_queries(recipe, str(tmp_path / "q.jsonl"), str(out), n=4, samples=5, sources="sparsified",
                       open_engine=opener)
    assert "parameters" not in seen[1]  # the recipe as written
    assert run_select_queries(recipe, str(tmp_path / "q.jsonl"), str(out), n=4, threshold=0.3,
                              open_engine=opener)["threshold"] == 0.3


class _Degenerate(FakeEngine):
    """Infinite perplexity whenever a > 1 (a broken merge): the best consistency there."""

    def perplexity(self):
        return math.inf if self.coefficients["a"] > 1.0 else super().perplexity()


def test_knee_never_selects_a_trial_with_infinite_perplexity(tmp_path):
    recipe = write_fake_recipe(tmp_path / "r.yml", extra={"trials": 10, "sampler": "random", "select": "knee"})
    summary = run_search(recipe, write_queries(tmp_path / "q.jsonl", 2), str(tmp_path / "out"),
                         open_engine=lambda r, k: _Degenerate(), progress=False)
    with open(tmp_path / "out" / "trials.csv") as f:
        table = list(csv.DictReader(f))
    infinite = [r for r in table if not math.isfinite(float(r["perplexity"]))]
    assert 0 < len(infinite) < len(table) and summary["excluded_non_finite"] == len(infinite)
    assert math.isfinite(summary["selected"]["objectives"]["perplexity"])
    assert all(math.isfinite(p["objectives"]["perplexity"]) for p in summary["pareto_front"])
