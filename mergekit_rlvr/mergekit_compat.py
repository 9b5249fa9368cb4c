"""The one module that reaches into mergekit's internals.

mergekit-rlvr is tested with the mergekit versions in ``TESTED``. The hot swap needs
mergekit's plan of a recipe and, per tensor, the inputs and parameters its merge
method is called with (not the merged tensor that the public ``plan_in_memory``
tasks return). Everything here says what in mergekit it mirrors; where another
mergekit version moved it, the error is one line naming the versions.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

from mergekit_rlvr.errors import UserError

TESTED = ("0.1.5",)


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("mergekit")
    except PackageNotFoundError:
        return "unknown"


def _moved(what: str, error: Exception) -> UserError:
    return UserError(f"mergekit {version()}: {what} is not what mergekit {', '.join(TESTED)} has ({error}); "
                     f"install mergekit=={TESTED[-1]}, the version mergekit-rlvr is tested with")


def model_out_config(config, arch_info, trust_remote_code: bool):
    """The merged model's config as ``mergekit-yaml`` builds it (``mergekit.merge._model_out_config``)."""
    try:
        from mergekit.merge import _model_out_config
    except ImportError as error:
        raise _moved("mergekit.merge._model_out_config", error) from None
    return _model_out_config(config, arch_info, trust_remote_code=trust_remote_code)


def planned_tensors(planner) -> List[Tuple[Any, Any, Any]]:
    """(WeightInfo, tensor task, save dtype name) per output tensor.

    mergekit's public way is ``MergePlanner.plan_in_memory()`` (``ReturnTensor``
    tasks; what its ``evo/actors.py`` merges into a live model). In mergekit 0.1.5 it
    raises for every recipe: ``ReturnTensor.tensor_task`` is typed ``Task[Tensor]``
    and pydantic refuses the planner's own ``ExecuteMergeMethodTask``
    (``Task[Optional[Tensor]]``) with "Can't instantiate abstract class", after it
    has planned. Then the plan is read from the planner (``_tensors``), with the
    dtype ``plan_in_memory`` would give."""
    try:
        return [(r.weight_info, r.tensor_task, r.dtype) for r in planner.plan_in_memory()]
    except TypeError as error:
        if "abstract class" not in str(error):
            raise
    try:  # plan_in_memory planned before it raised: the plan is complete
        planned = list(planner._tensors)
    except AttributeError as error:
        raise _moved("MergePlanner's plan (plan_in_memory fails and _plan/_tensors are gone)", error) from None
    return [(w, t, w.force_dtype or planner.config.out_dtype) for w, t in planned]


def merge_inputs(task, name: str, spec, box: Optional["Box"] = None,
                 tally: Optional[List[int]] = None) -> Tuple[Any, dict, Any]:
    """(TensorGroup, bound parameters, dtype) that mergekit 0.1.5's
    ``ExecuteMergeMethodTask.execute`` hands to the method for ``task``: its
    gathered inputs in model order, the shared parameters and the per-input ones
    (``spec.input_parameters``) as ``PerInputValues``, aligned to the method's dtype.
    ``box``: only that part of every input (:func:`read_tensor`; ``tally``: bytes read)."""
    from mergekit.common import dtype_from_name
    from mergekit.merge_methods.base import TensorEntry, TensorGroup, TensorMetadata
    from mergekit.merge_methods.dtype import align_dtype, promoted_dtype

    try:
        loads = task.gather_tensors.arguments()
        order, base, weight = task.model_order, task.base_model, task.output_weight
    except AttributeError as error:
        raise _moved("the merge task's inputs (ExecuteMergeMethodTask)", error) from None
    try:
        values = {key: read_tensor(load, box, tally) for key, load in loads.items()}
    except (RuntimeError, KeyError) as error:
        raise UserError(f"tensor {name}: {error}") from None
    tensors = task.gather_tensors.execute(**values)
    entries = tuple(TensorEntry(id=model, tensor=tensor, is_base=model == base)
                    for model in order if (tensor := tensors.get(model)) is not None)
    if len(entries) != len(order):
        missing = [str(m) for m in order if m not in tensors]
        raise UserError(f"model {missing[0]} has no tensor {name}")
    group = TensorGroup(entries=entries, metadata=TensorMetadata.from_weight_info(weight))
    if not all(e.tensor.is_floating_point() for e in entries):
        raise UserError(f"tensor {name} is not floating point; hot-swap merges floating tensors only")
    dtype = dtype_from_name(task.dtype) or promoted_dtype(group)
    return align_dtype(group, dtype), bind_parameters(task, spec, group), dtype


def group_on(group, device):
    """``group`` (a mergekit TensorGroup) with every input's tensor on ``device``."""
    from mergekit.merge_methods.base import TensorEntry, TensorGroup

    entries = tuple(TensorEntry(id=e.id, tensor=e.tensor.to(device), is_base=e.is_base) for e in group.entries)
    return TensorGroup(entries=entries, metadata=group.metadata)


def bind_parameters(task, spec, group) -> dict:
    """The parameters ``ExecuteMergeMethodTask.execute`` binds for ``group``'s inputs: the
    shared ones, and the per-input ones (``spec.input_parameters``) as ``PerInputValues``."""
    from mergekit.merge_methods.base import ParameterScope, PerInputValues

    parameters = shared_parameters(task)
    try:
        for parameter in spec.input_parameters:
            inputs = group.entries if parameter.scope == ParameterScope.INPUT else group.non_base
            parameters[parameter.name] = PerInputValues([(e.id, task.input_parameters[e.id][parameter.name])
                                                         for e in inputs])
    except AttributeError as error:
        raise _moved("the merge task's per-input parameters (ExecuteMergeMethodTask.input_parameters)", error) from None
    return parameters


def merge_dtype(task) -> Optional[Any]:
    """The dtype :func:`merge_inputs` aligns a merge task's inputs to (the task's, else
    the promotion of its loads' dtypes: the recipe's ``dtype``, else each checkpoint
    header's), known without reading them; None where a header does not tell."""
    import torch
    from mergekit.common import dtype_from_name

    dtype = dtype_from_name(getattr(task, "dtype", None))
    if dtype is not None:
        return dtype
    for load in task.gather_tensors.arguments().values():
        own = dtype_from_name(load.dtype) if load.dtype else (tensor_info(load) or (None, None))[1]
        if own is None:
            return None
        dtype = own if dtype is None else torch.promote_types(dtype, own)
    return dtype


def shared_parameters(task) -> dict:
    """The shared (not per-input) parameters of a merge task, as :func:`merge_inputs`
    binds them, without reading any tensor."""
    try:
        return dict(task.parameters.items())
    except AttributeError as error:
        raise _moved("the merge task's parameters (ExecuteMergeMethodTask.parameters)", error) from None


# -- reading part of a tensor (a tensor-parallel rank's shard) ---------------------------
Box = Tuple[slice, ...]  # one slice per dimension


def _safetensors_file(load) -> Tuple[Any, Any]:
    """(safetensors file, tensor name) that ``LoadTensor.execute`` would read
    ``load.tensor`` from (its name, aliases or tied names, in that order), or
    (None, None) where it reads otherwise (a pickled checkpoint, a converted tensor)."""
    import os

    try:
        from mergekit.io.tasks import LoaderCache

        index = LoaderCache().get(load.model).index
        names = [load.tensor, *(load.aliases or ()), *(load.tied_names or ())]
        found = next((n for n in names if n in index.tensor_paths), None)
    except (ImportError, AttributeError) as error:
        raise _moved("LoadTensor's loader index (LoaderCache().get(model).index.tensor_paths)", error) from None
    if found is None or not index.tensor_paths[found].endswith(".safetensors"):
        return None, None
    return os.path.join(index.base_path, index.tensor_paths[found]), found


def tensor_info(load) -> Optional[Tuple[Tuple[int, ...], Any]]:
    """(shape, dtype) of the tensor ``load`` reads, from the safetensors header (nothing
    read); None where it is not a plain safetensors tensor."""
    from safetensors import safe_open

    path, name = _safetensors_file(load)
    if path is None:
        return None
    with safe_open(path, framework="pt") as handle:
        part = handle.get_slice(name)
        shape, dtype = tuple(part.get_shape()), part.get_dtype()
    import torch

    return shape, getattr(torch, _SAFETENSORS_DTYPES.get(dtype, ""), None)


def read_tensor(load, box: Optional[Box] = None, tally: Optional[List[int]] = None):
    """``LoadTensor.execute()``, or only ``box`` of it: a slice of a safetensors tensor
    read from the file (safetensors' ``get_slice``), converted to ``load.dtype`` as
    mergekit converts. Where the tensor is not a plain safetensors one, the whole
    tensor is read and sliced. ``tally``: ``[bytes read, bytes of the whole tensors]``,
    grown by this read."""
    from mergekit.common import dtype_from_name
    from safetensors import safe_open

    path = name = None
    if box is not None:
        path, name = _safetensors_file(load)
    if path is None:
        x = load.execute()
        if x is not None and tally is not None:
            read = _stored_bytes(load, x)
            tally[0] += read
            tally[1] += read
        return x if x is None or box is None else x[box]
    with safe_open(path, framework="pt") as handle:
        part = handle.get_slice(name)
        x = part[box]
    if tally is not None:
        tally[0] += x.numel() * x.element_size()
        tally[1] += math.prod(part.get_shape()) * x.element_size()
    if load.dtype and (dtype := dtype_from_name(load.dtype)) != x.dtype:
        x = x.to(dtype=dtype)
    return x.to(load.device or "cpu")


def _stored_bytes(load, x) -> int:
    """The bytes ``x`` (``load``'s tensor, converted to ``load.dtype``) takes in its file."""
    info = tensor_info(load) if load.dtype else None
    if info is None or info[1] is None:
        return x.numel() * x.element_size()
    return x.numel() * info[1].itemsize


_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
