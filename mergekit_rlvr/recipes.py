"""A recipe's coefficients, read and written without reading any checkpoint: their
names (``coefficient_names_of``), checked values (``normalize_coefficients``), a recipe
with new values written where mergekit reads them (``recipe_with_coefficients``), and
model strings as written vs. the local directories they resolve to. See
:mod:`mergekit_rlvr.decompose` for the names' conventions.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from mergekit_rlvr.errors import UserError
from mergekit_rlvr.kernels.coefficients import coefficient


RecipeLike = Union[str, os.PathLike, Mapping[str, Any]]


# --------------------------------------------------------------------------- recipes
def load_recipe(recipe: RecipeLike) -> Dict[str, Any]:
    """The recipe as a dict (a path to YAML, or a mapping which is deep-copied)."""
    import yaml

    if isinstance(recipe, Mapping):
        return copy.deepcopy(dict(recipe))
    path = Path(recipe)
    try:
        text = path.read_text()
    except OSError as error:
        raise UserError(f"recipe {path}: cannot read it ({error.strerror or error})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UserError(f"recipe {path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe {path}: expected a mapping at the top level")
    return data


def coefficient_names_of(recipe: Mapping[str, Any]) -> List[str]:
    """The coefficient names of a recipe, from the recipe alone (no files read)."""
    meaning = coefficient(recipe.get("merge_method"))
    if not meaning.per_model:
        return [meaning.parameter]
    base = recipe.get("base_model")
    names = []
    for entry in recipe.get("models") or []:
        name = _model_string(entry.get("model"))
        if name != _model_string(base):
            names.append(name)
    return names


def recipe_with_coefficients(recipe: Mapping[str, Any], coefficients) -> Dict[str, Any]:
    """A copy of ``recipe`` with ``coefficients`` (dict by name, or list in
    ``coefficient_names_of`` order) written where mergekit reads them: each
    model's ``parameters.weight`` (dots, task_arithmetic), top-level
    ``parameters.scale`` (sar) or ``parameters.alpha`` (reasoning_interp).
    With ``search.groups``: a dict of grouped names (``name@group``), written as
    mergekit's conditional ``filter`` lists."""
    from mergekit_rlvr import groups as grp

    out = copy.deepcopy(dict(recipe))
    names = coefficient_names_of(out)
    layout = grp.of_recipe(out)
    if layout is not None:
        by_name = _grouped_settings(names, layout, coefficients)
    else:
        by_name = dict(zip(names, normalize_coefficients(names, coefficients)))
    meaning = coefficient(out["merge_method"])
    if not meaning.per_model:
        params = out.get("parameters") or {}
        params[meaning.parameter] = by_name[names[0]]
        out["parameters"] = params
        return out
    for entry in out.get("models") or []:
        name = _model_string(entry.get("model"))
        if name in by_name:
            params = entry.get("parameters") or {}
            params[meaning.parameter] = by_name[name]
            entry["parameters"] = params
    return out


def _grouped_settings(names: Sequence[str], layout, coefficients) -> Dict[str, Any]:
    """name -> the value mergekit reads: a number, or a conditional list per group."""
    from mergekit_rlvr import groups as grp

    if not isinstance(coefficients, Mapping):
        raise UserError("with search.groups, coefficients are given as a dict of name@group -> value")
    per: Dict[str, Dict[Optional[str], float]] = {n: {} for n in names}
    keys = list(coefficients)
    for key, value in zip(keys, normalize_coefficients(keys, coefficients)):
        base, group = grp.split(key, layout, names)
        per[base][group] = value
    out: Dict[str, Any] = {}
    for name in names:
        values = per[name]
        if not values:
            raise UserError(f"coefficient {name!r} is missing (give {name}@group or {name})")
        rest = values.pop(None, None)
        out[name] = layout.conditional(values, rest) if values else rest
    return out


def normalize_coefficients(names: Sequence[str], coefficients) -> List[float]:
    """A list of finite floats in ``names`` order, from a dict or a sequence;
    ValueError (UserError) naming the bad name, value or length."""
    if isinstance(coefficients, Mapping):
        unknown = [k for k in coefficients if k not in names]
        if unknown:
            raise UserError(
                f"unknown coefficient {unknown[0]!r}; the recipe's coefficients are: {', '.join(names)}"
            )
        missing = [n for n in names if n not in coefficients]
        if missing:
            raise UserError(f"coefficient {missing[0]!r} is missing (give all of: {', '.join(names)})")
        raw = [coefficients[n] for n in names]
    else:
        if isinstance(coefficients, (str, bytes)) or not isinstance(coefficients, Iterable):
            raise UserError(f"coefficients must be a dict or a list, got {type(coefficients).__name__}")
        raw = list(coefficients)
        if len(raw) != len(names):
            raise UserError(
                f"expected {len(names)} coefficients ({', '.join(names)}), got {len(raw)}"
            )
    from vllm_plugins.rpc import check_values  # the one validator (no vLLM import)

    return check_values(None, names, raw)


def _model_string(model: Any) -> str:
    """The recipe's ``model:`` string as written (mergekit's str() of the reference
    for non-string forms)."""
    if model is None:
        return ""
    if isinstance(model, str):
        return model
    from mergekit.common import ModelReference

    return str(ModelReference.model_validate(model))


def _check_method(method: Any) -> None:
    """UserError in one line unless mergekit's registry says ``method`` can be hot-swapped."""
    coefficient(method)


def absolute_recipe(recipe: RecipeLike, models: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """The recipe with every model string replaced by its local directory (absolute
    paths; hub ids resolved through the Hugging Face cache, see :mod:`mergekit_rlvr.hub`),
    so another process with another working directory reads the same files.
    ``models``: resolutions made earlier (as written -> directory)."""
    from mergekit_rlvr.hub import resolve_recipe

    return resolve_recipe(load_recipe(recipe), models)[0]


def model_aliases(recipe: RecipeLike, models: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """local directory -> the ``model:`` string as written, for the strings that
    ``absolute_recipe`` rewrites (so coefficient names stay as the user wrote them)."""
    from mergekit_rlvr.hub import resolve_recipe

    return resolve_recipe(load_recipe(recipe), models)[1]


def names_as_written(names: Sequence[str], aliases: Mapping[str, str]) -> List[str]:
    """Coefficient names (``model`` or ``model@group``) with aliased model paths."""
    out = []
    for name in names:
        for absolute, written in aliases.items():
            if name == absolute or name.startswith(absolute + "@"):
                name = written + name[len(absolute):]
                break
        out.append(name)
    return out
