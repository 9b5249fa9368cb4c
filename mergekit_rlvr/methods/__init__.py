"""The merge methods' math: pure functions on tensors, no I/O.

Every method reduces to ``theta = theta_base + sum_j c_j * v_j``: fixed vectors
``v_j`` computed once from the checkpoints and scalar coefficients ``c_j``. The
mergekit kernels (``mergekit_rlvr.kernels``), the vLLM hot-swap
(``vllm_plugins``) and the analysis call these functions, and all of them build
the final weight with :func:`combine`, so a served merge equals the materialized
one bit for bit.
"""

from mergekit_rlvr.methods.common import (
    MergeInputError,
    SparseVector,
    Vector,
    combine,
    task_vector,
)

__all__ = ["MergeInputError", "SparseVector", "Vector", "combine", "task_vector"]
