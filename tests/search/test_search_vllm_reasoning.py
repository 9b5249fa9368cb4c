"""The reasoning-rate search (paper 003) end to end on a real vLLM CPU engine
(HotSwapLLM on a reasoning_interp recipe of the tiny family), one engine for the
module; logit detection checked against a transformers forward."""

from __future__ import annotations

import csv

import pytest
import yaml

from support import recipes
from support.engines import TINY_ENGINE
from support.files import write_jsonl

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.usefixtures("in_process_engines")]

ENGINE = {**TINY_ENGINE, "enforce_eager": True}  # no torch.compile at start (tens of seconds on 2 cores)
QUESTIONS = ["What is 1+1?", "Compute 2*3.", "What is 10-4?"]


@pytest.fixture(scope="module")
def recipe(tiny_family, recipe_file):
    # the base stands for the reasoning model M
    return recipe_file(recipes.reasoning_interp(tiny_family, 0.5, search={
        "prefix_tokens": 4, "samples": 2, "max_tokens": 8, "engine": ENGINE}))


@pytest.fixture
def queries(tmp_path):
    return write_jsonl(tmp_path / "q.jsonl", [{"prompt": q} for q in QUESTIONS])


def run(recipe, queries, out, engine, **overrides):
    from mergekit_rlvr.search.runner import run_search

    return run_search(str(recipe), queries, str(out), overrides, open_engine=lambda r, k: engine, progress=False)


def test_binary_prefix_search_end_to_end(engine, recipe, queries, tmp_path):
    summary = run(recipe, queries, tmp_path / "out", engine)
    assert summary["objective"] == "reasoning_rate" and summary["searched"] == ["alpha"]
    with open(tmp_path / "out" / "trials.csv") as f:
        table = list(csv.DictReader(f))
    assert 1 <= len(table) <= 8 and {"alpha", "reasoning_rate"} <= set(table[0])
    rates = {float(r["alpha"]): float(r["reasoning_rate"]) for r in table}
    passing = [a for a, r in rates.items() if r >= 0.9]
    chosen = summary["selected"]["coefficients"]["alpha"]
    assert chosen == (max(passing) if passing else 0.0)
    assert yaml.safe_load((tmp_path / "out" / "best.yml").read_text())["parameters"]["alpha"] == chosen
    assert (tmp_path / "out" / "objectives.png").read_bytes()[:4] == b"\x89PNG"


def test_grid_full_detection(engine, recipe, queries, tmp_path):
    summary = run(recipe, queries, tmp_path / "out", engine, strategy="grid", grid=2, detect="full")
    assert [a for a, _ in summary["evaluated"]] == [0.0, 0.5, 1.0]


def test_logit_rate_matches_a_reference_forward(engine, recipe, tiny_family):
    """detect: logit with a one-character end marker (so that closing is likely enough
    to measure): rate = mean of 1 - P(marker | prompt), as a transformers forward says."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_rlvr.search.queries import Query
    from mergekit_rlvr.search.reasoning import measure_logit, reasoning_prompts
    from mergekit_rlvr.search.settings import load_settings

    settings = load_settings({"detect": "logit", "think_end": "e"}, merge_method="reasoning_interp")
    engine.set_coefficients({"alpha": 0.0})  # the reasoning model itself: the base checkpoint
    prompts = reasoning_prompts(engine.get_tokenizer(), [Query(q) for q in QUESTIONS], settings)
    measured = measure_logit(engine, prompts, settings)

    tokenizer = AutoTokenizer.from_pretrained(tiny_family["base"])
    model = AutoModelForCausalLM.from_pretrained(tiny_family["base"], dtype=torch.float32)
    end = tokenizer.encode("e", add_special_tokens=False)[0]
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt).input_ids])
            p = torch.softmax(model(ids).logits[0, -1], -1)[end].item()
            expected.append(1.0 - p)
    assert measured.per_query == pytest.approx(expected, abs=1e-4)
    assert min(1 - v for v in expected) > 1e-4  # the marker's probability is really measured
