"""HotSwapLLM on a real vLLM CPU engine with tiny generated checkpoints.

One hot-swap engine for the module (it switches recipes with ``load_recipe``); a
fresh engine per method on the ``mergekit-yaml`` output is the reference. Checked:
generated text and prompt logprobs equal, and every parameter that can be read
back (the ones vLLM does not repack) bit-identical; both update paths agree; no
drift after 100 random swaps; invalid input changes nothing.
"""

from __future__ import annotations

import gc
import os
import random
from pathlib import Path

import pytest
import torch
import yaml

from support import recipes
from support.files import mergekit_yaml, write_recipe

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ENGINE = dict(
    dtype="float32",
    kv_cache_memory_bytes=64 * 2**20,
    max_model_len=128,
    max_num_seqs=8,
    enforce_eager=True,
    enable_prefix_caching=True,
    seed=0,
)
PROMPTS = ["hello world, this is", "The answer is 42 because", "abc"]


def sampling():
    from vllm import SamplingParams

    return SamplingParams(max_tokens=6, temperature=0.0, prompt_logprobs=2, logprobs=2)


def grouped_dots(family):
    """One coefficient per module group, written as search's best.yml writes them."""
    recipe = recipes.dots(family, densities=(0.3, 0.3), search={"groups": ["attention", "mlp", "norms"]})
    for entry, (a, m, n, rest) in zip(recipe["models"], GROUP_VALUES.values()):
        entry["parameters"]["weight"] = [{"filter": "attn", "value": a}, {"filter": "mlp", "value": m},
                                         {"filter": "norm", "value": n}, {"value": rest}]
    return recipe


GROUP_VALUES = {"sft": (0.4, 1.7, 0.9, 1.2), "rl": (1.5, 0.2, 1.1, 0.6)}


#: coefficients the engine is set to before swapping to the recipe's own
DETOUR = {"dots": [0.1, 2.0], "sar": [0.3], "reasoning_interp": [0.1], "task_arithmetic": [1.7, -0.2]}


@pytest.fixture(scope="module")
def setup(tiny_family, materialized, tmp_path_factory):
    """The session's mergekit-yaml outputs (conftest ``materialized``), the grouped
    recipe's, and task_arithmetic's as combine computes it."""
    root = tmp_path_factory.mktemp("hotswap")
    out = dict(materialized)
    out["dots_groups"] = (write_recipe(root / "dots_groups.yml", grouped_dots(tiny_family)), root / "merged-groups")
    mergekit_yaml(*out["dots_groups"])
    # mergekit's own task_arithmetic kernel sums in another order: combine's output
    out["task_arithmetic"] = (materialized["task_arithmetic"][0], root / "merged-task_arithmetic")
    write_combined(*out["task_arithmetic"])
    return out


@pytest.fixture(scope="module")
def engine(setup):
    from vllm_plugins import HotSwapLLM

    llm = HotSwapLLM.from_recipe(str(setup["dots"][0]), **ENGINE)
    yield llm
    del llm
    gc.collect()


def write_combined(recipe, out):
    """The checkpoint the decomposition's combine gives (what the swap promises for
    task_arithmetic, whose mergekit kernel rounds differently; see test_decompose)."""
    import shutil

    from safetensors.torch import save_file

    from mergekit_rlvr.decompose import decompose

    d = decompose(str(recipe))
    out.mkdir()
    save_file({task.name: d.merged(task).contiguous() for task in d.tasks}, str(out / "model.safetensors"))
    for name in os.listdir(d.base_path):
        if not name.endswith(".safetensors") and os.path.isfile(os.path.join(d.base_path, name)):
            shutil.copy(os.path.join(d.base_path, name), out / name)


@pytest.fixture(scope="module")
def fresh_results():
    return {}


@pytest.fixture(scope="module")
def reference():
    """A plain vLLM engine (no hot swap) that loads each mergekit-yaml output through
    vLLM's own loaders: started on the first directory, then ``reload_weights`` from
    each next one (vLLM's loaders and process_weights_after_loading again; one engine
    start for the module instead of one per output)."""
    from vllm_plugins.hotswap import shutdown

    engines = []
    yield engines
    for llm in engines:
        shutdown(llm)


def run(llm):
    """(texts, prompt logprobs, sampled logprobs) as plain lists."""
    outs = llm.generate(PROMPTS, sampling(), use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    prompt = [[{k: v.logprob for k, v in step.items()} if step else None for step in o.prompt_logprobs]
              for o in outs]
    sampled = [[{k: v.logprob for k, v in step.items()} for step in o.outputs[0].logprobs] for o in outs]
    return texts, prompt, sampled


def fresh(path, reference):
    """Outputs and readable weights of vLLM's own load of a checkpoint directory."""
    from vllm import LLM

    from vllm_plugins import WORKER_EXTENSION
    from vllm_plugins.worker import decode_tensor

    if not reference:
        reference.append(LLM(model=str(path), worker_extension_cls=WORKER_EXTENSION, **ENGINE))
    else:
        reference[0].collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
        reference[0].reset_prefix_cache()
    llm = reference[0]
    result = run(llm)
    weights = {k: decode_tensor(v) for k, v in llm.collective_rpc("hotswap_read", args=(None,))[0].items()}
    return result, weights


def assert_same_weights(ours, theirs):
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype, name
        assert torch.equal(ours[name].view(torch.int32), theirs[name].view(torch.int32)), name


@pytest.mark.parametrize("paths", ["auto", "reload"])
@pytest.mark.parametrize("method", ["dots", "sar", "reasoning_interp", "task_arithmetic"])
def test_swap_equals_fresh_engine_on_materialized_merge(engine, setup, fresh_results, reference, method, paths):
    """In place (norms on the CPU backend) and through reload (everything)."""
    recipe, merged = setup[method]
    engine.load_recipe(str(recipe), coefficients=DETOUR[method], paths=paths)
    assert bool(engine.state()[0]["inplace"]) == (paths == "auto")
    run(engine)  # fills the prefix cache with the detour's weights
    target = yaml.safe_load(recipe.read_text())
    values = list(engine.coefficients.values())
    engine.set_coefficients({name: _recipe_value(target, method, name) for name in engine.coefficients})
    assert list(engine.coefficients.values()) != values
    ours = run(engine)
    weights = engine.read_weights()[0]
    if method not in fresh_results:  # one fresh engine per method
        fresh_results[method] = fresh(merged, reference)
    theirs, fresh_weights = fresh_results[method]
    assert ours[0] == theirs[0]
    assert ours[1] == theirs[1]  # prompt logprobs, exactly
    assert ours[2] == theirs[2]
    assert_same_weights(weights, fresh_weights)


def _recipe_value(recipe, method, name):
    if method == "task_arithmetic":
        return next(m["parameters"]["weight"] for m in recipe["models"] if m["model"] == name)
    if method in ("sar", "reasoning_interp"):
        return recipe["parameters"][name]
    return next(m["parameters"]["weight"] for m in recipe["models"] if m["model"] == name)


def test_grouped_swap_equals_fresh_engine_on_materialized_merge(engine, setup, tiny_family, reference):
    """search.groups: the recipe's filter values are read back as name@group
    coefficients; set from a detour they give mergekit-yaml's output exactly."""
    recipe, merged = setup["dots_groups"]
    engine.load_recipe(str(recipe), coefficients=[0.1, 2.0] * 4)
    run(engine)
    target = {}
    for name, values in GROUP_VALUES.items():
        for group, value in zip(("@attention", "@mlp", "@norms", ""), values):
            target[tiny_family[name] + group] = value
    assert list(engine.coefficients) == list(target)
    engine.set_coefficients(target)
    ours = run(engine)
    weights = engine.read_weights()[0]
    theirs, fresh_weights = fresh(merged, reference)
    assert ours == theirs
    assert_same_weights(weights, fresh_weights)


def test_both_paths_give_the_same_weights(engine, setup):
    recipe = str(setup["dots"][0])
    engine.load_recipe(recipe, paths="reload")
    state = engine.state()[0]
    assert state["inplace"] == []
    via_reload = engine.read_weights()[0]
    outputs_reload = run(engine)
    engine.load_recipe(recipe)
    state = engine.state()[0]
    # on the CPU backend the norms are updated in place, linear layers through reload
    assert state["inplace"] and all("norm" in name for name in state["inplace"])
    # one read of each checkpoint: the base check of the in-place parameters is done on the build's read
    assert state["reads"]["bytes"] == state["reads"]["whole"] == _checkpoint_bytes(recipe), state["reads"]
    assert any("qkv_proj" in name and path == "reload" for name, path in state["paths"].items())
    assert_same_weights(engine.read_weights()[0], via_reload)
    assert run(engine) == outputs_reload


def test_parameters_off_the_base_go_through_reload(engine, setup):
    """The build checks each in-place parameter against the base it reads (one read);
    where one differs (here: vLLM's own reload_weights put the sft model's weights in
    the engine, and the swap's reset only rewrites the entries its vectors change) the
    load plans again after reading the bases (the base read twice): those modules go
    through reload, and the weights are the merge's all the same."""
    recipe = str(setup["dots"][0])
    engine.load_recipe(recipe, paths="reload")
    expect, outputs = engine.read_weights()[0], run(engine)
    engine.load_recipe(recipe)
    inplace = set(engine.state()[0]["inplace"])
    sft = yaml.safe_load(Path(recipe).read_text())["models"][0]["model"]
    engine.llm.collective_rpc("reload_weights", kwargs={"weights_path": sft})
    engine.load_recipe(recipe)
    state = engine.state()[0]
    assert set(state["inplace"]) < inplace, (sorted(inplace), state["inplace"])
    assert all(state["paths"][name] == "reload" for name in inplace - set(state["inplace"]))
    # beyond one read of each checkpoint: the first build (stopped at the first mismatch), the plan's check
    assert state["reads"]["bytes"] > _checkpoint_bytes(recipe) + _checkpoint_bytes(recipe, set(state["inplace"]))
    assert_same_weights(engine.read_weights()[0], expect)
    assert run(engine) == outputs


def _checkpoint_bytes(recipe: str, base_only=None) -> int:
    """The tensor bytes of the recipe's base and models (their safetensors headers), or
    of the base's tensors named in ``base_only``."""
    from mergekit_rlvr.analysis.reader import SafetensorsFile

    spec = yaml.safe_load(Path(recipe).read_text())
    total = 0
    models = [spec["base_model"]] + ([] if base_only is not None else [m["model"] for m in spec["models"]])
    for model in models:
        for file in Path(model).glob("*.safetensors"):
            for name, entry in SafetensorsFile(str(file)).entries.items():
                if base_only is None or name in base_only:
                    total += entry["data_offsets"][1] - entry["data_offsets"][0]
    return total


def test_dots_vectors_stored_compactly(engine, setup):
    """Per rank: every byte held, in bitmasks and the models' own float32 values (the
    tiny checkpoints are float32); less than the vectors alone took as int32 + float32."""
    engine.load_recipe(str(setup["dots"][0]))
    state = engine.state()[0]
    assert state["bytes"] == state["vector_bytes"] + state["base_bytes"]
    assert state["vector_bytes"] <= 0.5 * state["vector_dense_bytes"]
    assert state["bytes"] <= 1.3 * state["weight_bytes"]
    assert not state["offload"]
    weights, outputs = engine.read_weights()[0], run(engine)
    # host offload (streamed to the device per swap; on the CPU backend host is the device)
    engine.load_recipe(str(setup["dots"][0]), offload=True)
    assert engine.state()[0]["offload"] and engine.state()[0]["bytes"] == state["bytes"]
    assert_same_weights(engine.read_weights()[0], weights)
    assert run(engine) == outputs
    engine.load_recipe(str(setup["dots"][0]), offload=False)


def test_no_drift_after_100_random_swaps(engine, setup):
    engine.load_recipe(str(setup["dots"][0]))
    start = dict(engine.coefficients)
    before_weights = engine.read_weights()[0]
    before = run(engine)
    rng = random.Random(0)
    version = engine.version
    for _ in range(100):
        engine.set_coefficients([rng.uniform(-1.0, 3.0) for _ in start])
    assert engine.version == version + 100
    engine.set_coefficients(start)
    assert_same_weights(engine.read_weights()[0], before_weights)
    assert run(engine) == before


def test_invalid_input_leaves_weights_untouched(engine, setup):
    engine.load_recipe(str(setup["dots"][0]))
    names = list(engine.coefficients)
    weights = engine.read_weights()[0]
    version, coefficients = engine.version, dict(engine.coefficients)
    bad = [
        ({"nope": 1.0, names[1]: 1.0}, "unknown coefficient 'nope'"),
        ({names[0]: float("nan"), names[1]: 1.0}, "is nan"),
        ([1.0], "expected 2 coefficients"),
        ([1.0, 2.0, 3.0], "expected 2 coefficients"),
        ({names[0]: 1.0}, "is missing"),
        ([1.0, float("inf")], "is inf"),
        ([1e39, 1.0], f"coefficient '{names[0]}' is 1e\\+39: beyond float32's range"),
    ]
    for value, message in bad:
        with pytest.raises(ValueError, match=message):
            engine.set_coefficients(value)
    assert engine.version == version and engine.coefficients == coefficients
    assert engine.state()[0]["coefficients"] == list(coefficients.values())
    assert_same_weights(engine.read_weights()[0], weights)


def test_recipe_with_another_base_is_refused(engine, setup, tiny_family):
    recipe = yaml.safe_load(setup["dots"][0].read_text())
    recipe["base_model"], recipe["models"][0]["model"] = recipe["models"][0]["model"], tiny_family["base"]
    with pytest.raises(ValueError, match="not this engine's base"):
        engine.load_recipe(recipe)


def test_mismatched_checkpoint_refused_before_the_engine_starts(tiny_family, tmp_path):
    from mergekit_rlvr.toy.tiny import write_family

    from vllm_plugins import HotSwapLLM

    other = write_family(str(tmp_path / "wide"), {"sft": (0.1, 1.0)}, intermediate=320)
    recipe = recipes.table(tiny_family)["dots"]
    recipe["models"][1]["model"] = other["sft"]
    with pytest.raises(ValueError, match=f"model {other['sft']}.*shape"):
        HotSwapLLM.from_recipe(recipe, **ENGINE)
    with pytest.raises(ValueError, match="supported: dots, sar, reasoning_interp, task_arithmetic"):
        HotSwapLLM.from_recipe(dict(recipe, merge_method="slerp"), **ENGINE)


def test_relative_model_paths_keep_their_names_in_the_workers(engine, setup, monkeypatch):
    """Workers read absolute paths, but report the names as written (what serve's
    /v1/merge accepts, and what search's best.yml uses)."""
    recipe = yaml.safe_load(setup["dots_groups"][0].read_text())
    root = Path(recipe["base_model"]).parent
    monkeypatch.chdir(root)
    for entry in [recipe] + recipe["models"]:
        key = "base_model" if entry is recipe else "model"
        entry[key] = os.path.relpath(entry[key], root)
    engine.load_recipe(recipe)
    names = engine.state()[0]["names"]
    assert names == list(engine.coefficients) and names[0] == "sft@attention" and names[3] == "sft"


def test_tensor_parallel_2_equals_vllms_own_tp2_load(setup, monkeypatch):
    """tensor_parallel_size=2 on vLLM CPU: after set_coefficients, dots and sar give
    the outputs, prompt logprobs and readable weights that vLLM's own TP=2 load of the
    mergekit-yaml output gives: ``reload_weights`` from that directory on the same
    engine afterwards (vLLM's loaders and sharding, every weight overwritten; one TP=2
    engine start instead of two, where the TP=1 tests use a separate plain engine);
    each rank reports the bytes it holds and reads, about half."""
    from vllm_plugins import HotSwapLLM, rpc

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    tp = dict(ENGINE, tensor_parallel_size=2)
    ours = {}
    llm = HotSwapLLM.from_recipe(str(setup["dots"][0]), coefficients=DETOUR["dots"], **tp)
    try:
        for method in ("dots", "sar"):
            if method == "sar":
                llm.load_recipe(str(setup["sar"][0]), coefficients=DETOUR["sar"])
            run(llm)
            target = yaml.safe_load(setup[method][0].read_text())
            llm.set_coefficients({name: _recipe_value(target, method, name) for name in llm.coefficients})
            states = llm.state()
            assert [s["rank"] for s in states] == [0, 1]
            if method == "dots":
                single = llm.planned_bytes["total"]  # what one rank would hold
                assert all(0 < s["bytes"] < 0.7 * single for s in states), [s["bytes"] for s in states]
                # planned before the engine started, for the rank holding most (the one key/value head
                # replicated on both ranks; the padded vocabulary's first block holds more real rows)
                planned, held = llm.planned_bytes["per_rank"], [s["bytes"] for s in states]
                assert 0.98 * planned <= max(held) <= planned, (held, planned)
                assert all(s["reload_rank_restricted"] > 0 for s in states)
                # each rank read its shard's box of each checkpoint tensor: about half
                reads = [s["reads"] for s in states]
                assert all(r["boxed"] > 0 and 0 < r["bytes"] < 0.6 * r["whole"] for r in reads), reads
            else:  # sar's private region is a per-tensor rank: whole tensors (but the base check's boxes)
                reads = [s["reads"] for s in states]
                assert all(not r["prepass"] and 0.6 * r["whole"] < r["bytes"] <= r["whole"] for r in reads), reads
            ours[method] = (run(llm), llm.read_weights())
        for method in ("dots", "sar"):
            llm.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(setup[method][1])})
            llm.llm.reset_prefix_cache()
            assert run(llm) == ours[method][0], method
            theirs = [{k: rpc.decode_tensor(v) for k, v in r.items()}
                      for r in llm.llm.collective_rpc(rpc.READ, args=(None,))]
            for mine, other in zip(ours[method][1], theirs):
                assert_same_weights(mine, other)
    finally:
        llm.close()
