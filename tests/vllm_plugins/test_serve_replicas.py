"""`serve --data-parallel-size 2`: one API server, two vLLM engines (replicas). One
POST /v1/merge swaps both before any request runs on the new version; modes with one
API server per replica are refused in one line that says what to run instead. The
served recipe names Hugging Face ids (an offline cache: tests/support/hub.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from support.files import mergekit_yaml, write_recipe
from support.hub import BASE, RL, SFT_V1, hub_env, write_hub_cache
from support.server import AUTH, REQUEST_TIMEOUT, get_merge, post_merge, score, start_server

requests = pytest.importorskip("requests")

PROMPT = [5, 6, 7, 8, 9]
TOKENS = [20, 21, 22, 23, 24, 25, 26, 27]
CONCURRENT = 8  # teacher-forced requests sent at once, so the load balancer uses both replicas


@pytest.mark.parametrize("args", [["--api-server-count", "2"], ["-asc=3"], ["--data-parallel-external-lb"],
                                  ["--data-parallel-size", "2", "--data-parallel-size-local", "1"],
                                  ["--data-parallel-rank", "1"], ["--headless"]])
def test_modes_with_a_server_per_replica_are_refused_in_one_line(tmp_path, args):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("merge_method: dots\nbase_model: base\nmodels: [{model: a}]\n")
    proc = subprocess.run([str(Path(sys.executable).parent / "mergekit-rlvr"), "serve", str(recipe), *args],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: option "), proc.stderr
    assert "--data-parallel-size N" in lines[0] and "one mergekit-rlvr serve per node" in lines[0]


def reference_logprobs(model_dir: Path, prompt: list, tokens: list) -> list:
    """Teacher-forced logprobs of ``tokens`` after ``prompt`` under transformers, float32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [float(logprobs[len(prompt) - 1 + i, token]) for i, token in enumerate(tokens)]


def per_engine_requests(server, auth) -> dict:
    """Finished requests per data-parallel engine (vLLM's vllm:request_success counter)."""
    counts: dict = {}
    for line in requests.get(server.url + "/metrics", headers=auth, timeout=30).text.splitlines():
        if line.startswith("vllm:request_success_total{") and 'engine="' in line:
            engine = line.split('engine="', 1)[1].split('"', 1)[0]
            counts[engine] = counts.get(engine, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


@pytest.mark.vllm
@pytest.mark.slow
def test_data_parallel_replicas_swap_together(tiny_family, tmp_path):
    """Also serving hub ids: the server resolves them in the cache, reports the names
    as written and the base's snapshot, and its logprobs are those of mergekit-yaml's
    merge of the same recipe written with local paths."""
    snapshots = write_hub_cache(tmp_path / "hf-cache", tiny_family)
    recipe = {"merge_method": "dots", "base_model": BASE, "dtype": "float32",
              "models": [{"model": SFT_V1, "parameters": {"weight": 0.79}},
                         {"model": RL, "parameters": {"weight": 1.82}}],
              "parameters": {"density": 0.3}}
    served = write_recipe(tmp_path / "dots.yml", recipe)
    new = {SFT_V1: 1.5, RL: 0.5}
    local = {BASE: tiny_family["base"], SFT_V1: tiny_family["sft"], RL: tiny_family["rl"]}
    recipe["base_model"] = local[BASE]
    for model in recipe["models"]:
        model["parameters"]["weight"] = new[model["model"]]
        model["model"] = local[model["model"]]
    merged = tmp_path / "merged-new"
    mergekit_yaml(write_recipe(tmp_path / "dots-new.yml", recipe), merged)
    expected = reference_logprobs(merged, PROMPT, TOKENS)

    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0|1", **hub_env(tmp_path / "hf-cache"))
    server = start_server(served, tmp_path / "server.log", "--data-parallel-size", "2", env=env)
    try:
        assert get_merge(server).json()["coefficients"] == {SFT_V1: 0.79, RL: 1.82}  # the names as written
        models = requests.get(server.url + "/v1/models", headers=AUTH, timeout=REQUEST_TIMEOUT).json()["data"]
        assert models[0]["root"] == snapshots[BASE]

        def all_replicas_score() -> tuple[list, dict]:
            before = per_engine_requests(server, AUTH)
            with ThreadPoolExecutor(CONCURRENT) as pool:
                runs = list(pool.map(lambda _: score(server, PROMPT, TOKENS), range(CONCURRENT)))
            after = per_engine_requests(server, AUTH)
            return runs, {e: after[e] - before.get(e, 0.0) for e in after}

        old_runs, _ = all_replicas_score()
        # power: the old version's weights give other logprobs than the new one's
        assert max(abs(a - b) for a, b in zip(old_runs[0], expected)) > 1e-2
        response = post_merge(server, {"coefficients": new})
        assert response.status_code == 200, response.text
        assert response.json()["version"] == 1
        runs, served_by = all_replicas_score()
        assert sorted(served_by) == ["0", "1"] and min(served_by.values()) >= 1, served_by  # both replicas answered
        for run in runs:
            assert max(abs(a - b) for a, b in zip(run, expected)) < 1e-3, (run, expected)
    finally:
        server.stop()
    assert "loaded on 2 workers" in server.log.read_text(errors="replace")
