"""The one module that reaches into mergekit's internals.

mergekit-rlvr is tested with the mergekit versions in ``TESTED``. The hot swap needs
mergekit's plan of a recipe and, per tensor, the inputs and parameters its merge
method is called with (not the merged tensor that the public ``plan_in_memory``
tasks return). Everything here says what in mergekit it mirrors; where another
mergekit version moved it, the error is one line naming the versions.
"""

from __future__ import annotations

from typing import Any, List, Tuple

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


def merge_inputs(task, name: str, spec) -> Tuple[Any, dict, Any]:
    """(TensorGroup, bound parameters, dtype) that mergekit 0.1.5's
    ``ExecuteMergeMethodTask.execute`` hands to the method for ``task``: its
    gathered inputs in model order, the shared parameters and the per-input ones
    (``spec.input_parameters``) as ``PerInputValues``, aligned to the method's dtype."""
    from mergekit.common import dtype_from_name
    from mergekit.merge_methods.base import ParameterScope, PerInputValues, TensorEntry, TensorGroup, TensorMetadata
    from mergekit.merge_methods.dtype import align_dtype, promoted_dtype

    try:
        loads = task.gather_tensors.arguments()
        order, base, weight = task.model_order, task.base_model, task.output_weight
    except AttributeError as error:
        raise _moved("the merge task's inputs (ExecuteMergeMethodTask)", error) from None
    try:
        values = {key: load.execute() for key, load in loads.items()}
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
    parameters = dict(task.parameters.items())
    for parameter in spec.input_parameters:
        inputs = entries if parameter.scope == ParameterScope.INPUT else group.non_base
        parameters[parameter.name] = PerInputValues([(e.id, task.input_parameters[e.id][parameter.name])
                                                     for e in inputs])
    dtype = dtype_from_name(task.dtype) or promoted_dtype(group)
    return align_dtype(group, dtype), parameters, dtype
