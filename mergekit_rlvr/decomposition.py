"""A planned recipe as fixed vectors and named coefficients, tensor by tensor
(built by :func:`mergekit_rlvr.decompose.decompose`; see its module docstring)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from mergekit_rlvr.errors import UserError
from mergekit_rlvr.recipes import normalize_coefficients


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
    base: Any  # ModelReference
    models: List[Any]  # ModelReference, one per non-base input, recipe order
    base_path: str  # local directory (a hub id's snapshot in the Hugging Face cache)
    resolved: Dict[str, str]  # model string as written -> local directory, where they differ
    coefficient_names: List[str]
    coefficients: List[float]
    tasks: List[TensorTask]
    _context: Any = field(default=None, repr=False)
    _prepared: bool = field(default=False, repr=False)
    #: [bytes read from the checkpoints for tensors, bytes of those tensors whole]
    #: (the pre-pass excluded): what reading parts (``sources_part``) saved
    read_bytes: List[int] = field(default_factory=lambda: [0, 0], repr=False)

    # -- public ---------------------------------------------------------------
    @property
    def tensor_names(self) -> List[str]:
        return [t.name for t in self.tasks]

    def coefficient_dict(self) -> Dict[str, float]:
        return dict(zip(self.coefficient_names, self.coefficients))

    def check_coefficients(self, coefficients) -> List[float]:
        """Validated list of coefficients in name order (UserError otherwise): the
        hot swap's one validator (:func:`vllm_plugins.rpc.check_values`)."""
        from vllm_plugins.rpc import check_values

        return check_values(self.method, self.coefficient_names,
                            normalize_coefficients(self.coefficient_names, coefficients))

    def prepare(self, visit: Optional[Callable[[TensorTask, Any, List[Any], bool], None]] = None) -> Set[str]:
        """The whole-model pre-pass (reads every tensor once, checks inputs): the
        method's own (``swap_context``, :func:`mergekit_rlvr.kernels.coefficients.description`).
        ``visit(task, base, vectors, exact)``: called with :meth:`sources`'s result for
        each planned tensor the pre-pass streams, where the method has an incremental
        pre-pass (``swap_accumulator``): what the hot swap's driver sizes in the same read.
        ``exact`` False: the vectors' supports hold the final ones (dots' ``sparsify:
        global``, sized in the last pass of its radix select, before its thresholds are
        known to the last bit). Returns the names visited (none when already prepared)."""
        if self._prepared:
            return set()
        group, parameters, dtype = self._group(self.tasks[0])
        method = self._described()
        accumulator = None if visit is None else method.swap_accumulator(parameters)
        visited: Set[str] = set()
        if accumulator is None:
            self._context = method.swap_context(group, parameters, dtype)
        else:
            visited = self._stream(accumulator, group, dtype, visit)
            self._context = accumulator.finish()
        self._prepared = True
        return visited

    def _stream(self, accumulator, first, dtype, visit) -> Set[str]:
        """The pre-pass tensor by tensor (the stream mergekit-yaml's kernels check), each
        planned tensor of the same dtype also handed to ``visit`` in stored form."""
        from mergekit.merge_methods.base import TensorGroup

        from mergekit_rlvr.kernels.base import stream_checkpoints
        from mergekit_rlvr.mergekit_compat import bind_parameters, merge_dtype

        tasks = {t.name: t for t in self.tasks}
        ids = [e.id for e in first.non_base]
        visited: Set[str] = set()
        method = self._described()
        more, rounds = True, 0
        while more:  # several passes where the accumulator asks (next_pass: dots' sparsify: global)
            rounds += 1
            sizing = getattr(accumulator, "sizing", True)
            label = f"{self.method}: pre-pass" + (f" {rounds}" if hasattr(accumulator, "next_pass") else "")
            for name, base, models in stream_checkpoints(first.base.id, ids, dtype, label):
                accumulator.add(name, base, models)
                task = tasks.get(name)
                if not sizing or task is None or merge_dtype(task.task) != dtype:
                    continue  # sized by a read of its own
                group = TensorGroup.from_tensors([base, *models], ids=[first.base.id, *ids], base_index=0, name=name)
                self._entries(group)
                vectors, coefficients = method.swap_vectors(group, accumulator.context(),
                                                            **bind_parameters(task.task, _spec(self.method), group))
                self._check_weights(task, coefficients)
                visit(task, base, _stored(vectors), getattr(accumulator, "exact", True))
                visited.add(name)
            more = bool(getattr(accumulator, "next_pass", lambda: False)())
        return visited

    def prepared_state(self) -> Optional[bytes]:
        """The pre-pass's small result (dots' per-tensor thresholds and norms; sar's
        Fisher stores, pickled as their paths; nothing for methods whose pre-pass only
        checks inputs), so that other processes (vLLM's workers) skip reading every
        checkpoint again; None where the method's context cannot be pickled
        (``picklable_context`` False)."""
        import pickle

        self.prepare()
        if not self._described().picklable_context:
            return None
        return pickle.dumps(self._context)

    def adopt(self, state: bytes) -> None:
        """Take ``prepared_state()`` of the same recipe, computed elsewhere (trusted:
        the driver of this engine), instead of running the pre-pass."""
        import pickle

        self._context = pickle.loads(state)
        self._prepared = True

    def tensor(self, task: TensorTask) -> Tuple[Any, List[Any]]:
        """(base, vectors) of one tensor: base in the merge dtype, vectors as
        ``combine`` takes them, one per coefficient (the method's ``vectors``)."""
        return self._vectors(task, stored=False)

    def sources(self, task: TensorTask) -> Tuple[Any, List[Any]]:
        """(base, vectors) of one tensor in the form the hot swap stores (the method's
        ``swap_vectors``): each vector a ``RecomputedVector`` (the fine-tuned model's
        own values, its mask and scalar: dots, task_arithmetic, reasoning_interp) or
        the kernel's dense float32 vector (sar). ``combine`` on them equals
        ``combine`` on :meth:`tensor`'s vectors bit for bit."""
        return self._vectors(task, stored=True)

    def sources_part(self, task: TensorTask, box, device=None) -> Tuple[Any, List[Any], Any]:
        """:meth:`sources` of ``box`` (one slice per dimension) of the tensor: where the
        method's vectors are elementwise given its pre-pass (``elementwise``), only that
        part of each checkpoint is read, and computed on ``device`` when one is given
        (elementwise float arithmetic gives the same bits on any device; elsewhere, a
        per-tensor quantile or norm, they are computed on the host as mergekit-yaml
        computes them). Returns (base, vectors, the box they cover: ``box``, or None for
        the whole tensor)."""
        elementwise = self._elementwise(task)
        if box is not None and not elementwise:
            box = None
        base, vectors = self._vectors(task, stored=True, box=box, device=device if elementwise else None)
        return base, vectors, box

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

    def base_tensor(self, task: TensorTask, box=None):
        """The base's tensor as stored in its checkpoint (what an engine loads), or only
        ``box`` of it (:func:`mergekit_rlvr.mergekit_compat.read_tensor`)."""
        from mergekit_rlvr.mergekit_compat import read_tensor

        value = read_tensor(self._base_load(task), box, self.read_bytes)
        if value is None:
            raise UserError(f"base model {self.base} has no tensor {task.name}")
        return value

    def base_info(self, task: TensorTask) -> Tuple[Tuple[int, ...], Any]:
        """(shape, dtype) of the base's tensor, from its checkpoint's header where it
        has one (nothing read), else from the tensor."""
        from mergekit_rlvr.mergekit_compat import tensor_info

        info = tensor_info(self._base_load(task))
        if info is None or info[1] is None:
            value = self.base_tensor(task)
            return tuple(value.shape), value.dtype
        return info

    def _base_load(self, task: TensorTask):
        for key, load in task.task.gather_tensors.arguments().items():
            if load.model == self.base:
                return load.model_copy(update={"dtype": None})
        raise UserError(f"tensor {task.name}: the base model is not among its inputs")

    def merged(self, task: TensorTask, coefficients=None):
        """The tensor mergekit-yaml writes for these coefficients (reference)."""
        from mergekit_rlvr.methods.common import combine

        values = self.coefficients if coefficients is None else self.check_coefficients(coefficients)
        base, vectors = self.tensor(task)
        out = combine(base, vectors, [values[i] for i in task.slots], out_dtype=base.dtype)
        return out.to(task.save_dtype) if task.save_dtype is not None else out

    # -- internals --------------------------------------------------------------
    def _group(self, task: TensorTask, box=None):
        """The TensorGroup and bound parameters exactly as mergekit's merge task
        builds them (:func:`mergekit_rlvr.mergekit_compat.merge_inputs`; ``box``: of
        that part of every input), checked."""
        from mergekit_rlvr.kernels.base import check_group
        from mergekit_rlvr.mergekit_compat import merge_inputs

        group, parameters, dtype = merge_inputs(task.task, task.name, _spec(self.method), box, self.read_bytes)
        check_group(group)
        return group, parameters, dtype

    def _elementwise(self, task: TensorTask) -> bool:
        from mergekit_rlvr.mergekit_compat import shared_parameters

        self.prepare()
        return bool(self._described().elementwise(self._context, shared_parameters(task.task)))

    def _vectors(self, task: TensorTask, stored: bool, box=None, device=None) -> Tuple[Any, List[Any]]:
        """(base, vectors) from the method's ``swap_vectors`` (``stored``) or ``vectors``
        (on ``device``, where given), each coefficient checked against the recipe's one value."""
        self.prepare()
        group, parameters, _dtype = self._group(task, box)
        if device is not None:
            from mergekit_rlvr.mergekit_compat import group_on

            group = group_on(group, device)
        self._entries(group)
        method = self._described()
        build = method.swap_vectors if stored else method.vectors
        vectors, coefficients = build(group, self._context, **parameters)
        self._check_weights(task, coefficients)
        return group.base.tensor, _stored(vectors)

    def _described(self):
        from mergekit_rlvr.kernels.coefficients import description

        return description(self.method)

    def _entries(self, group) -> None:
        entries = group.non_base
        if [e.id for e in entries] != list(self.models):
            name = group.metadata.name or ""
            raise UserError(f"tensor {name}: inputs {[str(e.id) for e in entries]} differ from the recipe's models")

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


def _stored(vectors) -> List[Any]:
    """The kernels' full-shape layout, compacted for storage beside the weights (same bits)."""
    from mergekit_rlvr.methods.common import MaskedVector

    return [v.compact() if isinstance(v, MaskedVector) else v for v in vectors]


def _spec(method: str):
    from mergekit import merge_methods

    return merge_methods.get(method).spec

