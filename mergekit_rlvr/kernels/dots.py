"""`merge_method: dots` (paper 000): thin adapter over mergekit_rlvr.methods.dots."""

from __future__ import annotations

from typing import Any, Dict

import torch
from mergekit.merge_methods.base import BasePolicy, InputContract, MergeMethodSpec
from mergekit.merge_methods.base import ParameterScope, ParameterSpec, TensorGroup

from mergekit_rlvr.kernels.base import ChecksOnly, PreparedMergeMethod, checked, choice, label
from mergekit_rlvr.methods.common import MaskedVector, RecomputedVector, task_vector
from mergekit_rlvr.methods.dots import (
    DEFAULT_DENSITY,
    RESCALE_MODES,
    DotsStats,
    SPARSIFY_MODES,
    check_density,
    check_rescale,
    check_sparsify,
    dots_masked_vector,
    gamma_from_norms,
    squared_norms,
)
from mergekit_rlvr.methods.dots_global import GlobalSelection, dots_global_stats


class DotsMerge(PreparedMergeMethod):
    #: the parameter a hot-swap coefficient sets (mergekit_rlvr.kernels.coefficients)
    coefficient = "weight"
    #: density 1 keeps every entry and no rescale keeps gamma 1 (global or per tensor:
    #: the same at density 1), so coefficient 1 on one model serves theta_base + tau_i
    source_parameters = ({"density": 1.0, "rescale": "none", "sparsify": None}, {"density": 1.0})
    spec = MergeMethodSpec(
        name="dots",
        pretty_name="DoTS (sparsified, norm-rescaled task vectors)",
        reference_url="https://arxiv.org/abs/2605.00610",
        contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
        parameters=(
            ParameterSpec("weight", checked("weight"), ParameterScope.NON_BASE),
            ParameterSpec("density", checked("density", check_density), ParameterScope.NON_BASE,
                          default=DEFAULT_DENSITY),
            ParameterSpec("rescale", choice("rescale", RESCALE_MODES), ParameterScope.SHARED, default="global"),
            # tensor: top p of each tensor (authors' code); global: one quantile of the whole model (Eq. 2)
            ParameterSpec("sparsify", choice("sparsify", SPARSIFY_MODES), ParameterScope.SHARED, default="tensor"),
        ),
    )

    def _densities(self, ids, density) -> list:
        return [check_density(density[i], f"density of model {label(i)}") for i in ids]

    def context_key(self, parameters: Dict[str, Any]):
        density = parameters["density"]
        return (check_rescale(parameters["rescale"]), check_sparsify(parameters.get("sparsify", "tensor")),
                tuple(float(density[i]) for i in density))

    def prepare(self, triples, parameters):
        if check_sparsify(parameters.get("sparsify", "tensor")) == "global":  # no incremental form
            return dots_global_stats(triples, self._checked(parameters))
        return super().prepare(triples, parameters)

    def swap_accumulator(self, parameters):
        """Per-tensor top p: the thresholds and norms tensor by tensor (``DotsStats.add``);
        with rescale none or tensor the context is None. ``sparsify: global``: the radix
        select's passes (:class:`_GlobalAccumulator`), sized in the last one."""
        densities = self._checked(parameters)
        if check_sparsify(parameters.get("sparsify", "tensor")) == "global":
            return _GlobalAccumulator(densities)
        return _Accumulator(densities) if check_rescale(parameters["rescale"]) == "global" else ChecksOnly()

    def _checked(self, parameters) -> list:
        """The densities, after checking rescale and that every model has a weight (before
        any tensor is read)."""
        check_rescale(parameters["rescale"])
        ids = list(parameters["density"])
        densities = self._densities(ids, parameters["density"])
        for i in ids:
            parameters["weight"][i]
        return densities

    def vectors(self, group: TensorGroup, context, *, weight, density, rescale, sparsify="tensor"):
        base = group.base.tensor
        name = group.metadata.name or ""
        vectors, coefficients = [], []
        for index, entry in enumerate(group.non_base):
            d = check_density(density[entry.id], f"density of model {label(entry.id)}")
            gamma = threshold = None
            if context is not None:
                gamma = context.gamma(index, rescale)
                threshold = context.threshold(index, name)
            vectors.append(dots_masked_vector(base, entry.tensor, d, rescale, gamma=gamma, threshold=threshold))
            coefficients.append(weight[entry.id])
        return vectors, coefficients

    def elementwise(self, context, parameters) -> bool:
        """With the pre-pass's thresholds (and gamma) a mask entry is ``|tau| >= t``;
        without them (rescale none or tensor, per-tensor top p) each tensor's own
        quantile or norm is needed."""
        return context is not None and check_rescale(parameters["rescale"]) != "tensor"

    def swap_vectors(self, group: TensorGroup, context, **parameters):
        """The hot swap's storage form: each model's own values, its mask and gamma
        (``RecomputedVector``; tau is recomputed from the base it is added to)."""
        vectors, coefficients = self.vectors(group, context, **parameters)
        return _stored(group, context, vectors, parameters["rescale"]), coefficients


dots_merge = DotsMerge()


class _Accumulator:
    def __init__(self, densities):
        self.densities = list(densities)
        self.stats = DotsStats.empty(len(self.densities))

    def add(self, name, base, models) -> None:
        self.stats.add(name, base, models, self.densities)

    def context(self) -> DotsStats:
        return self.stats

    finish = context


class _GlobalAccumulator:
    """``sparsify: global`` one streamed tensor at a time, over several passes
    (``next_pass``). In the last pass (``sizing``) ``context()`` holds each model's
    lower bound of its threshold (:meth:`GlobalSelection.bounds`: masks that keep
    every entry the final ones keep, and only those where ``exact``) and gamma 1
    (a scalar: it changes no support), so the driver sizes the swap in that read: an
    upper bound for the tensors not ``exact``."""

    def __init__(self, densities):
        self.selection = GlobalSelection(densities)

    def add(self, name, base, models) -> None:
        self.selection.add(name, base, models)

    @property
    def sizing(self) -> bool:
        return self.selection.final

    @property
    def exact(self) -> bool:
        """Whether the tensor just added has no entry between a bound and its threshold."""
        return not self.selection.open

    def context(self) -> DotsStats:
        stats = self.selection.stats()
        return DotsStats(stats.thresholds, stats.full_sq, list(stats.full_sq), self.selection.bounds())

    def next_pass(self) -> bool:
        return self.selection.next_pass()

    def finish(self) -> DotsStats:
        return self.selection.stats()


def _stored(group: TensorGroup, context, vectors, rescale: str) -> list:
    """Each model's own values, its mask and the scalar ``dots_masked_vector``
    multiplied tau by (None: rescale none)."""
    base = group.base.tensor
    out = []
    for index, (entry, vector) in enumerate(zip(group.non_base, vectors)):
        assert isinstance(vector, MaskedVector)
        if rescale == "none":
            gamma = None
        elif rescale == "tensor":
            gamma = gamma_from_norms(*squared_norms(task_vector(entry.tensor, base), vector.mask))
        else:
            gamma = context.gamma(index, rescale)
        out.append(RecomputedVector(entry.tensor, vector.mask, gamma))
    return out
