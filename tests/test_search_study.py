"""The search loop on a real Optuna study (sqlite) with the scripted engine of
test_search_support: reports, resume without repeating trials, kill -9, several
processes on one storage, pruning, the reasoning-rate strategies. The same loop on
the real vLLM engine is in test_search_vllm.py."""

from __future__ import annotations

import csv
import json
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
from test_search_support import FakeEngine, fake_opener, write_fake_recipe, write_queries

HERE = Path(__file__).parent


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

    best = yaml.safe_load((out / "best.yml").read_text())
    assert [m["parameters"]["weight"] for m in best["models"]] == [expected["a"], expected["b"]]
    assert best["merge_method"] == "dots" and best["base_model"] == "base"


def test_consistency_counts_equivalent_spellings(tmp_path):
    """The fake answers 1/2 as '1/2', '\\frac{1}{2}' and '0.5' in turn: all one vote."""
    engine = FakeEngine()
    engine.set_coefficients({"a": 1.5, "b": 0.5})  # consistency 1
    from mergekit_rlvr.search.objectives import measure_dots
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
    args = [sys.executable, str(HERE / "test_search_support.py"), recipe, queries, str(out), str(trials), log,
            str(delay)] + ([storage] if storage else [])
    env = dict(os.environ, PYTHONPATH=str(HERE), PYTHONWARNINGS="ignore")
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_kill_9_loses_at_most_the_trial_in_flight(tmp_path):
    recipe = write_fake_recipe(tmp_path / "r.yml")
    queries = write_queries(tmp_path / "q.jsonl", 2)
    out, log = tmp_path / "out", str(tmp_path / "swaps.jsonl")
    proc = _spawn(recipe, queries, out, 50, log, delay=0.4)
    deadline = time.time() + 120
    while time.time() < deadline and len(swaps(log)) < 4:
        time.sleep(0.1)
    time.sleep(0.3)  # now inside a trial
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(swaps(log)) >= 4, proc.stderr.read()[-2000:]
    before = complete(out)
    done_before = [dict(t.params) for t in before if t.state.name == "COMPLETE"]
    assert len(before) - len(done_before) <= 1  # at most the one in flight is lost
    assert len(done_before) >= 3

    evaluated_before = len(swaps(log))
    run_search(recipe, queries, str(out), {"trials": len(done_before) + 2}, open_engine=fake_opener(log),
               progress=False)
    after = complete(out)
    assert sum(t.state.name == "COMPLETE" for t in after) == len(done_before) + 2
    assert len(swaps(log)) - evaluated_before == 2  # finished trials were not run again
    assert [dict(t.params) for t in after if t.state.name == "COMPLETE"][:len(done_before)] == done_before


def test_two_processes_cooperate_on_one_storage(tmp_path):
    recipe = write_fake_recipe(tmp_path / "r.yml")
    queries = write_queries(tmp_path / "q.jsonl", 2)
    storage = f"sqlite:///{tmp_path}/shared.db"
    logs = [str(tmp_path / "w0.jsonl"), str(tmp_path / "w1.jsonl")]
    procs = [_spawn(recipe, queries, tmp_path / f"out{i}", 8, logs[i], 0.2, storage) for i in range(2)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    per_worker = [swaps(log) for log in logs]
    assert all(per_worker), "both workers ran trials"
    import optuna

    trials = optuna.load_study(study_name="search-dots", storage=storage).get_trials()
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert 8 <= len(done) <= 9  # each worker stops once 8 are finished (one may be in flight then)
    assert len(done) == sum(len(w) for w in per_worker)
    assert len({tuple(sorted(t.params.items())) for t in done}) == len(done)


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
