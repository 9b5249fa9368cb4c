"""`merge_method: reasoning_interp` (paper 003): theta = (1 - alpha) theta_M + alpha theta_SFT."""

from __future__ import annotations

import torch
from mergekit.merge_methods.base import BasePolicy, InputContract, MergeMethodSpec
from mergekit.merge_methods.base import ParameterScope, ParameterSpec, TensorGroup

from mergekit_rlvr.kernels.base import ChecksOnly, PreparedMergeMethod, checked
from mergekit_rlvr.methods.common import RecomputedVector
from mergekit_rlvr.methods.reasoning_interp import DEFAULT_ALPHA, check_alpha, interp_vector


class ReasoningInterpMerge(PreparedMergeMethod):
    #: the parameter a hot-swap coefficient sets (mergekit_rlvr.kernels.coefficients)
    coefficient = "alpha"
    spec = MergeMethodSpec(
        name="reasoning_interp",
        pretty_name="Reasoning interpolation (reasoning model and its SFT variant)",
        contract=InputContract(base=BasePolicy.REQUIRED, min_inputs=2, max_inputs=2, min_non_base=1, max_non_base=1),
        parameters=(
            ParameterSpec("alpha", checked("alpha", check_alpha), ParameterScope.SHARED, default=DEFAULT_ALPHA),
        ),
    )

    def swap_accumulator(self, parameters):
        check_alpha(parameters["alpha"])
        return ChecksOnly()

    def vectors(self, group: TensorGroup, context, *, alpha):
        (sft,) = group.non_base
        return [interp_vector(group.base.tensor, sft.tensor)], [check_alpha(alpha)]

    def elementwise(self, context, parameters) -> bool:
        return True  # tau = theta_SFT - theta_M entry by entry

    def swap_vectors(self, group: TensorGroup, context, *, alpha):
        """The hot swap's storage form: the SFT model's own values (``interp_vector``,
        tau = theta_SFT - theta_M, is recomputed from the base it is added to)."""
        (sft,) = group.non_base
        return [RecomputedVector(sft.tensor)], [check_alpha(alpha)]


reasoning_interp_merge = ReasoningInterpMerge()
