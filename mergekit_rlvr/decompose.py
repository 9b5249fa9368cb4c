"""A mergekit recipe as ``theta = theta_base + sum_j c_j * v_j``: fixed vectors and
named coefficients (no vLLM here).

The recipe is parsed by mergekit itself (``MergeConfiguration``) and planned by
mergekit's ``MergePlanner``, so the tensors, their input names, dtypes and every
per-tensor parameter (filters, gradients, defaults) are exactly what
``mergekit-yaml`` would use. The whole-model pre-pass (DoTS thresholds and global
gamma, SAR's Fisher files, input checks) is the mergekit kernel's own ``prepare``;
the per-tensor vectors come from the same functions in ``mergekit_rlvr.methods``
that the kernels call, so ``combine(base, vectors, coefficients)`` reproduces the
materialized merge bit for bit (dots, sar, reasoning_interp).

Coefficient names: ``dots`` and ``task_arithmetic`` have one per model, named by
the recipe's ``model:`` string, in recipe order; ``sar`` has ``scale``;
``reasoning_interp`` has ``alpha``. With ``search.groups`` (:mod:`mergekit_rlvr.groups`)
each becomes one coefficient per module group, ``name@group``.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from mergekit_rlvr.errors import UserError

SUPPORTED_METHODS = ("dots", "sar", "reasoning_interp", "task_arithmetic")

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
    method = recipe.get("merge_method")
    _check_method(method)
    if method == "sar":
        return ["scale"]
    if method == "reasoning_interp":
        return ["alpha"]
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
    method = out["merge_method"]
    if method in ("sar", "reasoning_interp"):
        params = out.get("parameters") or {}
        params[names[0]] = by_name[names[0]]
        out["parameters"] = params
        return out
    for entry in out.get("models") or []:
        name = _model_string(entry.get("model"))
        if name in by_name:
            params = entry.get("parameters") or {}
            params["weight"] = by_name[name]
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
    values = []
    for name, value in zip(names, raw):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UserError(f"coefficient {name!r} is not a number: {value!r}") from None
        if not math.isfinite(number):
            raise UserError(f"coefficient {name!r} is {number} (must be finite)")
        values.append(number)
    return values


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
    if method not in SUPPORTED_METHODS:
        raise UserError(
            f"merge_method {method!r} cannot be hot-swapped; supported: {', '.join(SUPPORTED_METHODS)}"
        )


# --------------------------------------------------------------------------- plan
@dataclass
class TensorTask:
    """One output tensor as mergekit plans it."""

    name: str
    task: Any  # mergekit ExecuteMergeMethodTask
    save_dtype: Any  # torch.dtype or None: what mergekit writes (out_dtype / force_dtype)
    slots: List[int] = field(default_factory=list)  # per vector: its coefficient's index
    group: Optional[str] = None  # search.groups group (None: ungrouped or the rest)


@dataclass
class Decomposition:
    """A recipe as fixed vectors and named coefficients (see the module docstring)."""

    method: str
    recipe: Dict[str, Any]
    config: Any  # mergekit MergeConfiguration
    base: Any  # ModelReference
    models: List[Any]  # ModelReference, one per non-base input, recipe order
    base_path: str  # local directory (a hub id's snapshot in the Hugging Face cache)
    model_paths: List[str]
    resolved: Dict[str, str]  # model string as written -> local directory, where they differ
    coefficient_names: List[str]
    coefficients: List[float]
    tasks: List[TensorTask]
    _context: Any = field(default=None, repr=False)
    _prepared: bool = field(default=False, repr=False)

    # -- public ---------------------------------------------------------------
    @property
    def tensor_names(self) -> List[str]:
        return [t.name for t in self.tasks]

    def coefficient_dict(self) -> Dict[str, float]:
        return dict(zip(self.coefficient_names, self.coefficients))

    def check_coefficients(self, coefficients) -> List[float]:
        """Validated list of coefficients in name order (UserError otherwise)."""
        values = normalize_coefficients(self.coefficient_names, coefficients)
        if self.method == "reasoning_interp":
            from mergekit_rlvr.methods.reasoning_interp import check_alpha

            for name, value in zip(self.coefficient_names, values):  # alpha, or alpha@group
                try:
                    check_alpha(value)
                except ValueError as error:
                    raise UserError(f"coefficient {name!r}: {error}") from None
        return values

    def prepare(self) -> None:
        """The whole-model pre-pass (reads every tensor once, checks inputs)."""
        if self._prepared:
            return
        first = self.tasks[0]
        group, parameters, dtype = self._group(first)
        if self.method in ("dots", "sar", "reasoning_interp"):
            kernel = _kernel(self.method)
            self._context = kernel._context([group], [parameters], [dtype])
        else:
            from mergekit_rlvr.kernels.base import stream_checkpoints

            for _ in stream_checkpoints(self.base, self.models, dtype, "task_arithmetic: checking inputs"):
                pass
        self._prepared = True

    def tensor(self, task: TensorTask) -> Tuple[Any, List[Any]]:
        """(base, vectors) of one tensor: base in the merge dtype, vectors as
        ``combine`` takes them, one per coefficient."""
        self.prepare()
        group, parameters, _dtype = self._group(task)
        return group.base.tensor, self._vectors(task, group, parameters)

    def iter_tensors(self, names: Optional[Iterable[str]] = None, progress: bool = False):
        """(task, base, vectors) for every planned tensor (or those in ``names``)."""
        wanted = None if names is None else set(names)
        tasks = [t for t in self.tasks if wanted is None or t.name in wanted]
        if progress:
            from tqdm import tqdm

            tasks = tqdm(tasks, desc=f"{self.method}: vectors", leave=False)
        for task in tasks:
            base, vectors = self.tensor(task)
            yield task, base, vectors

    def base_tensor(self, task: TensorTask):
        """The base's tensor as stored in its checkpoint (what an engine loads)."""
        t = task.task
        for key, load in t.gather_tensors.arguments().items():
            if load.model == self.base:
                value = load.model_copy(update={"dtype": None}).execute()
                if value is None:
                    raise UserError(f"base model {self.base} has no tensor {task.name}")
                return value
        raise UserError(f"tensor {task.name}: the base model is not among its inputs")

    def merged(self, task: TensorTask, coefficients=None):
        """The tensor mergekit-yaml writes for these coefficients (reference)."""
        from mergekit_rlvr.methods.common import combine

        values = self.coefficients if coefficients is None else self.check_coefficients(coefficients)
        base, vectors = self.tensor(task)
        out = combine(base, vectors, [values[i] for i in task.slots], out_dtype=base.dtype)
        return out.to(task.save_dtype) if task.save_dtype is not None else out

    # -- internals --------------------------------------------------------------
    def _group(self, task: TensorTask):
        """The TensorGroup and bound parameters exactly as mergekit's task adapter
        builds them, and the dtype the kernel aligns inputs to."""
        from mergekit.merge_methods.base import (
            ParameterScope,
            PerInputValues,
            TensorEntry,
            TensorGroup,
            TensorMetadata,
        )
        from mergekit.merge_methods.dtype import promoted_dtype
        from mergekit.merge_methods.dtype import align_dtype
        from mergekit.common import dtype_from_name
        from mergekit_rlvr.kernels.base import check_group

        t = task.task
        loads = t.gather_tensors.arguments()
        try:
            values = {key: load.execute() for key, load in loads.items()}
        except (RuntimeError, KeyError) as error:
            raise UserError(f"tensor {task.name}: {error}") from None
        tensors = t.gather_tensors.execute(**values)
        entries = tuple(
            TensorEntry(id=model, tensor=tensor, is_base=model == t.base_model)
            for model in t.model_order
            if (tensor := tensors.get(model)) is not None
        )
        if len(entries) != len(t.model_order):
            missing = [str(m) for m in t.model_order if m not in tensors]
            raise UserError(f"model {missing[0]} has no tensor {task.name}")
        group = TensorGroup(entries=entries, metadata=TensorMetadata.from_weight_info(t.output_weight))
        if not all(e.tensor.is_floating_point() for e in entries):
            raise UserError(f"tensor {task.name} is not floating point; hot-swap merges floating tensors only")
        method_spec = _spec(self.method)
        parameters = dict(t.parameters.items())
        for parameter in method_spec.input_parameters:
            inputs = entries if parameter.scope == ParameterScope.INPUT else group.non_base
            parameters[parameter.name] = PerInputValues(
                [(e.id, t.input_parameters[e.id][parameter.name]) for e in inputs]
            )
        dtype = dtype_from_name(t.dtype) or promoted_dtype(group)
        group = align_dtype(group, dtype)
        check_group(group)
        return group, parameters, dtype

    def _vectors(self, task: TensorTask, group, parameters) -> List[Any]:
        """The kernels' own ``vectors`` (what their ``merge`` combines); task_arithmetic
        is mergekit's, so its vectors are built here."""
        base = group.base.tensor
        name = group.metadata.name or ""
        entries = group.non_base
        if [e.id for e in entries] != list(self.models):
            raise UserError(f"tensor {name}: inputs {[str(e.id) for e in entries]} differ from the recipe's models")
        if self.method in ("dots", "sar", "reasoning_interp"):
            from mergekit_rlvr.methods.common import MaskedVector

            vectors, coefficients = _kernel(self.method).vectors(group, self._context, **parameters)
            self._check_weights(task, coefficients)
            # the kernels' full-shape layout, compacted for storage beside the weights (same bits)
            return [v.compact() if isinstance(v, MaskedVector) else v for v in vectors]
        # task_arithmetic: tau_j (times lambda), coefficient = weight
        from mergekit_rlvr.methods.common import task_vector

        if parameters.get("normalize"):
            raise UserError("task_arithmetic with normalize: true is not linear in the weights; set normalize: false")
        lam = float(parameters.get("lambda", 1.0))
        vectors = []
        for entry in entries:
            tau = task_vector(entry.tensor, base)
            vectors.append(tau * lam if lam != 1.0 else tau)
        self._check_weights(task, [parameters["weight"][e.id] for e in entries])
        return vectors

    def _check_weights(self, task: TensorTask, values: Sequence[float]) -> None:
        for slot, value in zip(task.slots, values):
            name, expected = self.coefficient_names[slot], self.coefficients[slot]
            if float(value) != float(expected):
                from mergekit_rlvr.groups import of_recipe

                hint = ("filters finer than search.groups, or gradients" if of_recipe(self.recipe) is not None
                        else "no filters or gradients on it; search.groups gives one per module group")
                raise UserError(
                    f"coefficient {name!r} is {value} for tensor {task.name} but {expected} elsewhere;"
                    f" hot-swap needs one value per coefficient ({hint})"
                )


def _spec(method: str):
    from mergekit import merge_methods

    return merge_methods.get(method).spec


def _kernel(method: str):
    from mergekit import merge_methods

    return merge_methods.get(method)


def decompose(recipe: RecipeLike, *, trust_remote_code: bool = False) -> Decomposition:
    """Parse and plan ``recipe`` (a path or a dict) with mergekit. Reads only
    configs and tensor indexes; vectors are computed on demand."""
    import pydantic
    import torch  # noqa: F401  (mergekit needs it anyway)
    from mergekit import merge_methods
    from mergekit.architecture import get_architecture_info
    from mergekit.common import dtype_from_name
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import _model_out_config
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    from mergekit_rlvr.hub import resolve_recipe

    where = f"recipe {recipe}" if not isinstance(recipe, Mapping) else "recipe"
    data = load_recipe(recipe)
    method = data.get("merge_method")
    _check_method(method)
    # hub ids -> snapshot directories (mergekit reads those; names stay as written)
    local, aliases = resolve_recipe(data, where=where)
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

    options = MergeOptions(trust_remote_code=trust_remote_code, quiet=True)
    LoaderCache().setup(options)
    try:
        arch_info = get_architecture_info(config, options)
        cfg_out = _model_out_config(config, arch_info, trust_remote_code=trust_remote_code)
        planner = MergePlanner(config.model_copy(deep=True), arch_info, options=options, out_model_config=cfg_out)
        planner._plan()  # what plan_to_disk / plan_in_memory plan, without the writer tasks
        planned = list(planner._tensors)
    except UserError:
        raise
    except (RuntimeError, ValueError, KeyError, OSError) as error:
        raise UserError(f"{where}: mergekit cannot plan it: {str(error).splitlines()[0]}") from None

    base = config.base_model
    models = [m.model for m in config.models if m.model != base]
    names = coefficient_names_of(data)
    tasks = []
    for weight, task in planned:
        if not hasattr(task, "gather_tensors"):
            continue
        save = dtype_from_name(weight.force_dtype or config.out_dtype)
        tasks.append(TensorTask(name=weight.name, task=task, save_dtype=save))
    if not tasks:
        raise UserError(f"{where}: mergekit plans no tensors")

    names, coefficients = _assign_slots(tasks, method, models, names, data)
    merge_methods.get(method)  # registered (our kernels) or a clear error from mergekit
    return Decomposition(
        method=method,
        recipe=data,
        config=config,
        base=base,
        models=models,
        base_path=os.path.abspath(base.model.path),
        model_paths=[os.path.abspath(m.model.path) for m in models],
        resolved={written: path for path, written in aliases.items()},
        coefficient_names=names,
        coefficients=coefficients,
        tasks=tasks,
    )


def _assign_slots(tasks: List[TensorTask], method: str, models, names: List[str], data) -> Tuple[List[str], List[float]]:
    """Coefficient names and recipe values (as mergekit resolves them for the first
    tensor of each group), and every task's slots."""
    from mergekit_rlvr import groups as grp

    def values_of(task) -> List[float]:
        if method in ("sar", "reasoning_interp"):
            return [float(task.parameters[names[0]])]
        return [float(task.input_parameters[m]["weight"]) for m in models]

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
