"""The DoTS search and select-queries end to end on a real vLLM CPU engine
(HotSwapLLM) with the tiny generated family: one engine for the module, few
trials, queries and tokens. Reasoning rate: test_search_vllm_reasoning.py."""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml

from support import recipes
from support.engines import TINY_ENGINE, opener
from support.files import load_state, mergekit_yaml, write_jsonl, write_recipe

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.usefixtures("in_process_engines")]

ENGINE = {**TINY_ENGINE, "enforce_eager": True}  # no torch.compile at start (tens of seconds on 2 cores)
SEARCH = {"samples": 3, "max_tokens": 12, "temperature": 0.8, "engine": ENGINE}
QUESTIONS = ["What is 1+1?", "Compute 2*3.", "What is 10-4?", "Half of 1?", "What is 7*8?", "Sum of 3 and 4?"]


@pytest.fixture(scope="module")
def recipe(tiny_family, recipe_file):
    return recipe_file(recipes.dots(tiny_family, (1.0, 1.0), (None, 0.3), parameters={"density": 0.3},
                                    search=SEARCH))


@pytest.fixture
def queries(tmp_path):
    return write_jsonl(tmp_path / "q.jsonl", [{"prompt": q, "answer": "0"} for q in QUESTIONS[:4]])


def test_dots_search_end_to_end_and_resume(engine, recipe, queries, tmp_path):
    from mergekit_rlvr.search.runner import run_search

    out, calls = tmp_path / "out", []
    summary = run_search(str(recipe), queries, str(out), {"trials": 3}, open_engine=opener(engine, calls),
                         progress=False)
    assert calls == [ENGINE]  # the recipe's search.engine, one engine for the whole search
    names = list(engine.coefficients)
    with open(out / "trials.csv") as f:
        first = list(csv.DictReader(f))
    assert len(first) == 3 and list(first[0])[2:4] == names
    for row in first:
        assert 0.0 <= float(row["consistency"]) <= 1.0 and math.isfinite(float(row["perplexity"]))
        assert all(0.0 <= float(row[n]) <= 2.0 for n in names)
    assert summary["selected"]["trial"] in {p["trial"] for p in summary["pareto_front"]}

    # resume with more trials: the finished three stay, two more run
    summary = run_search(str(recipe), queries, str(out), {"trials": 5}, open_engine=opener(engine, calls),
                         progress=False)
    with open(out / "trials.csv") as f:
        second = list(csv.DictReader(f))
    assert len(second) == 5 and second[:3] == first  # same trials, same values, same timings
    assert summary["timings"]["trials_this_run"] == 2

    # best.yml: plain mergekit-yaml materializes exactly the selected coefficients
    best = yaml.safe_load((out / "best.yml").read_text())
    chosen = summary["selected"]["coefficients"]
    assert [m["parameters"]["weight"] for m in best["models"]] == [chosen[n] for n in names]
    merged = tmp_path / "merged"
    mergekit_yaml(out / "best.yml", merged)
    state = load_state(merged)
    assert state and all(torch_finite(v) for v in state.values())
    for name in ("pareto.png", "objectives.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def torch_finite(tensor) -> bool:
    import torch

    return bool(torch.isfinite(tensor).all())


def test_prompt_perplexity_matches_a_reference_forward(engine, tiny_family):
    """Perplexity from the engine's prompt logprobs = exp(mean of per-prompt mean NLL)
    computed with transformers on the base model (coefficients 0)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_rlvr.search.dots import perplexity_of_prompts

    engine.set_coefficients([0.0] * len(engine.coefficients))
    prompts = QUESTIONS[:3]
    value, _ = perplexity_of_prompts(engine, prompts)
    tokenizer = AutoTokenizer.from_pretrained(tiny_family["base"])
    model = AutoModelForCausalLM.from_pretrained(tiny_family["base"], dtype=torch.float32)
    nlls = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt).input_ids])
            logits = model(ids).logits[0, :-1]
            nlls.append(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item())
    assert value == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-3)


def test_response_perplexity_and_knee(engine, recipe, queries, tmp_path):
    from mergekit_rlvr.search.runner import run_search

    summary = run_search(str(recipe), queries, str(tmp_path / "out"),
                         {"trials": 2, "perplexity": "response", "select": "knee", "sampler": "nsga2"},
                         open_engine=opener(engine, []), progress=False)
    assert summary["settings"]["perplexity"] == "response" and summary["selected"]["rule"] == "knee"
    assert all(math.isfinite(p["objectives"]["perplexity"]) for p in summary["pareto_front"])


def test_select_queries_end_to_end(engine, recipe, tmp_path):
    from mergekit_rlvr.search.runner import run_select_queries

    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"prompt": q, "id": i}) + "\n" for i, q in enumerate(QUESTIONS)))
    out = tmp_path / "selected.jsonl"
    result = run_select_queries(str(recipe), str(pool), str(out), n=4, samples=3, threshold=1.0, seed=1,
                                overrides={"max_tokens": 12}, open_engine=opener(engine, []))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert result["selected"] == len(rows) == 4
    names = list(engine.coefficients)
    for row in rows:
        assert set(row["consistency"]) == set(names)
        expected = 1.0 - sum(row["consistency"].values()) / len(names)
        assert row["difficulty"] == pytest.approx(expected) and row["split"] in ("low", "medium")
        assert QUESTIONS[row["id"]] == row["prompt"]


def test_grouped_search_writes_filters_that_mergekit_materializes(engine, recipe, queries, tmp_path):
    """search.groups: one search dimension per (model, group); best.yml carries them as
    mergekit filter lists and mergekit-yaml writes exactly the searched merge."""
    import torch

    from mergekit_rlvr.decompose import decompose, load_recipe
    from mergekit_rlvr.search.runner import run_search

    grouped = load_recipe(str(recipe))
    grouped["search"]["groups"] = ["attention", "mlp"]
    path = write_recipe(tmp_path / "grouped.yml", grouped)
    engine.load_recipe(str(path))
    try:
        summary = run_search(str(path), queries, str(tmp_path / "out"), {"trials": 2},
                             open_engine=opener(engine, []), progress=False)
    finally:
        engine.load_recipe(str(recipe))
    d = decompose(str(path))
    names = d.coefficient_names
    assert len(names) == 6 and summary["searched"] == names and names[1].endswith("@mlp")
    chosen = summary["selected"]["coefficients"]
    assert list(chosen) == names and len(set(chosen.values())) == 6
    best = yaml.safe_load((tmp_path / "out" / "best.yml").read_text())
    weight = best["models"][0]["parameters"]["weight"]
    assert [c.get("filter") for c in weight] == ["attn", "self_attention", "mlp", "feed_forward", None]
    mergekit_yaml(tmp_path / "out" / "best.yml", tmp_path / "merged")
    state = load_state(tmp_path / "merged")
    for task in d.tasks:
        assert torch.equal(d.merged(task, chosen), state[task.name]), task.name
