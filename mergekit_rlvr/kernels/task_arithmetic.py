"""mergekit's own `merge_method: task_arithmetic`, described for the hot swap.

mergekit merges ``theta_base + lambda * sum_j weight_j tau_j`` (with ``normalize:
false``). The merge stays mergekit's (nothing is registered here); this adapter
answers what the hot swap asks our kernels (:class:`mergekit_rlvr.kernels.base.PreparedMergeMethod`'s
hot-swap interface): the coefficient parameter, the pre-pass, the vectors and the form
they are stored in. :data:`mergekit_rlvr.kernels.coefficients.BUILT_IN` names it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from mergekit_rlvr.errors import UserError


class TaskArithmetic:
    #: the parameter a hot-swap coefficient sets (mergekit_rlvr.kernels.coefficients)
    coefficient = "weight"
    picklable_context = True  # no context: the pre-pass only checks the inputs
    #: lambda 1 and no normalization: coefficient 1 on one model serves theta_base + 1 * (1 * tau)
    source_parameters = ({"lambda": 1.0, "normalize": False}, {})

    def swap_context(self, group, parameters: Dict[str, Any], dtype) -> None:
        """Checks every input (shapes, finite values) before the first tensor."""
        from mergekit_rlvr.kernels.base import stream_checkpoints

        ids = [e.id for e in group.non_base]
        for _ in stream_checkpoints(group.base.id, ids, dtype, "task_arithmetic: checking inputs"):
            pass
        return None

    def swap_accumulator(self, parameters: Dict[str, Any]):
        from mergekit_rlvr.kernels.base import ChecksOnly

        return ChecksOnly()  # its pre-pass only checks the inputs, as the stream does

    def elementwise(self, context, parameters) -> bool:
        return True  # lambda * tau_j entry by entry

    def vectors(self, group, context, **parameters) -> Tuple[list, List[float]]:
        """tau_j (times lambda) per model; coefficient = its weight."""
        from mergekit_rlvr.methods.common import task_vector

        lam, weights = _scale_and_weights(group, parameters)
        base = group.base.tensor
        vectors = []
        for entry in group.non_base:
            tau = task_vector(entry.tensor, base)
            vectors.append(tau * lam if lam != 1.0 else tau)
        return vectors, weights

    def swap_vectors(self, group, context, **parameters) -> Tuple[list, List[float]]:
        """Each model's own values and lambda (tau recomputed from the base it is added to)."""
        from mergekit_rlvr.methods.common import RecomputedVector

        lam, weights = _scale_and_weights(group, parameters)
        return [RecomputedVector(e.tensor, None, lam if lam != 1.0 else None) for e in group.non_base], weights


def _scale_and_weights(group, parameters) -> Tuple[float, List[float]]:
    if parameters.get("normalize"):
        raise UserError("task_arithmetic with normalize: true is not linear in the weights; set normalize: false")
    return float(parameters.get("lambda", 1.0)), [parameters["weight"][e.id] for e in group.non_base]


task_arithmetic = TaskArithmetic()
