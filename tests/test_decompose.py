"""mergekit_rlvr.decompose against the real mergekit-yaml (no vLLM): the
decomposition's ``base + sum c_j v_j`` equals the materialized merge bit for bit
(dots, sar, reasoning_interp; task_arithmetic to rounding), coefficient names and
values, writing coefficients back, and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import load_state

from mergekit_rlvr.decompose import (
    coefficient_names_of,
    decompose,
    normalize_coefficients,
    recipe_with_coefficients,
)
from mergekit_rlvr.errors import UserError

BIN = Path(sys.executable).parent


def recipes(family):
    return {
        "dots": {
            "merge_method": "dots",
            "base_model": family["base"],
            "models": [
                {"model": family["sft"], "parameters": {"weight": 0.7, "density": 0.3}},
                {"model": family["rl"], "parameters": {"weight": 1.3, "density": 0.5}},
            ],
            "dtype": "float32",
        },
        "dots_global": {  # sparsify: global (Eq. 2's one quantile), served == materialized too
            "merge_method": "dots",
            "base_model": family["base"],
            "models": [
                {"model": family["sft"], "parameters": {"weight": 0.7, "density": 0.3}},
                {"model": family["rl"], "parameters": {"weight": 1.3, "density": 0.2}},
            ],
            "parameters": {"sparsify": "global", "rescale": "global"},
            "dtype": "float32",
        },
        "sar": {
            "merge_method": "sar",
            "base_model": family["base"],
            "models": [{"model": family["rl"]}, {"model": family["rl2"]}],
            "parameters": {"scale": 1.4, "drop_rate": 0.3, "seed": 3},
            "dtype": "float32",
        },
        "reasoning_interp": {
            "merge_method": "reasoning_interp",
            "base_model": family["base"],
            "models": [{"model": family["sft"]}],
            "parameters": {"alpha": 0.35},
            "dtype": "float32",
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": family["base"],
            "models": [
                {"model": family["sft"], "parameters": {"weight": 0.4}},
                {"model": family["rl"], "parameters": {"weight": 1.1}},
            ],
            "dtype": "float32",
        },
    }


def run_parallel(jobs):
    """Run the real mergekit-yaml console script on several recipes at once."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    procs = [
        (out, subprocess.Popen([str(BIN / "mergekit-yaml"), str(recipe), str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env))
        for recipe, out in jobs
    ]
    for out, proc in procs:
        _, err = proc.communicate()
        assert proc.returncode == 0, f"mergekit-yaml {out} failed:\n{err[-3000:]}"


@pytest.fixture(scope="module")
def materialized(tiny_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("decompose")
    jobs, out = [], {}
    for name, recipe in recipes(tiny_family).items():
        path = root / f"{name}.yml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        out[name] = (path, root / f"out-{name}")
        jobs.append(out[name])
    run_parallel(jobs)
    return out


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


def test_task_arithmetic_matches_to_rounding(materialized):
    recipe, out = materialized["task_arithmetic"]
    d = decompose(str(recipe))
    merged = load_state(out)
    for task in d.tasks:
        torch.testing.assert_close(d.merged(task), merged[task.name], rtol=1e-6, atol=1e-6)


def test_names_and_values(tiny_family):
    r = recipes(tiny_family)
    d = decompose(r["dots"])
    assert d.coefficient_names == [tiny_family["sft"], tiny_family["rl"]]
    assert d.coefficients == [0.7, 1.3]
    assert decompose(r["sar"]).coefficient_dict() == {"scale": 1.4}
    assert decompose(r["reasoning_interp"]).coefficient_dict() == {"alpha": 0.35}
    assert coefficient_names_of(r["task_arithmetic"]) == [tiny_family["sft"], tiny_family["rl"]]


def test_dots_vectors_are_sparse_and_one_per_model(tiny_family):
    from mergekit_rlvr.methods.common import SparseVector

    d = decompose(recipes(tiny_family)["dots"])
    task = d.tasks[0]
    base, vectors = d.tensor(task)
    assert len(vectors) == 2 and all(isinstance(v, SparseVector) for v in vectors)
    n = base.numel()
    assert vectors[0].values.numel() == pytest.approx(0.3 * n, abs=2)
    # rl's update is zero on 70% of entries: the threshold is 0 and ties are kept
    assert vectors[1].values.numel() >= int(0.5 * n)


def test_recipe_with_coefficients_round_trip(tiny_family):
    r = recipes(tiny_family)
    for method, new in [("dots", [0.25, 1.75]), ("sar", [0.6]), ("reasoning_interp", [0.9]),
                        ("task_arithmetic", [2.0, 0.0])]:
        names = coefficient_names_of(r[method])
        written = recipe_with_coefficients(r[method], dict(zip(names, new)))
        assert decompose(written).coefficients == new
        assert r[method] != written  # the input is not modified
    written = recipe_with_coefficients(r["dots"], [0.1, 0.2])
    assert [m["parameters"]["density"] for m in written["models"]] == [0.3, 0.5]


def test_unsupported_method_lists_supported(tiny_family):
    recipe = dict(recipes(tiny_family)["task_arithmetic"], merge_method="ties")
    with pytest.raises(UserError, match="supported: dots, sar, reasoning_interp, task_arithmetic"):
        decompose(recipe)


def test_mismatched_checkpoint_is_named(tiny_family, tmp_path):
    from mergekit_rlvr.toy.tiny import write_family

    other = write_family(str(tmp_path / "wide"), {"sft": (0.1, 1.0)}, intermediate=320)
    recipe = recipes(tiny_family)["dots"]
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

    recipe = recipes(tiny_family)[method]
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
