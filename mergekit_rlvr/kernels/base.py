"""What our three mergekit methods share: one pass of input checks (and any
whole-model statistics) before the first output tensor, on both entry points.

- ``mergekit-yaml`` (graph mode): the kernel sees one tensor at a time, with
  ``ModelReference`` ids. The first call streams every tensor of every model from
  disk, one tensor at a time, checks them and computes what the method needs over
  the whole model; nothing is written before that pass succeeds.
- ``merge_state_dicts`` (in memory): all tensor groups arrive in one call; the same
  pass runs over them.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Hashable, Iterator, List, Optional, Sequence, Tuple

import torch
from mergekit.merge_methods.base import GroupMergeMethod, TensorGroup
from mergekit.merge_methods.dtype import align_dtype

from mergekit_rlvr.methods.common import MergeInputError, check_finite, check_shapes

Triple = Tuple[str, torch.Tensor, List[torch.Tensor]]

_in_use = threading.Event()


def in_use() -> bool:
    """True once mergekit has planned or run a merge with one of our methods."""
    return _in_use.is_set()


def checked(name: str, check: Optional[Callable[[float], float]] = None, kind: type = float):
    """A parameter type whose validation (at mergekit's planning, before anything is
    read or written) names the parameter: ``density must be in (0, 1], got 1.5``."""
    from pydantic import BeforeValidator
    from typing_extensions import Annotated

    def validate(value):
        if isinstance(value, bool) or value is None:
            raise ValueError(f"{name} must be a number, got {value!r}")
        try:
            number = kind(value) if kind is float else int(str(value), 10)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a{'n integer' if kind is int else ' number'}, got {value!r}") from None
        return check(number) if check is not None else number

    return Annotated[kind, BeforeValidator(validate)]


def choice(name: str, options: Sequence[str]):
    from pydantic import BeforeValidator
    from typing_extensions import Annotated

    def validate(value):
        if value not in options:
            raise ValueError(f"{name} must be one of {', '.join(options)}, got {value!r}")
        return value

    return Annotated[str, BeforeValidator(validate)]


def flag(name: str):
    """A true/false parameter whose validation names it."""
    from pydantic import BeforeValidator
    from typing_extensions import Annotated

    def validate(value):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value

    return Annotated[bool, BeforeValidator(validate)]


def label(model_id: Hashable) -> str:
    return str(model_id)


def check_group(group: TensorGroup, name: Optional[str] = None) -> None:
    """Shapes match the base and every value is finite."""
    name = name or group.metadata.name or "<tensor>"
    base = group.base
    for entry in group.entries:
        what = f"model {label(entry.id)}, tensor {name}"
        if base is not None and entry is not base:
            check_shapes(base.tensor, entry.tensor, what)
        check_finite(entry.tensor, what)


def _is_graph_mode(group: TensorGroup) -> bool:
    from mergekit.common import ModelReference

    return bool(group.entries) and all(isinstance(e.id, ModelReference) for e in group.entries)


def stream_checkpoints(base_id, model_ids: Sequence, dtype: torch.dtype, desc: str) -> Iterator[Triple]:
    """(name, base, [models]) for every floating tensor of the base checkpoint, read
    one tensor at a time through mergekit's loaders, checked as it goes."""
    from mergekit.io.tasks import LoaderCache
    from tqdm import tqdm

    cache = LoaderCache()
    base_loader = cache.get(base_id)
    loaders = [cache.get(m) for m in model_ids]
    names = list(base_loader.index.tensor_paths)
    with tqdm(names, desc=desc, leave=False) as progress:
        yield from _checked_triples(progress, base_id, base_loader, model_ids, loaders, dtype)


def _checked_triples(names, base_id, base_loader, model_ids, loaders, dtype) -> Iterator[Triple]:
    for name in names:
        base = base_loader.get_tensor(name)
        if not base.is_floating_point():
            continue
        models = []
        for model_id, loader in zip(model_ids, loaders):
            if name not in loader.index.tensor_paths:
                raise MergeInputError(f"model {label(model_id)} has no tensor {name} (the base has it)")
            models.append(loader.get_tensor(name).to(dtype))
        base = base.to(dtype)
        group = TensorGroup.from_tensors([base, *models], ids=[base_id, *model_ids], base_index=0, name=name)
        check_group(group)
        yield name, base, models


def iter_groups(groups: Sequence[TensorGroup], input_dtypes) -> Iterator[Triple]:
    for group, dtype in zip(groups, input_dtypes):
        group = align_dtype(group, dtype)
        check_group(group)
        if group.base is None:
            continue
        yield group.metadata.name or "", group.base.tensor, [e.tensor for e in group.non_base]


class Passes:
    """The pre-pass's (name, base, [models]) triples, iterable more than once: each
    ``iter`` streams (and checks) every tensor again (``sparsify: global`` reads the
    checkpoints once per 16 bits of its radix select)."""

    def __init__(self, factory: Callable[[], Iterator[Triple]]):
        self.factory = factory

    def __iter__(self) -> Iterator[Triple]:
        return iter(self.factory())


class ChecksOnly:
    """The incremental pre-pass (``swap_accumulator``) of a method whose context is
    None: the stream's own checks are all its pre-pass does."""

    def add(self, name: str, base: torch.Tensor, models: List[torch.Tensor]) -> None:
        pass

    def context(self) -> Any:
        return None

    finish = context


class PreparedMergeMethod(GroupMergeMethod):
    """A group method whose ``prepare`` runs once over the whole model first.

    Subclasses define ``spec``, ``prepare(triples, parameters) -> context`` and
    ``merge(group, context, **parameters) -> Tensor``.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._graph_contexts: Dict[Any, Any] = {}

    # -- subclass interface -------------------------------------------------
    def prepare(self, triples: Iterator[Triple], parameters: Dict[str, Any]) -> Any:
        """The whole-model pre-pass: ``swap_accumulator`` fed every triple (the stream
        checks each input before anything is written). A method without an incremental
        form (``swap_accumulator`` None) overrides this."""
        accumulator = self.swap_accumulator(parameters)
        for name, base, models in triples:
            accumulator.add(name, base, models)
        return accumulator.finish()

    def context_key(self, parameters: Dict[str, Any]) -> Hashable:
        return ()

    def vectors(self, group: TensorGroup, context: Any, **parameters) -> Tuple[list, List[float]]:
        """(fixed vectors, coefficients) of one tensor: theta = base + sum_j c_j v_j.
        The one place a method's per-tensor glue lives; the hot-swap's
        decomposition calls it too."""
        raise NotImplementedError

    # -- the hot swap's interface (mergekit_rlvr.decomposition asks it) ------
    #: whether ``swap_context``'s result may be pickled to other processes (vLLM's
    #: workers adopt the driver's pre-pass instead of reading every checkpoint again)
    picklable_context = True
    #: select-queries' "source model itself": ``(shared, per_model)`` recipe parameters
    #: under which coefficient 1 on one model and 0 on the others serves that model
    #: exactly (a shared value None removes the key); None: the method has no such form
    source_parameters: Optional[Tuple[Dict[str, Any], Dict[str, Any]]] = None

    def swap_context(self, group: TensorGroup, parameters: Dict[str, Any], dtype) -> Any:
        """The whole-model pre-pass of a planned recipe (``group``: its first tensor, as
        mergekit's merge task builds it), the context ``vectors`` takes."""
        return self._context([group], [parameters], [dtype])

    def swap_accumulator(self, parameters: Dict[str, Any]) -> Any:
        """The pre-pass one tensor at a time, for the hot swap's driver: ``add(name, base,
        models)`` per streamed tensor, ``context()`` after each add already serves
        ``swap_vectors`` on the tensors added so far with their final supports (only
        scalars such as dots' gamma still change: what the swap will hold is known),
        ``finish()`` gives ``swap_context``'s result. The driver then sizes the swap in
        the pre-pass's own read. By default :class:`ChecksOnly` (the context is None);
        None: no such form (``prepare`` is overridden), a second read sizes it."""
        return ChecksOnly()

    def elementwise(self, context: Any, parameters: Dict[str, Any]) -> bool:
        """Whether ``swap_vectors`` on the same part of every input (a box of rows and
        columns) gives exactly that part of the whole tensor's vectors, given the
        pre-pass ``context``: then a tensor-parallel rank reads only its shard's part of
        each checkpoint. False by default (a per-tensor quantile, a rank, a norm)."""
        return False

    def swap_vectors(self, group: TensorGroup, context: Any, **parameters) -> Tuple[list, List[float]]:
        """``vectors`` in the form the hot swap stores (``combine`` on them equals
        ``combine`` on ``vectors`` bit for bit); by default ``vectors`` themselves."""
        return self.vectors(group, context, **parameters)

    def merge(self, group: TensorGroup, context: Any, **parameters) -> torch.Tensor:
        from mergekit_rlvr.methods.common import combine

        vectors, coefficients = self.vectors(group, context, **parameters)
        base = group.base.tensor
        return combine(base, vectors, coefficients, out_dtype=base.dtype)

    # -- mergekit interface -------------------------------------------------
    def validate_inputs(self, input_ids, base_id=None, *, group_name=None) -> None:
        _in_use.set()
        super().validate_inputs(input_ids, base_id, group_name=group_name)

    def merge_group(self, group: TensorGroup, /, **parameters) -> torch.Tensor:
        context = self._context([group], [parameters], [None])
        check_group(group)
        return self.merge(group, context, **parameters)

    def _context(self, groups, parameters, input_dtypes) -> Any:
        first = groups[0]
        if _is_graph_mode(first) and len(groups) == 1 and first.base is not None:
            dtype = input_dtypes[0] or first.entries[0].tensor.dtype
            ids = [e.id for e in first.non_base]
            key = (first.base.id, tuple(ids), dtype, self.context_key(parameters[0]))
            with self._lock:
                if key not in self._graph_contexts:
                    triples = Passes(lambda: stream_checkpoints(first.base.id, ids, dtype,
                                                                f"{self.spec.name}: checking inputs"))
                    self._graph_contexts[key] = self.prepare(triples, parameters[0])
                return self._graph_contexts[key]
        return self.prepare(Passes(lambda: iter_groups(groups, input_dtypes)), parameters[0])

    def _execute(self, groups, parameters, options, *, input_dtypes, out_dtype=None):
        groups = tuple(groups)
        if not groups:
            return ()
        context = self._context(groups, parameters, input_dtypes)
        results = []
        for group, kwargs, dtype in zip(groups, parameters, input_dtypes):
            group = align_dtype(group, dtype)
            with torch.autocast(device_type=group.entries[0].tensor.device.type, enabled=False):
                result = self.merge(group, context, **kwargs)
            results.append(result.to(dtype=out_dtype) if out_dtype is not None else result)
            del group, result
        return tuple(results)
