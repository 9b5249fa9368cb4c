"""What a hot-swap coefficient means, asked of the merge method mergekit has registered.

Every hot-swappable method is ``theta_base + sum_j c_j v_j`` where each ``c_j`` is one
mergekit parameter of the recipe. The method names that parameter (``coefficient =
"weight"`` on our kernels; mergekit's built-in ``task_arithmetic`` on its adapter,
``kernels/task_arithmetic.py``, named in :data:`BUILT_IN`) and
mergekit's ``spec.parameters`` says the rest:

- its scope: ``NON_BASE`` = one coefficient per non-base model (named after the model),
  ``SHARED`` = one for the recipe (named after the parameter);
- its default when a recipe leaves it out (``None``: the recipe must give it);
- its range: the parameter's own validator (the same check mergekit runs when it plans).

Everything else (decompose, search, the server, HotSwapLLM) asks :func:`coefficient`;
what the hot swap builds (pre-pass, vectors, their stored form, the source models'
parameters) it asks of :func:`description`, the kernel itself.
Adding a method = a ``methods/`` module, a ``kernels/`` module with ``coefficient``, a test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

from mergekit_rlvr.errors import UserError
from mergekit_rlvr.kernels.task_arithmetic import task_arithmetic

#: mergekit's own methods that are a fixed sum of task vectors, and the adapter that
#: describes each the way our kernels describe themselves (its coefficient among it)
BUILT_IN = {"task_arithmetic": task_arithmetic}


@dataclass(frozen=True)
class Coefficient:
    method: str
    parameter: str
    per_model: bool
    default: Optional[float]
    spec: Any  # mergekit's ParameterSpec

    def check(self, value: float, name: Optional[str] = None) -> float:
        """``value`` (a finite float: :func:`vllm_plugins.rpc.check_values` checks that
        and float32's range first) through the parameter's own validator, the check
        mergekit runs when it plans; ValueError naming ``name`` (default: the parameter)."""
        from pydantic import TypeAdapter, ValidationError

        label = name or self.parameter
        number = float(value)
        try:
            return float(TypeAdapter(self.spec.value_type).validate_python(number))
        except ValidationError as error:
            message = error.errors()[0].get("msg", str(error)).removeprefix("Value error, ")
            raise ValueError(f"coefficient {label!r}: {message}") from None


def _registry():
    """mergekit's method registry with ours in it (importing it runs our import hook)."""
    from mergekit.merge_methods import registry

    from mergekit_rlvr.kernels import register_all

    register_all()
    return registry


def _registered(method: str):
    try:
        return _registry().get(method)
    except Exception:  # noqa: BLE001 - mergekit raises its own error type for unknown names
        return None


def hot_swappable() -> Tuple[str, ...]:
    """The methods whose merges the hot swap can serve, ours first."""
    registered = _registry().registered_methods()
    ours = tuple(m.spec.name for m in registered if getattr(m, "coefficient", None))
    return ours + tuple(name for name in BUILT_IN if name not in ours)


def coefficient(method: Any) -> Coefficient:
    """The coefficient of ``method``; UserError in one line when it cannot be hot-swapped."""
    found = _registered(method) if isinstance(method, str) else None
    parameter = getattr(found, "coefficient", None) or getattr(BUILT_IN.get(method), "coefficient", None)
    if found is None or parameter is None:
        raise UserError(f"merge_method {method!r} cannot be hot-swapped; supported: {', '.join(hot_swappable())}")
    spec = {p.name: p for p in found.spec.parameters}[parameter]
    default = None if spec.required else float(spec.default)
    return Coefficient(method, parameter, spec.scope.value == "non_base", default, spec)



def description(method: Any):
    """What the hot swap asks of ``method`` (its pre-pass, vectors, their stored form:
    :class:`mergekit_rlvr.kernels.base.PreparedMergeMethod`'s hot-swap interface): our
    registered kernel, or the adapter of a mergekit built-in (:data:`BUILT_IN`);
    UserError in one line when it cannot be hot-swapped."""
    coefficient(method)
    found = _registered(method)
    return found if getattr(found, "coefficient", None) else BUILT_IN[method]


def with_source_models() -> Tuple[str, ...]:
    """The methods with one coefficient per model whose recipe can be set so that
    coefficient 1 on one model serves that model itself (``source_parameters``)."""
    return tuple(m for m in hot_swappable() if description(m).source_parameters is not None)
