"""Recipes that name Hugging Face ids, offline: a Hugging Face cache directory in the
hub's own layout built from the tiny generated family (tests/support/hub.py), with
``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` set. Known answers: the hub-id engine's
readable weights equal ``mergekit-yaml`` of the same recipe written with local paths.
One HotSwapLLM engine for the module (search runs on it too). Serving a hub-id
recipe is checked on test_serve_replicas's server (one server start fewer).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from support.files import BIN, load_state, mergekit_yaml, write_recipe
from support.hub import BASE, RL, SFT_V1, commit_of, hub_env, write_hub_cache

ENGINE = {"dtype": "float32", "max_model_len": 256, "kv_cache_memory_bytes": 64 << 20, "seed": 0,
          "enforce_eager": True}
WEIGHTS = {SFT_V1: 0.7, RL: 1.6}


@pytest.fixture(scope="module")
def hub(tiny_family, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf-cache")
    snapshots = write_hub_cache(cache, tiny_family)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in hub_env(cache).items():
            mp.setenv(key, value)
        yield {"cache": cache, "snapshots": snapshots}


def dots_recipe(base, sft, rl, **extra):
    return {"merge_method": "dots", "base_model": base, "dtype": "float32",
            "models": [{"model": sft, "parameters": {"weight": WEIGHTS[SFT_V1]}},
                       {"model": rl, "parameters": {"weight": WEIGHTS[RL]}}],
            "parameters": {"density": 0.3}, **extra}


@pytest.fixture(scope="module")
def recipe(hub, tmp_path_factory):
    search = {"samples": 2, "max_tokens": 8, "temperature": 0.8, "engine": ENGINE}
    return write_recipe(tmp_path_factory.mktemp("hub-recipe") / "hub.yml",
                        dots_recipe(BASE, SFT_V1, RL, search=search))


# ------------------------------------------------------------------ no engine
def test_ids_resolve_to_cache_snapshots(hub, tiny_family, monkeypatch):
    from mergekit_rlvr.hub import resolve_model

    snaps = hub["snapshots"]
    assert resolve_model(BASE) == snaps[BASE]
    assert resolve_model("toy-org/tiny-sft") == snaps["toy-org/tiny-sft"]  # main
    assert resolve_model(SFT_V1) == snaps[SFT_V1]  # a branch
    assert resolve_model("toy-org/tiny-sft@" + commit_of("sft-v1")) == snaps[SFT_V1]  # a commit
    assert resolve_model(tiny_family["base"]) == tiny_family["base"]  # local directories as they are
    monkeypatch.chdir(Path(tiny_family["base"]).parent)
    assert resolve_model("base") == tiny_family["base"]


@pytest.mark.parametrize("model, message", [
    ("toy-org/missing", "model toy-org/missing: not in the Hugging Face cache"),
    ("toy-org/tiny-sft@v9", "model toy-org/tiny-sft@v9: not in the Hugging Face cache"),
    ("./no/such/dir", "model ./no/such/dir: no such local directory, and not a Hugging Face id"),
    ("a@b@c", "model a@b@c: not a model path or Hugging Face id"),
])
def test_unresolvable_models_fail_in_one_line(hub, model, message):
    from mergekit_rlvr.decompose import decompose
    from mergekit_rlvr.errors import UserError

    with pytest.raises(UserError) as error:
        decompose(dots_recipe(BASE, model, RL))
    assert str(error.value).startswith("recipe: " + message)
    assert "\n" not in str(error.value)


def test_decompose_keeps_names_as_written(hub, recipe):
    from mergekit_rlvr.decompose import decompose
    from mergekit_rlvr.cli.serve import MODELS_ENV, server_command

    d = decompose(str(recipe))
    assert d.coefficient_dict() == WEIGHTS
    assert d.base_path == hub["snapshots"][BASE]
    assert [d.resolved[m] for m in (SFT_V1, RL)] == [hub["snapshots"][SFT_V1], hub["snapshots"][RL]]
    argv, env = server_command(recipe, ["--port", "1"])
    assert argv[argv.index("--model") + 1] == hub["snapshots"][BASE]
    assert json.loads(env[MODELS_ENV]) == {m: hub["snapshots"][m] for m in (BASE, SFT_V1, RL)}


# ------------------------------------------------------------------ one engine
@pytest.fixture(scope="module")
def engine(hub, recipe, in_process_engines):
    from vllm_plugins.hotswap import HotSwapLLM

    llm = HotSwapLLM.from_recipe(str(recipe), **ENGINE)
    yield llm
    llm.close()


@pytest.mark.vllm
@pytest.mark.slow
def test_hotswap_on_hub_ids_equals_mergekit_yaml_on_paths(engine, hub, tiny_family, tmp_path):
    assert engine.llm.llm_engine.model_config.model == hub["snapshots"][BASE]
    assert engine.coefficients == WEIGHTS
    engine.set_coefficients({SFT_V1: 0.1, RL: 2.0})
    engine.set_coefficients(WEIGHTS)
    local = write_recipe(tmp_path / "local.yml", dots_recipe(tiny_family["base"], tiny_family["sft"],
                                                            tiny_family["rl"]))
    mergekit_yaml(local, tmp_path / "merged", exe=BIN / "mergekit-yaml")  # a fresh process: the hub environment
    merged = load_state(tmp_path / "merged")
    ours = engine.read_weights()[0]
    shared = [name for name in ours if name in merged]
    assert any("layernorm" in n for n in shared), (sorted(ours), sorted(merged))
    for name in shared:
        live = ours[name][: merged[name].shape[0]]  # vLLM pads the vocabulary rows
        assert torch.equal(live, merged[name]), name


@pytest.mark.vllm
@pytest.mark.slow
def test_search_on_hub_ids(engine, recipe, tmp_path):
    from mergekit_rlvr.search.runner import run_search

    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"prompt": q, "answer": "2"}) + "\n" for q in ("1+1?", "4-2?")))
    opened = []

    def open_engine(recipe_arg, kwargs):
        opened.append(recipe_arg)
        return engine

    summary = run_search(str(recipe), str(queries), str(tmp_path / "out"), {"trials": 2},
                         open_engine=open_engine, progress=False)
    assert opened == [str(recipe)]
    assert summary["complete_trials"] == 2
    assert list(summary["selected"]["coefficients"]) == [SFT_V1, RL]
    best = yaml.safe_load((tmp_path / "out" / "best.yml").read_text())
    assert best["base_model"] == BASE
    assert [m["model"] for m in best["models"]] == [SFT_V1, RL]
    assert [m["parameters"]["weight"] for m in best["models"]] == list(summary["selected"]["coefficients"].values())
