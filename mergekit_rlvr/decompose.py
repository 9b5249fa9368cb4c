"""A mergekit recipe as ``theta = theta_base + sum_j c_j * v_j``: fixed vectors and
named coefficients (no vLLM here).

The recipe is parsed by mergekit itself (``MergeConfiguration``) and planned by
mergekit's ``MergePlanner``, so the tensors, their input names, dtypes and every
per-tensor parameter (filters, gradients, defaults) are exactly what
``mergekit-yaml`` would use. The whole-model pre-pass (DoTS thresholds and global
gamma, SAR's Fisher files, input checks) is the mergekit kernel's own ``prepare``;
the per-tensor vectors are the kernel's own ``vectors`` (and ``swap_vectors``, the
form the hot swap stores), calling the same functions in ``mergekit_rlvr.methods``
as its merge, so ``combine(base, vectors, coefficients)`` reproduces the
materialized merge bit for bit (dots, sar, reasoning_interp). mergekit's own
``task_arithmetic`` is described the same way by ``kernels/task_arithmetic.py``.

Coefficient names: ``dots`` and ``task_arithmetic`` have one per model, named by
the recipe's ``model:`` string, in recipe order; ``sar`` has ``scale``;
``reasoning_interp`` has ``alpha``. With ``search.groups`` (:mod:`mergekit_rlvr.groups`)
each becomes one coefficient per module group, ``name@group``.
"""

from __future__ import annotations

import os
from typing import List, Mapping, Optional, Tuple

from mergekit_rlvr.decomposition import Decomposition, TensorTask  # noqa: F401
from mergekit_rlvr.errors import UserError
from mergekit_rlvr.kernels.coefficients import coefficient
from mergekit_rlvr.recipes import (  # noqa: F401  (this module's historical public names)
    RecipeLike,
    _check_method,
    _grouped_settings,
    _model_string,
    absolute_recipe,
    coefficient_names_of,
    load_recipe,
    model_aliases,
    names_as_written,
    normalize_coefficients,
    recipe_with_coefficients,
)


def decompose(recipe: RecipeLike, *, trust_remote_code: bool = False) -> Decomposition:
    """Parse and plan ``recipe`` (a path or a dict) with mergekit. Reads only
    configs and tensor indexes; vectors are computed on demand."""
    from mergekit import merge_methods
    from mergekit.common import dtype_from_name

    from mergekit_rlvr.hub import resolve_recipe

    where = f"recipe {recipe}" if not isinstance(recipe, Mapping) else "recipe"
    data = load_recipe(recipe)
    method = data.get("merge_method")
    _check_method(method)
    # hub ids -> snapshot directories (mergekit reads those; names stay as written)
    local, aliases = resolve_recipe(data, where=where)
    config = _config(local, where, method)
    planned = _planned(config, where, trust_remote_code)
    base = config.base_model
    models = [m.model for m in config.models if m.model != base]
    names = coefficient_names_of(data)
    tasks = []
    for weight, task, dtype in planned:
        if not hasattr(task, "gather_tensors"):
            continue
        save = dtype_from_name(dtype)
        tasks.append(TensorTask(name=weight.name, task=task, save_dtype=save))
    if not tasks:
        raise UserError(f"{where}: mergekit plans no tensors")

    names, coefficients = _assign_slots(tasks, method, models, names, data)
    merge_methods.get(method)  # registered (our kernels) or a clear error from mergekit
    return Decomposition(
        method=method,
        recipe=data,
        base=base,
        models=models,
        base_path=os.path.abspath(base.model.path),
        resolved={written: path for path, written in aliases.items()},
        coefficient_names=names,
        coefficients=coefficients,
        tasks=tasks,
    )


def _config(local, where: str, method: str):
    """mergekit's MergeConfiguration of the recipe, checked for what hot-swap reads."""
    import pydantic
    from mergekit.config import MergeConfiguration

    try:
        config = MergeConfiguration.model_validate(local)
    except (pydantic.ValidationError, RuntimeError, ValueError) as error:
        first = str(error).splitlines()
        raise UserError(f"{where}: mergekit cannot parse it: {' '.join(first[:3])}") from None
    if not config.models:
        raise UserError(f"{where}: hot-swap needs a 'models:' list (not slices or modules)")
    if config.base_model is None:
        raise UserError(f"{where}: {method} needs a base_model")
    for ref in [config.base_model] + [m.model for m in config.models]:
        if ref.lora is not None:
            raise UserError(f"{where}: model {ref} has a LoRA; merge it first (hot-swap reads plain checkpoints)")
    return config


def _planned(config, where: str, trust_remote_code: bool) -> list:
    """(WeightInfo, task, save dtype name) as mergekit's planner plans them."""
    import torch  # noqa: F401  (mergekit needs it anyway)
    from mergekit.architecture import get_architecture_info
    from mergekit.io.tasks import LoaderCache
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    from mergekit_rlvr.mergekit_compat import model_out_config, planned_tensors

    options = MergeOptions(trust_remote_code=trust_remote_code, quiet=True)
    LoaderCache().setup(options)
    try:
        arch_info = get_architecture_info(config, options)
        cfg_out = model_out_config(config, arch_info, trust_remote_code)
        planner = MergePlanner(config.model_copy(deep=True), arch_info, options=options, out_model_config=cfg_out)
        return planned_tensors(planner)
    except UserError:
        raise
    except (RuntimeError, ValueError, KeyError, OSError) as error:
        raise UserError(f"{where}: mergekit cannot plan it: {str(error).splitlines()[0]}") from None


def _assign_slots(tasks: List[TensorTask], method: str, models, names: List[str], data) -> Tuple[List[str], List[float]]:
    """Coefficient names and recipe values (as mergekit resolves them for the first
    tensor of each group), and every task's slots."""
    from mergekit_rlvr import groups as grp

    meaning = coefficient(method)

    def values_of(task) -> List[float]:
        if not meaning.per_model:
            return [float(task.parameters[meaning.parameter])]
        return [float(task.input_parameters[m][meaning.parameter]) for m in models]

    layout = grp.of_recipe(data)
    if layout is None:
        for task in tasks:
            task.slots = list(range(len(names)))
        return names, values_of(tasks[0].task)
    for task in tasks:
        task.group = layout.group_of(task.name)
    present = [g for g in layout.names if any(t.group == g for t in tasks)]
    if any(t.group is None for t in tasks):
        present.append(None)
    expanded = [grp.grouped(n, g) for n in names for g in present]
    index = {name: i for i, name in enumerate(expanded)}
    values: List[Optional[float]] = [None] * len(expanded)
    for task in tasks:
        task.slots = [index[grp.grouped(n, task.group)] for n in names]
        if any(values[s] is None for s in task.slots):
            for slot, value in zip(task.slots, values_of(task.task)):
                values[slot] = value
    return expanded, [float(v) for v in values]
