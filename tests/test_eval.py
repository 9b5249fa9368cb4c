"""lm-evaluation-harness on a hot-swapped merge (mergekit_rlvr.eval): a local task
(JSONL + task YAML written here, no download) scored end to end by lm-eval at two
coefficient settings on one engine. Known answers: the targets are the engine's own
greedy outputs at the recipe's coefficients for half of the documents, so exact_match
there is 0.5, and at the other setting it is what ``HotSwapLLM.generate`` gives at those
coefficients; the loglikelihood path calls a greedy continuation greedy and a changed
one not."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import write_recipe

pytest.importorskip("lm_eval")
pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.usefixtures("in_process_engines")]

ENGINE = {"dtype": "float32", "max_model_len": 256, "kv_cache_memory_bytes": 64 << 20, "seed": 0,
          "enforce_eager": True}
QUESTIONS = ["hello world", "The answer is", "abc def", "1 + 1 =", "once upon", "zz top"]
OTHER = [0.1, 2.0]
GEN = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}


@pytest.fixture(scope="module")
def recipe(tiny_family, tmp_path_factory):
    return write_recipe(tmp_path_factory.mktemp("eval") / "dots.yml", {
        "merge_method": "dots", "base_model": tiny_family["base"], "dtype": "float32",
        "models": [{"model": tiny_family["sft"], "parameters": {"weight": 0.7}},
                   {"model": tiny_family["rl"], "parameters": {"weight": 1.6}}],
        "parameters": {"density": 0.3}, "search": {"engine": ENGINE}})


@pytest.fixture(scope="module")
def engine(recipe):
    from vllm_plugins.hotswap import HotSwapLLM

    llm = HotSwapLLM.from_recipe(str(recipe), **ENGINE)
    yield llm
    llm.close()


def greedy(engine, coefficients):
    from vllm import SamplingParams

    engine.set_coefficients(coefficients)
    params = SamplingParams(max_tokens=GEN["max_gen_toks"], temperature=0.0, stop=GEN["until"])
    return [o.outputs[0].text for o in engine.generate(QUESTIONS, params, use_tqdm=False)]


def write_task(directory, targets):
    data = directory / "toy.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": t}) + "\n" for q, t in zip(QUESTIONS, targets)))
    (directory / "toy_gen.yaml").write_text(yaml.safe_dump({
        "task": "toy_gen", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "question",
        "doc_to_target": "answer", "generation_kwargs": GEN,
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }))


def test_lm_eval_scores_settings_on_one_engine(engine, recipe, tmp_path, monkeypatch):
    from mergekit_rlvr.eval import run_eval, score_table

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    own = dict(engine.coefficients)
    at_recipe = greedy(engine, own)
    at_other = greedy(engine, OTHER)
    assert at_other != at_recipe  # the settings differ where it shows
    targets = at_recipe[:3] + ["#never#"] * 3
    write_task(tmp_path, targets)
    names = list(own)
    opened = []
    rows = run_eval(str(recipe), ["toy_gen"], [None, dict(zip(names, OTHER))], include_path=str(tmp_path),
                    open_engine=lambda r, k: opened.append(k) or engine)
    assert opened == [ENGINE]  # one engine, the recipe's search.engine settings
    assert [r["coefficients"] for r in rows] == [own, dict(zip(names, OTHER))]
    assert rows[0]["results"]["toy_gen"]["exact_match,none"] == 0.5
    expected = sum(a == t for a, t in zip(at_other, targets)) / len(targets)
    assert rows[1]["results"]["toy_gen"]["exact_match,none"] == expected
    table = score_table(rows)
    assert "toy_gen exact_match,none" in table and "sample_len" not in table


def test_loglikelihood_knows_greedy_continuations(engine):
    """Greedy continuations whose every step won by a clear margin (prefill and decode
    round differently, and a random tiny model has near-ties) are greedy; the same with
    the first character changed are not."""
    from lm_eval.api.instance import Instance
    from vllm import SamplingParams

    from mergekit_rlvr.eval import HotSwapLM

    engine.set_coefficients(OTHER)
    params = SamplingParams(max_tokens=GEN["max_gen_toks"], temperature=0.0, stop=GEN["until"], logprobs=2)
    pairs = []
    for q, out in zip(QUESTIONS, engine.generate(QUESTIONS, params, use_tqdm=False)):
        steps = [sorted((lp.logprob for lp in step.values()), reverse=True) for step in out.outputs[0].logprobs]
        if out.outputs[0].text and all(s[0] - s[1] > 1e-3 for s in steps[:len(out.outputs[0].token_ids)]):
            pairs.append((q, out.outputs[0].text))
    assert pairs
    changed = [(q, ("#" if o[0] != "#" else "%") + o[1:]) for q, o in pairs]
    lm = HotSwapLM(engine)
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs + changed)]
    results = lm.loglikelihood(requests, disable_tqdm=True)
    assert [g for _, g in results] == [True] * len(pairs) + [False] * len(changed)
    assert all(lp <= 0.0 for lp, _ in results)
