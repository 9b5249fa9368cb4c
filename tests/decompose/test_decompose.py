"""mergekit_rlvr.decompose against the real mergekit-yaml (no vLLM): the
decomposition's ``base + sum c_j v_j`` equals the materialized merge bit for bit
(dots, sar, reasoning_interp; task_arithmetic to rounding), coefficient names and
values, writing coefficients back, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import load_state
from support.recipes import table

from mergekit_rlvr.decompose import (
    coefficient_names_of,
    decompose,
    normalize_coefficients,
    recipe_with_coefficients,
)
from mergekit_rlvr.errors import UserError


@pytest.mark.parametrize("method", ["dots", "dots_global", "sar", "reasoning_interp"])
@pytest.mark.slow
def test_decomposition_equals_mergekit_bit_for_bit(materialized, method):
    recipe, out = materialized[method]
    d = decompose(str(recipe))
    merged = load_state(out)
    assert sorted(d.tensor_names) == sorted(merged)
    for task in d.tasks:
        ours = d.merged(task)
        theirs = merged[task.name]
        assert ours.dtype == theirs.dtype
        assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32)), task.name
        stored = packed_merge(d, task).to(task.save_dtype or ours.dtype)  # the hot swap's compact storage
        assert torch.equal(stored.view(torch.int32), theirs.view(torch.int32)), task.name


def packed_merge(d, task, coefficients=None):
    """The merged tensor from the hot swap's compact storage (vllm_plugins.packed)."""
    from vllm_plugins import packed

    base, sources = d.sources(task)
    values = d.coefficients if coefficients is None else coefficients
    return packed.merge_dense(packed.pack(base, sources), [values[i] for i in task.slots], base)


def test_task_arithmetic_matches_to_rounding(materialized):
    recipe, out = materialized["task_arithmetic"]
    d = decompose(str(recipe))
    merged = load_state(out)
    for task in d.tasks:
        torch.testing.assert_close(d.merged(task), merged[task.name], rtol=1e-6, atol=1e-6)
        for values in (d.coefficients, [-1.5, 3.25]):  # the compact storage: combine's bits
            ours = packed_merge(d, task, values)
            assert torch.equal(ours.view(torch.int32), d.merged(task, values).view(torch.int32)), task.name


def test_names_and_values(tiny_family):
    r = table(tiny_family)
    d = decompose(r["dots"])
    assert d.coefficient_names == [tiny_family["sft"], tiny_family["rl"]]
    assert d.coefficients == [0.7, 1.3]
    assert decompose(r["sar"]).coefficient_dict() == {"scale": 1.4}
    assert decompose(r["reasoning_interp"]).coefficient_dict() == {"alpha": 0.35}
    assert coefficient_names_of(r["task_arithmetic"]) == [tiny_family["sft"], tiny_family["rl"]]


def test_dots_vectors_are_sparse_and_one_per_model(tiny_family):
    from mergekit_rlvr.methods.common import SparseVector

    d = decompose(table(tiny_family)["dots"])
    task = d.tasks[0]
    base, vectors = d.tensor(task)
    assert len(vectors) == 2 and all(isinstance(v, SparseVector) for v in vectors)
    n = base.numel()
    assert vectors[0].values.numel() == pytest.approx(0.3 * n, abs=2)
    # rl's update is zero on 70% of entries: the threshold is 0 and ties are kept
    assert vectors[1].values.numel() >= int(0.5 * n)


def test_recipe_with_coefficients_round_trip(tiny_family):
    r = table(tiny_family)
    for method, new in [("dots", [0.25, 1.75]), ("sar", [0.6]), ("reasoning_interp", [0.9]),
                        ("task_arithmetic", [2.0, 0.0])]:
        names = coefficient_names_of(r[method])
        written = recipe_with_coefficients(r[method], dict(zip(names, new)))
        assert decompose(written).coefficients == new
        assert r[method] != written  # the input is not modified
    written = recipe_with_coefficients(r["dots"], [0.1, 0.2])
    assert [m["parameters"]["density"] for m in written["models"]] == [0.3, 0.5]


def test_unsupported_method_lists_supported(tiny_family):
    recipe = dict(table(tiny_family)["task_arithmetic"], merge_method="ties")
    with pytest.raises(UserError, match="supported: dots, sar, reasoning_interp, task_arithmetic"):
        decompose(recipe)


def test_mismatched_checkpoint_is_named(tiny_family, tmp_path):
    from mergekit_rlvr.toy.tiny import write_family

    other = write_family(str(tmp_path / "wide"), {"sft": (0.1, 1.0)}, intermediate=320)
    recipe = table(tiny_family)["dots"]
    recipe["models"][1]["model"] = other["sft"]
    d = decompose(recipe)
    with pytest.raises(UserError, match=f"model {other['sft']}.*mlp"):
        d.prepare()


def test_bad_coefficients():
    names = ["a", "b"]
    assert normalize_coefficients(names, {"b": 2, "a": 1}) == [1.0, 2.0]
    with pytest.raises(ValueError, match="unknown coefficient 'c'"):
        normalize_coefficients(names, {"a": 1, "b": 2, "c": 3})
    with pytest.raises(ValueError, match="'b' is missing"):
        normalize_coefficients(names, {"a": 1})
    with pytest.raises(ValueError, match="'b' is nan"):
        normalize_coefficients(names, [1.0, float("nan")])
    with pytest.raises(ValueError, match="expected 2 coefficients"):
        normalize_coefficients(names, [1.0])
    with pytest.raises(ValueError, match="not a number"):
        normalize_coefficients(names, [1.0, "x"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="nope.yml"):
        decompose(str(tmp_path / "nope.yml"))


@pytest.mark.parametrize("method", ["dots", "task_arithmetic"])
def test_select_queries_engine_serves_each_source_model_itself(tiny_family, method):
    """Paper 000 Sec. 4.2 scores theta_SFT and theta_RLVR: the engine recipe of
    select-queries (density 1, no rescale / lambda 1) with coefficient 1 on one model
    and 0 on the others is that checkpoint; --sources sparsified keeps the recipe's vectors."""
    from mergekit_rlvr.methods.common import combine
    from mergekit_rlvr.search.select import source_recipe

    recipe = table(tiny_family)[method]
    recipe["parameters"] = {"rescale": "global", "density": 0.3} if method == "dots" else {"lambda": 0.6}
    d = decompose(source_recipe(recipe))
    sparse = decompose(source_recipe(recipe, "sparsified"))
    models = [load_state(tiny_family["sft"]), load_state(tiny_family["rl"])]
    differs = 0
    for task, sparse_task in zip(d.tasks, sparse.tasks):
        base, vectors = d.tensor(task)
        _, sparse_vectors = sparse.tensor(sparse_task)
        for i, model in enumerate(models):
            hot = [1.0 if j == i else 0.0 for j in range(len(models))]
            torch.testing.assert_close(combine(base, vectors, hot), model[task.name], rtol=0, atol=1e-6)
            differs += not torch.allclose(combine(base, sparse_vectors, hot), model[task.name], atol=1e-6)
    assert differs > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_compact_storage_combines_like_combine_bit_for_bit(dtype):
    """vllm_plugins.packed on every vector kind, signed zeros and ties included, equals
    methods.common.combine on the kernels' own vectors (no engine, no files)."""
    from mergekit_rlvr.methods.common import MaskedVector, RecomputedVector, combine, task_vector
    from vllm_plugins import packed

    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 48, generator=g).to(dtype)
    base[0, :8] = -0.0
    sft = (base.double() + 0.3 * torch.randn(base.shape, generator=g, dtype=torch.float64)).to(dtype)
    rl = base.clone()
    rl.view(-1)[::5] += 0.01  # sparse: unchanged entries give tau == 0 (ties kept by a 0 threshold)
    mask = task_vector(sft, base).abs() >= 0.2
    kernel = [MaskedVector(mask, task_vector(sft, base) * 1.37), task_vector(rl, base) * 0.5,
              torch.randn(base.shape, generator=g).to(torch.float64 if dtype == torch.float64 else torch.float32),
              task_vector(sft, base)]
    ours = [RecomputedVector(sft, mask, 1.37), RecomputedVector(rl, None, 0.5), kernel[2], RecomputedVector(sft)]
    stored = packed.pack(base, ours)
    assert stored.touched is None  # dense vectors touch every entry
    assert stored.vectors[1].values.numel() < 0.3 * base.numel()  # rl's zeros dropped
    if dtype != torch.float64:
        assert stored.vectors[0].values.dtype == torch.bfloat16 or dtype == torch.float32
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float64: torch.int64}[dtype]
    for coefficients in ([0.7, 1.3, 2.0, -0.5], [0.0, 0.0, 0.0, 0.0], [-1.0, 3.0, 0.1, 1e-8]):
        expect = combine(base, kernel, coefficients, out_dtype=dtype)
        assert torch.equal(combine(base, ours, coefficients, out_dtype=dtype).view(bits), expect.view(bits))
        got = packed.merge_dense(stored, coefficients, base)
        assert torch.equal(got.view(bits), expect.view(bits))
    # a dots-like pair at density 0.3 on bf16: bits + the model's values + the base where touched
    if dtype == torch.bfloat16:
        masks = [torch.rand(base.shape, generator=g) < 0.3 for _ in range(2)]
        two = packed.pack(base, [RecomputedVector(sft, m, 1.1) for m in masks])
        assert two.count < base.numel() and two.nbytes <= 1.3 * base.numel() * base.element_size()
        expect = combine(base, [RecomputedVector(sft, m, 1.1) for m in masks], [0.4, -2.0], out_dtype=dtype)
        assert torch.equal(packed.merge_dense(two, [0.4, -2.0], base).view(bits), expect.view(bits))
    assert torch.equal(packed.unpack_bits(packed.pack_bits(mask), mask.numel()), mask.reshape(-1))


def test_swap_plan_without_an_engine():
    """vllm_plugins.plan: fused tensors, repacked modules, a tensor feeding two
    modules, grouped coefficients and forced reload, decided from facts alone."""
    from vllm_plugins.plan import ParamFacts, plan_paths

    one = ((0, 1),)

    def facts(name, checkpoints, plain=True, derived_free=True, slots=None):
        return ParamFacts(name, tuple(checkpoints), plain, slots or one * len(checkpoints), derived_free)

    params = {f.name: f for f in [
        facts("l.qkv.weight", ["l.q.weight", "l.k.weight", "l.v.weight"]),
        facts("l.norm.weight", ["l.norm.weight"]),
        facts("l.mlp.weight", ["l.mlp.weight"], derived_free=False),  # repacked (CPU linear)
        facts("emb.weight", ["tied.weight"]),  # a tied tensor feeding a repacked head
        facts("head.weight", ["tied.weight"], derived_free=False),
        facts("l.gate_up.weight", ["l.gate.weight", "l.up.weight"], slots=((0, 1), (2, 3))),  # two groups
        facts("l.odd.weight", ["l.odd.weight"], plain=False),  # not what the loaders put there
    ]}
    names = ["l.q.weight", "l.k.weight", "l.v.weight", "l.norm.weight", "l.mlp.weight", "tied.weight",
             "l.gate.weight", "l.up.weight", "l.odd.weight", "unused.weight"]
    plan = plan_paths(params, names)
    assert plan.inplace == {"l.qkv.weight": ["l.q.weight", "l.k.weight", "l.v.weight"],
                            "l.norm.weight": ["l.norm.weight"]}
    assert plan.reload == ["l.mlp.weight", "tied.weight", "l.gate.weight", "l.up.weight", "l.odd.weight",
                           "unused.weight"]
    assert plan.paths["emb.weight"] == plan.paths["head.weight"] == "reload"
    assert plan.route("l.q.weight") == "inplace" and plan.route("tied.weight") == "reload"
    forced = plan_paths(params, names, force_reload=True)
    assert forced.inplace == {} and forced.reload == names


def test_one_coefficient_validator_refuses_float32_overflow(tiny_family):
    """vllm_plugins.rpc.check_values is what HotSwapLLM (through Decomposition) and
    POST /v1/merge (serving_merge.check_method_values) call: 1e39 overflows the
    swap's float32 arithmetic and is refused in one line naming the coefficient."""
    from vllm_plugins.rpc import FLOAT32_MAX, check_values
    from vllm_plugins.serving_merge import MergeRequestError, check_method_values

    d = decompose(table(tiny_family)["dots"])
    names = d.coefficient_names
    with pytest.raises(UserError, match=f"coefficient '{names[0]}' is 1e\\+39: beyond float32's range"):
        d.check_coefficients([1e39, 1.0])
    assert d.check_coefficients([FLOAT32_MAX, -FLOAT32_MAX]) == [FLOAT32_MAX, -FLOAT32_MAX]
    with pytest.raises(MergeRequestError, match="coefficient 'b' is -1e\\+39") as error:
        check_method_values("dots", ["a", "b"], [1.0, -1e39])
    assert error.value.status == 400 and "\n" not in str(error.value)
    with pytest.raises(UserError, match=r"coefficient 'alpha': alpha must be in \[0, 1\]"):
        check_values("reasoning_interp", ["alpha"], [1.5])
    with pytest.raises(UserError, match="expected 2 coefficients"):
        check_values("dots", ["a", "b"], [1.0])


def test_workers_take_the_drivers_prepass(tiny_family):
    """Decomposition.prepared_state: what the driver's pre-pass learned (dots'
    thresholds and norms) is adopted by another decomposition of the same recipe
    (a vLLM worker) without reading every checkpoint again: same merge, bit for bit."""
    recipe = table(tiny_family)["dots"]
    driver = decompose(recipe)
    state = driver.prepared_state()
    worker = decompose(recipe)
    worker.adopt(state)
    assert worker._prepared and worker._context.thresholds == driver._context.thresholds
    for task in driver.tasks[:3]:
        assert torch.equal(packed_merge(worker, task).view(torch.int32), driver.merged(task).view(torch.int32))



def test_workers_take_sars_fisher_stores_as_their_paths(tiny_family, tmp_path):
    """sar's pre-pass context is its Fisher stores: they pickle as their paths and the
    adopting decomposition (a vLLM worker) reopens the same files; same merge, bit for bit."""
    import os

    from mergekit_rlvr.io.fisher import save_fisher

    plain = decompose(table(tiny_family)["sar"])
    g = torch.Generator().manual_seed(5)
    files = {}
    for name in ("rl", "rl2"):
        values = {t.name: torch.rand(plain.base_info(t)[0], generator=g, dtype=torch.float64) + 0.1
                  for t in plain.tasks}
        files[name] = str(tmp_path / f"fisher-{name}.safetensors")
        save_fisher(values, files[name])
    recipe = table(tiny_family)["sar"]
    for entry in recipe["models"]:
        entry["parameters"] = {"fisher": files["rl" if entry["model"].endswith("rl") else "rl2"]}
    driver = decompose(recipe)
    worker = decompose(recipe)
    worker.adopt(driver.prepared_state())
    paths = sorted(os.path.abspath(store.path) for store in worker._context.values())
    assert paths == sorted(files.values())
    for task in driver.tasks[:3]:
        assert torch.equal(packed_merge(worker, task).view(torch.int32), driver.merged(task).view(torch.int32))


@pytest.mark.parametrize("scales", [(1.25, 1.25), (1.25, 0.5)])
def test_fused_parameter_swapped_in_place_like_combine(scales):
    """vllm_plugins.stores without an engine: q and k fused into one parameter (the
    in-place path GPUs take for qkv_proj), one gamma (kept as the models' values) or
    one per tensor (dots rescale: tensor, kept as float32 values): the swap writes
    combine's bits into each tensor's rows, and the base stays where no vector is."""
    from types import SimpleNamespace

    from mergekit_rlvr.methods.common import RecomputedVector, combine
    from vllm_plugins.layout import Copy, Layout, ParamLayout
    from vllm_plugins.plan import ParamFacts, plan_paths
    from vllm_plugins.stores import Builder

    g = torch.Generator().manual_seed(1)
    shapes = {"q": (4, 8), "k": (2, 8)}
    bases = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    models = {n: b + 0.1 * torch.randn(b.shape, generator=g) for n, b in bases.items()}
    masks = {n: torch.rand(b.shape, generator=g) < 0.3 for n, b in bases.items()}
    copies = [Copy("q", ((4, 8), (8, 1), 0), ((4, 8), (8, 1), 0)), Copy("k", ((2, 8), (8, 1), 32), ((2, 8), (8, 1), 0))]
    layout = Layout({"qkv": ParamLayout("qkv", (6, 8), copies)})
    live = {"qkv": torch.cat([bases["q"], bases["k"]])}
    plan = plan_paths({"qkv": ParamFacts("qkv", ("k", "q"), True, ((0,), (0,)), True)}, ["q", "k"])
    builder = Builder(plan, layout, live, torch.device("cpu"))
    for (name, base), scale in zip(bases.items(), scales):
        task = SimpleNamespace(name=name, save_dtype=None, slots=[0])
        builder.add(task, base, [RecomputedVector(models[name], masks[name], scale)], lambda: None)
    builder.check_complete()
    (entry,) = builder.inplace
    assert entry.store.vectors[0].recompute == (scales[0] == scales[1])
    for c in (0.7, -2.5):
        entry.swap([c])
        expect = torch.cat([combine(bases[n], [RecomputedVector(models[n], masks[n], s)], [c])
                            for n, s in zip(bases, scales)])
        assert torch.equal(live["qkv"].view(torch.int32), expect.view(torch.int32))


def test_builder_checks_the_base_before_writing_a_parameter():
    """check_base: an in-place parameter that does not hold the base replayed from the
    tensors the build is given (a loader that transformed what it copied) raises
    BaseMismatch before anything is written to it; without the check it is built."""
    from types import SimpleNamespace

    from mergekit_rlvr.methods.common import RecomputedVector
    from vllm_plugins.layout import Copy, Layout, ParamLayout
    from vllm_plugins.plan import ParamFacts, plan_paths
    from vllm_plugins.stores import BaseMismatch, Builder

    g = torch.Generator().manual_seed(2)
    base = torch.randn(4, 8, generator=g)
    model = base + 0.1 * torch.randn(base.shape, generator=g)
    layout = Layout({"w": ParamLayout("w", (4, 8), [Copy("w", ((4, 8), (8, 1), 0), ((4, 8), (8, 1), 0))])})
    plan = plan_paths({"w": ParamFacts("w", ("w",), True, ((0,),), True)}, ["w"])
    task = SimpleNamespace(name="w", save_dtype=None, slots=[0])
    vector = RecomputedVector(model, torch.rand(base.shape, generator=g) < 0.3, 1.0)
    for off, check in ((False, True), (True, True), (True, False)):
        live = {"w": base.clone()}
        if off:
            live["w"][2, 3] = torch.nextafter(live["w"][2, 3], torch.tensor(math.inf))
        before = live["w"].clone()
        builder = Builder(plan, layout, live, torch.device("cpu"), check_base=check)
        if off and check:
            with pytest.raises(BaseMismatch, match="parameter w"):
                builder.add(task, base, [vector], lambda: None)
            assert torch.equal(live["w"], before)
            continue
        builder.add(task, base, [vector], lambda: None)
        (entry,) = builder.inplace
        assert torch.equal(live["w"], base)  # the base written where no vector is (here: everywhere)
