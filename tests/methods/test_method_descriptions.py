"""Each hot-swappable method describes itself in one place (its kernel, or for
mergekit's own task_arithmetic the adapter kernels/task_arithmetic.py): the hot
swap's vectors, their stored form and the source models' parameters. In memory,
no checkpoint and no engine (milliseconds)."""

from __future__ import annotations

import pytest
import torch

from mergekit_rlvr.errors import UserError
from mergekit_rlvr.kernels.coefficients import coefficient, description, hot_swappable, with_source_models

CASES = [
    ("dots", {"weight": [0.5, 1.5], "density": [0.3, 0.6], "rescale": "global"}),
    ("dots", {"weight": [0.5, 1.5], "rescale": "tensor"}),
    ("dots", {"weight": [-1.0, 2.0], "rescale": "none", "sparsify": "global"}),
    ("sar", {"scale": 0.7, "drop_rate": 0.3}),
    ("reasoning_interp", {"alpha": 0.25}),
    ("task_arithmetic", {"weight": [0.5, 1.5], "lambda": 0.6}),
]


def _tensors(models: int):
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(32, 48, generator=generator)
    return base, [base + 0.1 * torch.randn(32, 48, generator=generator) for _ in range(models)]


def _bound(method: str, given: dict, ids):
    """The parameters as mergekit's merge task binds them: defaults filled, per-model
    ones as PerInputValues over the non-base inputs."""
    from mergekit import merge_methods
    from mergekit.merge_methods.base import ParameterScope, PerInputValues

    out = {}
    for spec in merge_methods.get(method).spec.parameters:
        value = given.get(spec.name, spec.default)
        if spec.scope == ParameterScope.NON_BASE:
            value = PerInputValues(list(zip(ids, value if isinstance(value, list) else [value] * len(ids))))
        out[spec.name] = value
    return out


@pytest.mark.parametrize("method,given", CASES)
def test_stored_form_merges_like_the_vectors_and_like_mergekit(method, given):
    from mergekit.merge_methods.api import merge_state_dicts
    from mergekit.merge_methods.base import TensorGroup

    from mergekit_rlvr.methods.common import combine

    ids = ["sft"] if method == "reasoning_interp" else ["a", "b"]
    base, models = _tensors(len(ids))
    group = TensorGroup.from_tensors([base, *models], ids=["base", *ids], base_index=0, name="w")
    parameters = _bound(method, given, ids)
    described = description(method)
    context = None if method == "task_arithmetic" else described.swap_context(group, parameters, torch.float32)
    vectors, values = described.vectors(group, context, **parameters)
    stored, stored_values = described.swap_vectors(group, context, **parameters)
    assert stored_values == values
    expected = [given[coefficient(method).parameter]] if not coefficient(method).per_model else given["weight"]
    assert [float(v) for v in values] == [float(v) for v in expected]
    ours = combine(base, vectors, values)
    assert torch.equal(combine(base, stored, values).view(torch.int32), ours.view(torch.int32))
    mergekit = merge_state_dicts({"base": {"w": base}, **{i: {"w": m} for i, m in zip(ids, models)}}, method,
                                 base="base", parameters={k: dict(zip(ids, v)) if isinstance(v, list) else v
                                                          for k, v in given.items()})["w"]
    if method == "task_arithmetic":  # mergekit's own sum, in its own order: equal to rounding
        torch.testing.assert_close(ours, mergekit, rtol=1e-6, atol=1e-6)
    else:  # our kernels' merge is combine on the same vectors
        assert torch.equal(ours.view(torch.int32), mergekit.view(torch.int32))


def test_every_method_answers_the_whole_interface():
    for method in hot_swappable():
        described = description(method)
        assert described.coefficient == coefficient(method).parameter
        for name in ("swap_context", "vectors", "swap_vectors"):
            assert callable(getattr(described, name)), (method, name)
    assert {m: description(m).picklable_context for m in hot_swappable()} == {
        "dots": True, "sar": True, "reasoning_interp": True, "task_arithmetic": True}


def test_source_models_form_comes_from_the_method():
    from mergekit_rlvr.search.select import source_recipe

    assert with_source_models() == ("dots", "task_arithmetic")
    dots = {"merge_method": "dots", "base_model": "b", "parameters": {"sparsify": "global", "rescale": "global"},
            "models": [{"model": "a", "parameters": {"weight": 0.5, "density": 0.3}}],
            "search": {"groups": {"mlp": ["mlp"]}, "trials": 3}}
    assert source_recipe(dots) == {
        "merge_method": "dots", "base_model": "b", "parameters": {"rescale": "none", "density": 1.0},
        "models": [{"model": "a", "parameters": {"weight": 0.5, "density": 1.0}}], "search": {"trials": 3}}
    ta = {"merge_method": "task_arithmetic", "base_model": "b", "parameters": {"lambda": 0.6},
          "models": [{"model": "a", "parameters": {"weight": 0.5}}]}
    assert source_recipe(ta)["parameters"] == {"lambda": 1.0, "normalize": False}
    assert source_recipe(ta)["models"] == ta["models"]
    with pytest.raises(UserError, match=r"^recipe: select-queries needs one coefficient per source model"
                                        r" \(dots or task_arithmetic\), not merge_method 'sar'$"):
        source_recipe({"merge_method": "sar", "base_model": "b", "models": []})
