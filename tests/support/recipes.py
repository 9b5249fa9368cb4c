"""Recipes of the tiny family (``tiny_family`` in conftest.py: base, sft, rl, rl2), one
builder per merge method; each test module passes the values it checks against.
Every recipe is float32 (the tiny models are)."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

Family = Dict[str, str]


def _finish(recipe: Dict[str, Any], parameters: Optional[Dict[str, Any]], search: Optional[Dict[str, Any]]):
    if parameters:
        recipe["parameters"] = dict(parameters)
    recipe["dtype"] = "float32"
    if search is not None:
        recipe["search"] = dict(search)
    return recipe


def dots(family: Family, weights: Sequence[float] = (1.0, 1.0), densities: Sequence[Optional[float]] = (None, None),
         models: Sequence[str] = ("sft", "rl"), parameters: Optional[Dict[str, Any]] = None,
         search: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """DoTS over ``models`` (one weight each; a density per model where given)."""
    entries = []
    for name, weight, density in zip(models, weights, densities):
        entry = {"weight": weight} if density is None else {"weight": weight, "density": density}
        entries.append({"model": family[name], "parameters": entry})
    return _finish({"merge_method": "dots", "base_model": family["base"], "models": entries}, parameters, search)


def sar(family: Family, scale: float = 1.0, drop_rate: float = 0.3, seed: int = 3,
        models: Sequence[str] = ("rl", "rl2"), search: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    recipe = {"merge_method": "sar", "base_model": family["base"], "models": [{"model": family[m]} for m in models]}
    return _finish(recipe, {"scale": scale, "drop_rate": drop_rate, "seed": seed}, search)


def reasoning_interp(family: Family, alpha: float = 0.5, search: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """theta = M + alpha (sft - M), the base standing for the reasoning model M."""
    recipe = {"merge_method": "reasoning_interp", "base_model": family["base"], "models": [{"model": family["sft"]}]}
    return _finish(recipe, {"alpha": alpha}, search)


def task_arithmetic(family: Family, weights: Sequence[float] = (1.0, 1.0), models: Sequence[str] = ("sft", "rl"),
                    parameters: Optional[Dict[str, Any]] = None,
                    search: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    entries = [{"model": family[m], "parameters": {"weight": w}} for m, w in zip(models, weights)]
    recipe = {"merge_method": "task_arithmetic", "base_model": family["base"], "models": entries}
    return _finish(recipe, parameters, search)


def table(family: Family) -> Dict[str, Dict[str, Any]]:
    """One recipe per case that both the decomposition (test_decompose) and the hot
    swap (test_hotswap) check against mergekit-yaml's output (``materialized`` in
    conftest.py); fresh dicts on every call."""
    return {
        "dots": dots(family, (0.7, 1.3), (0.3, 0.5)),
        # sparsify: global (Eq. 2's one quantile), served == materialized too
        "dots_global": dots(family, (0.7, 1.3), (0.3, 0.2), parameters={"sparsify": "global", "rescale": "global"}),
        "sar": sar(family, scale=1.4, drop_rate=0.3, seed=3),
        "reasoning_interp": reasoning_interp(family, alpha=0.35),
        "task_arithmetic": task_arithmetic(family, (0.4, 1.1), parameters={"lambda": 0.9}),
    }
