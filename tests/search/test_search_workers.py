"""Several `mergekit-rlvr search` workers on one shared study, each with its own real
vLLM CPU engine: a real PostgreSQL server (tests/support/pg_server.py) and Optuna's journal
file. One worker is SIGKILLed inside a trial and restarted; Optuna's heartbeat fails
its trial, a live worker evaluates that point again, and every worker's report
covers the whole study."""

from __future__ import annotations

import csv
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import recipes
from support.engines import TINY_ENGINE

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]  # the checkout
# eager: no torch.compile at start (about 20 s instead of 60 s here)
ENGINE = {**TINY_ENGINE, "max_model_len": 256, "enforce_eager": True}
TRIALS = 6
QUESTIONS = ["What is 1+1?", "Compute 2*3."]


@pytest.fixture(scope="module")
def recipe(tiny_family, recipe_file):
    return recipe_file(recipes.dots(tiny_family, (1.0, 1.0), parameters={"density": 0.3}, search={
        "samples": 2, "max_tokens": 8, "temperature": 0.8, "sampler": "random", "engine": ENGINE,
        "heartbeat_interval": 1, "grace_period": 2}))


def _worker(recipe, queries, out, storage):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONWARNINGS="ignore")
    argv = [str(Path(sys.executable).parent / "mergekit-rlvr"), "search", str(recipe), "--queries", queries,
            "--out", str(out), "--trials", str(TRIALS), "--storage", storage, "--study-name", "shared", "--quiet"]
    log = open(f"{out}.{time.monotonic_ns()}.log", "w")  # a file, not a pipe: vLLM's logging never blocks it
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    proc.log = log.name
    log.close()
    return proc


def _tail(proc) -> str:
    return open(proc.log).read()[-3000:]


@functools.lru_cache(maxsize=None)
def _storage(url):
    """One storage per URL for the polls: a new RDBStorage per poll would open a new
    connection pool each time and exhaust the server's connections."""
    from mergekit_rlvr.search.storage import open_storage

    return open_storage(url)


def _trials(url):
    """The study's trials as stored (None before a worker created it)."""
    import optuna

    try:
        return optuna.load_study(study_name="shared", storage=_storage(url)).get_trials()
    except KeyError:
        return None


def _wait_for(condition, procs, what, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        for proc in procs:
            assert proc.poll() is None, f"a worker exited while waiting for {what}:\n{_tail(proc)}"
        time.sleep(0.05)  # polls the storage for the condition, bounded by the deadline
    raise AssertionError(f"timed out waiting for {what}")


def _owned_by(pid):
    return lambda t: t.user_attrs.get("worker", "").endswith(f":{pid}")


@pytest.mark.parametrize("kind, restart", [("postgresql", "at once"), ("journal", "when the other is done")])
def test_two_workers_one_killed_inside_a_trial_and_restarted(kind, restart, recipe, tmp_path, request):
    """``restart``: at once (it joins the live worker, engine and all), or once the
    other worker has finished (it only rewrites its report: no engine start)."""
    url = request.getfixturevalue("postgresql_url") if kind == "postgresql" else f"journal://{tmp_path}/study.log"
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    outs = [tmp_path / "w0", tmp_path / "w1"]
    procs = [_worker(recipe, str(queries), out, url) for out in outs]
    try:
        # event-driven: worker 0 is inside a trial (it runs at least one: it asked for
        # trials before its engine started); worker 1 may be in a trial or waiting for it
        def victim_in_a_trial():
            return next((t for t in _trials(url) or [] if t.state.name == "RUNNING"
                         and _owned_by(procs[0].pid)(t)), None)
        killed = _wait_for(victim_in_a_trial, procs[:1], "worker 0 inside a trial")
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        if restart != "at once":
            assert procs[1].wait(timeout=300) == 0, _tail(procs[1])
        procs[0] = _worker(recipe, str(queries), outs[0], url)  # restarted, same output directory
        for proc in procs:
            assert proc.wait(timeout=300) == 0, _tail(proc)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    trials = _trials(url)
    by_state = {}
    for t in trials:
        by_state.setdefault(t.state.name, []).append(t)
    done = by_state.get("COMPLETE", [])
    assert TRIALS <= len(done) <= TRIALS + 1  # +1: both workers may start a last trial together
    assert "RUNNING" not in by_state
    assert [t.number for t in by_state["FAIL"]] == [killed.number]  # the heartbeat failed the killed one
    retried = [t for t in done if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retried) == 1 and retried[0].params == killed.params  # its point, evaluated again
    assert not retried[0].user_attrs["worker"].endswith(f":{killed.user_attrs['worker'].split(':')[1]}")
    points = [tuple(sorted(t.params.items())) for t in done]
    assert len(set(points)) == len(done)  # no point twice (the killed one is FAIL, not COMPLETE)

    for i, out in enumerate(outs):  # every worker's report covers the whole study
        summary = json.loads((out / "summary.json").read_text())
        if i == 0 and restart != "at once":  # a full study with nothing running: no engine started
            assert summary["timings"]["engine_start_s"] is None
        assert summary["study_name"] == "shared" and summary["finished_trials"] == len(done)
        with open(out / "trials.csv") as f:
            assert sorted(int(r["trial"]) for r in csv.DictReader(f)) == sorted(t.number for t in done)
        assert (out / "best.yml").exists() and (out / "pareto.png").exists()
