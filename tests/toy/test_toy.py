"""The toy family generator: tasks, GRPO advantages, a few training steps of every
stage, determinism, cache reuse, and loadability in mergekit and vLLM CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import BIN, load_state, mergekit_yaml, write_recipe
from mergekit_rlvr.toy import tasks
from mergekit_rlvr.toy.family import FamilySettings, build_family, dots_recipe
from mergekit_rlvr.toy.grpo import group_advantages

QUICK = dict(pretrain_steps=4, pretrain_batch=8, sft_steps=3, sft_batch=8, rl_steps=2, rl_prompts=2,
             rl_group=4, eval_size=12, pool_size=10, threads=1)


# ------------------------------------------------------------------ tasks

def test_lexicon_is_a_derangement_and_seeded():
    table = tasks.lexicon(0)
    assert sorted(table) == sorted(table.values()) == list(tasks.LETTERS)
    assert all(k != v for k, v in table.items())
    assert tasks.lexicon(0) == table and tasks.lexicon(1) != table


def test_worked_sum_known_answers():
    assert tasks.worked_sum(47, 38) == "7+8=15,4+3+1=8,\\boxed{85}"
    assert tasks.worked_sum(47, 38, careless=True) == "7+8=15,4+3=7,\\boxed{75}"
    assert tasks.worked_sum(96, 19) == "6+9=15,9+1+1=11,\\boxed{115}"
    assert tasks.worked_sum(12, 34, careless=True) == "2+4=6,1+3=4,\\boxed{46}"
    for a in range(10, 100, 7):
        for b in range(10, 100, 3):
            assert tasks.extract_boxed(tasks.worked_sum(a, b)) == str(a + b)


def test_extract_and_score():
    assert tasks.extract_boxed("x \\boxed{1} y \\boxed{ 42 }") == "42"
    assert tasks.extract_boxed("no box") is None
    assert tasks.is_correct("\\boxed{85}", "85") and not tasks.is_correct("\\boxed{75}", "85")


def test_eval_sets_pool_and_training_are_disjoint():
    sets = tasks.eval_sets(100, seed=0)
    pool = tasks.query_pool(60, seed=0)
    assert len(sets["K"]) == len(sets["R"]) == 100 and len(pool) == 60
    assert {e.task for e in pool} == {"K", "R"}
    eval_prompts = {e.prompt for s in sets.values() for e in s}
    assert not eval_prompts & {e.prompt for e in pool}
    streams = tasks.TrainStreams(0)
    train_r = {tasks.r_prompt(a, b) for a, b in streams.all_pairs}
    assert not train_r & eval_prompts
    import random

    rng = random.Random(0)
    train_k = {streams.sft_example(rng).prompt for _ in range(2000)}
    assert not train_k & eval_prompts
    for e in sets["R"]:
        a, b = map(int, e.prompt[2:].split("=")[0].split("+"))
        assert tasks.carries(a, b) and e.answer == str(a + b)
    table = tasks.lexicon(0)
    assert all(e.answer == tasks.translate(e.prompt[7:11], table) for e in sets["K"])


def test_group_advantages_known_answer():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, 4)
    # group 1: mean 0.25, std sqrt(3)/4 -> (0.75, -0.25) / 0.4330
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (3 ** 0.5 / 4 + 1e-4)
    assert torch.allclose(adv[:4], expected, atol=1e-6)
    assert torch.all(adv[4:] == 0)


# ------------------------------------------------------------------ family

@pytest.fixture(scope="module")
def family(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "fam"
    return build_family(str(out), FamilySettings(**QUICK), show_progress=False)


def test_family_layout_and_shapes(family):
    from transformers import AutoConfig, AutoTokenizer

    from mergekit_rlvr.toy.lm import Codec

    codec = Codec()

    assert family.trained == ["base", "sft", "rl"]
    states = {k: load_state(p) for k, p in family.paths.items()}
    for name, path in family.paths.items():
        config = AutoConfig.from_pretrained(path)
        assert config.model_type == "qwen2"
        assert config.hidden_size // config.num_attention_heads == 64
        tok = AutoTokenizer.from_pretrained(path)  # what vLLM loads: Qwen2's byte-level class
        for e in family.eval_sets["K"][:3] + family.eval_sets["R"][:3]:
            text = e.prompt + e.completion
            assert tok(text)["input_ids"] == codec.encode(text)
            assert tok.decode(codec.encode(text)) == text
        assert {k: v.shape for k, v in states[name].items()} == {k: v.shape for k, v in states["base"].items()}
        assert all(v.dtype == torch.float32 for v in states[name].values())
    # sft changed the weights (after 4 pretraining steps every sampled answer of
    # rl earns reward 0, so its advantages are 0 and rl may equal base here)
    assert any(not torch.equal(states["sft"][k], states["base"][k]) for k in states["base"])
    data = Path(family.out) / "data"
    assert len((data / "eval_K.jsonl").read_text().splitlines()) == 12
    assert len((data / "pool.jsonl").read_text().splitlines()) == 10
    upd = family.info["updates"]
    assert upd["sft"]["l2"] > 0 and upd["rl"]["l2"] >= 0


def test_same_seed_same_weights(family, tmp_path):
    again = build_family(str(tmp_path / "again"), FamilySettings(**QUICK), show_progress=False)
    for name in ("base", "sft", "rl"):
        a, b = load_state(family.paths[name]), load_state(again.paths[name])
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_second_call_reuses_and_settings_change_retrains_only_that_stage(family):
    files = {s: os.path.join(p, "model.safetensors") for s, p in family.paths.items()}
    before = {s: os.stat(f).st_mtime_ns for s, f in files.items()}
    again = build_family(family.out, FamilySettings(**QUICK), show_progress=False)
    assert again.trained == []
    assert {s: os.stat(f).st_mtime_ns for s, f in files.items()} == before
    changed = build_family(family.out, FamilySettings(**dict(QUICK, rl_lr=0.01)), show_progress=False)
    assert changed.trained == ["rl"]
    assert os.stat(files["base"]).st_mtime_ns == before["base"]
    assert os.stat(files["sft"]).st_mtime_ns == before["sft"]
    # restore the module's family for the tests that follow
    assert build_family(family.out, FamilySettings(**QUICK), show_progress=False).trained == ["rl"]


@pytest.mark.slow
def test_dots_merge_of_the_family_with_mergekit_yaml(family, tmp_path):
    recipe = write_recipe(tmp_path / "dots.yml", dots_recipe(family.paths, 0.8, 1.5))
    out = tmp_path / "merged"
    mergekit_yaml(recipe, out)
    merged, base = load_state(out), load_state(family.paths["base"])
    assert set(merged) == set(base)
    assert all(merged[k].shape == base[k].shape for k in base)
    assert any(not torch.equal(merged[k], base[k]) for k in base)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.usefixtures("in_process_engines")
def test_evaluate_with_vllm_matches_hf_greedy(family):
    from mergekit_rlvr.toy.evaluate import evaluate, generate_hf, generate_vllm, vllm_kwargs
    from vllm import LLM

    prompts = [e.prompt for s in family.eval_sets.values() for e in s]
    from vllm_plugins.hotswap import shutdown

    llm = LLM(model=family.paths["sft"], **vllm_kwargs(family.paths["sft"]))
    try:
        texts = generate_vllm(llm, prompts)
        acc = evaluate(llm, family.eval_sets)
    finally:
        shutdown(llm)
    ref = generate_hf(family.paths["sft"], prompts)
    agree = sum(a == b for a, b in zip(texts, ref)) / len(prompts)
    assert agree >= 0.9, (agree, texts[:3], ref[:3])
    assert set(acc) == {"K", "R", "union"} and all(0.0 <= v <= 1.0 for v in acc.values())
    assert acc == evaluate(family.paths["sft"], family.eval_sets, backend="hf") or agree < 1.0


@pytest.mark.slow
def test_cli_reuses_the_family(family):
    args = [str(BIN / "mergekit-rlvr"), "toy-family", family.out, "--quiet"]
    for key, value in QUICK.items():
        args += ["--set", f"{key}={value}"]
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "base: cached" in proc.stderr and "rl: cached" in proc.stderr
    bad = subprocess.run([str(BIN / "mergekit-rlvr"), "toy-family", family.out, "--set", "nope=1"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "nope=1" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
