"""A planned recipe as fixed vectors and named coefficients, tensor by tensor
(built by :func:`mergekit_rlvr.decompose.decompose`; see its module docstring)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

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
        """Validated list of coefficients in name order (UserError otherwise): the
        hot swap's one validator (:func:`vllm_plugins.rpc.check_values`)."""
        from vllm_plugins.rpc import check_values

        return check_values(self.method, self.coefficient_names,
                            normalize_coefficients(self.coefficient_names, coefficients))

    def prepare(self) -> None:
        """The whole-model pre-pass (reads every tensor once, checks inputs)."""
        if self._prepared:
            return
        first = self.tasks[0]
        group, parameters, dtype = self._group(first)
        if _ours(self.method):
            kernel = _kernel(self.method)
            self._context = kernel._context([group], [parameters], [dtype])
        else:
            from mergekit_rlvr.kernels.base import stream_checkpoints

            for _ in stream_checkpoints(self.base, self.models, dtype, "task_arithmetic: checking inputs"):
                pass
        self._prepared = True

    def prepared_state(self) -> Optional[bytes]:
        """The pre-pass's small result (dots' per-tensor thresholds and norms; nothing
        for reasoning_interp and task_arithmetic, whose pre-pass only checks inputs),
        so that other processes (vLLM's workers) skip reading every checkpoint again;
        None for sar (its Fisher stores are files each process opens itself)."""
        import pickle

        self.prepare()
        if self.method == "sar":
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
        ``combine`` takes them, one per coefficient."""
        self.prepare()
        group, parameters, _dtype = self._group(task)
        return group.base.tensor, self._vectors(task, group, parameters)

    def sources(self, task: TensorTask) -> Tuple[Any, List[Any]]:
        """(base, vectors) of one tensor in the form the hot swap stores: each
        vector a ``RecomputedVector`` (the fine-tuned model's own values, its mask
        and scalar: dots, task_arithmetic, reasoning_interp) or the kernel's dense
        float32 vector (sar). ``combine`` on them equals ``combine`` on
        :meth:`tensor`'s vectors bit for bit."""
        self.prepare()
        group, parameters, _dtype = self._group(task)
        base = group.base.tensor
        if self.method == "sar":
            return base, self._vectors(task, group, parameters)
        from mergekit_rlvr.methods.common import MaskedVector, RecomputedVector

        entries = self._entries(group)
        models = [e.tensor for e in entries]
        if self.method == "task_arithmetic":
            lam = self._task_arithmetic_lambda(task, entries, parameters)
            return base, [RecomputedVector(m, None, lam if lam != 1.0 else None) for m in models]
        vectors, coefficients = _kernel(self.method).vectors(group, self._context, **parameters)
        self._check_weights(task, coefficients)
        if self.method == "reasoning_interp":
            return base, [RecomputedVector(models[0])]
        out = []
        for index, (model, vector) in enumerate(zip(models, vectors)):
            assert isinstance(vector, MaskedVector)
            out.append(RecomputedVector(model, vector.mask, self._dots_gamma(index, base, model, vector.mask,
                                                                           parameters)))
        return base, out

    def _dots_gamma(self, index: int, base, model, mask, parameters) -> Optional[float]:
        """The scalar the dots kernel multiplies tau by (``dots_masked_vector``)."""
        from mergekit_rlvr.methods.common import task_vector
        from mergekit_rlvr.methods.dots import gamma_from_norms, squared_norms

        rescale = parameters["rescale"]
        if rescale == "none":
            return None
        if rescale == "tensor":
            return gamma_from_norms(*squared_norms(task_vector(model, base), mask))
        return self._context.gamma(index, rescale)

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
        """The TensorGroup and bound parameters exactly as mergekit's merge task
        builds them (:func:`mergekit_rlvr.mergekit_compat.merge_inputs`), checked."""
        from mergekit_rlvr.kernels.base import check_group
        from mergekit_rlvr.mergekit_compat import merge_inputs

        group, parameters, dtype = merge_inputs(task.task, task.name, _spec(self.method))
        check_group(group)
        return group, parameters, dtype

    def _vectors(self, task: TensorTask, group, parameters) -> List[Any]:
        """The kernels' own ``vectors`` (what their ``merge`` combines); task_arithmetic
        is mergekit's, so its vectors are built here."""
        base = group.base.tensor
        entries = self._entries(group)
        if _ours(self.method):
            from mergekit_rlvr.methods.common import MaskedVector

            vectors, coefficients = _kernel(self.method).vectors(group, self._context, **parameters)
            self._check_weights(task, coefficients)
            # the kernels' full-shape layout, compacted for storage beside the weights (same bits)
            return [v.compact() if isinstance(v, MaskedVector) else v for v in vectors]
        # task_arithmetic: tau_j (times lambda), coefficient = weight
        from mergekit_rlvr.methods.common import task_vector

        lam = self._task_arithmetic_lambda(task, entries, parameters)
        vectors = []
        for entry in entries:
            tau = task_vector(entry.tensor, base)
            vectors.append(tau * lam if lam != 1.0 else tau)
        return vectors

    def _entries(self, group):
        entries = group.non_base
        if [e.id for e in entries] != list(self.models):
            name = group.metadata.name or ""
            raise UserError(f"tensor {name}: inputs {[str(e.id) for e in entries]} differ from the recipe's models")
        return entries

    def _task_arithmetic_lambda(self, task: TensorTask, entries, parameters) -> float:
        if parameters.get("normalize"):
            raise UserError("task_arithmetic with normalize: true is not linear in the weights; set normalize: false")
        self._check_weights(task, [parameters["weight"][e.id] for e in entries])
        return float(parameters.get("lambda", 1.0))

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


def _ours(method: str) -> bool:
    """A method of ours (its kernel has a whole-model pre-pass and ``vectors``), not mergekit's own."""
    from mergekit_rlvr.kernels.base import PreparedMergeMethod

    return isinstance(_kernel(method), PreparedMergeMethod)


def _kernel(method: str):
    from mergekit import merge_methods

    return merge_methods.get(method)
