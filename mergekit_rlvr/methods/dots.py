"""DoTS (paper 000, Sec. 4.1, Eq. 2, 3, 6): top-k magnitude sparsification of each
task vector, norm-preserving rescale, then theta_base + sum_i lambda_i * tau~_i.

The sparsified vectors are ``SparseVector``s; ``lambda_i`` are the coefficients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from mergekit_rlvr.methods.common import MaskedVector, MergeInputError, SparseVector, task_vector

RESCALE_MODES = ("global", "tensor", "none")
#: ``tensor``: the top p of each tensor (the authors' code and the paper's results);
#: ``global``: one quantile of the whole task vector, Eq. 2 as the paper writes it
SPARSIFY_MODES = ("tensor", "global")
DEFAULT_DENSITY = 0.3
#: epsilon of Eq. 3, gamma = ||tau|| / (||sparse tau|| + eps)
GAMMA_EPS = 1e-8


def check_density(density: float, what: str = "density") -> float:
    density = float(density)
    if not (0.0 < density <= 1.0) or math.isnan(density):
        raise MergeInputError(f"{what} must be in (0, 1], got {density}")
    return density


def check_sparsify(sparsify: str) -> str:
    if sparsify not in SPARSIFY_MODES:
        raise MergeInputError(f"sparsify must be one of {', '.join(SPARSIFY_MODES)}, got {sparsify!r}")
    return sparsify


def check_rescale(rescale: str) -> str:
    if rescale not in RESCALE_MODES:
        raise MergeInputError(f"rescale must be one of {', '.join(RESCALE_MODES)}, got {rescale!r}")
    return rescale


def keep_count(numel: int, density: float) -> int:
    """Entries kept: int(density * n), as the issue and the authors' code count them."""
    return int(density * numel)


def magnitude_threshold(tau: torch.Tensor, density: float) -> float:
    """The k-th largest |tau| with k = int(density * n); entries with |tau| >= it are
    kept (ties at the threshold are kept). inf keeps nothing, -inf keeps all."""
    n = tau.numel()
    k = keep_count(n, density)
    if k <= 0:
        return math.inf
    if k >= n:
        return -math.inf
    flat = tau.detach().reshape(-1).abs()
    return float(kth_smallest(flat, n - k + 1))


def kth_smallest(values: torch.Tensor, rank: int) -> torch.Tensor:
    """The exact ``rank``-th smallest (1-based) of non-negative finite values.

    float32: a radix select on the IEEE bits (monotonic for non-negative floats):
    one histogram of the high 16 bits finds the bucket holding the rank, and an
    exact kthvalue runs on that bucket only, several times faster than a full
    kthvalue on large tensors. Other dtypes use kthvalue directly."""
    if values.dtype != torch.float32 or values.numel() < 65536:
        return torch.kthvalue(values, rank).values
    high = values.view(torch.int32) >> 16
    counts = torch.bincount(high, minlength=1 << 15)
    cumulative = counts.cumsum(0)
    bucket = int(torch.searchsorted(cumulative, torch.tensor(rank, dtype=cumulative.dtype)))
    below = int(cumulative[bucket - 1]) if bucket > 0 else 0
    candidates = values[high == bucket]
    return torch.kthvalue(candidates, rank - below).values


def keep_mask(tau: torch.Tensor, threshold: float) -> torch.Tensor:
    """Eq. 2's mask for a precomputed threshold: |tau| >= threshold (ties kept)."""
    if threshold == -math.inf:
        return torch.ones(tau.shape, dtype=torch.bool, device=tau.device)
    return tau.abs() >= threshold


def sparsify(tau: torch.Tensor, threshold: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mask, kept values) of Eq. 2 for a precomputed threshold."""
    mask = keep_mask(tau, threshold)
    return mask, tau[mask]


def squared_norms(tau: torch.Tensor, mask: torch.Tensor) -> Tuple[float, float]:
    """(||tau||^2, ||tau[mask]||^2): the squares of float32/bfloat16 entries are
    exact in float64 and summed in float64 (one widening and a dot product, about
    half the cost of vector_norm).

    Always summed on the CPU: a sum's rounding depends on its order, which differs
    between devices, and gamma must be the same bits wherever the merge runs
    (``mergekit-yaml --cuda`` equals the CPU merge). Under the default
    ``rescale: global`` these norms come from the pre-pass, which reads the
    checkpoints on the CPU anyway; only ``rescale: tensor`` copies a device
    tensor here."""
    if tau.device.type != "cpu":
        tau, mask = tau.cpu(), mask.cpu()
    wide = tau.detach().reshape(-1).to(torch.float64, copy=True)
    kept = wide[mask.reshape(-1)]
    return sum_of_squares(wide), sum_of_squares(kept)


#: entries per row of :func:`sum_of_squares` (one thread sums a row: below torch's grain size)
SUM_ROW = 1024


def sum_of_squares(wide: torch.Tensor) -> float:
    """sum(x^2) of a 1-D float64 tensor (squared in place), the same bits whatever torch's
    thread count: ``torch.dot`` (BLAS) splits its sum over threads, so a gamma computed
    by a 1-thread process would differ in its last bits from a 2-thread one (and the
    served merge from ``mergekit-yaml``'s). Fixed rows of ``SUM_ROW`` entries are each
    summed by one thread; the row sums are added exactly rounded (``math.fsum``)."""
    n = wide.numel()
    if n == 0:
        return 0.0
    wide.mul_(wide)  # exact: a float32/bfloat16 value's square fits float64
    whole = n - n % SUM_ROW
    parts = wide[:whole].view(-1, SUM_ROW).sum(dim=1).tolist() if whole else []
    if whole < n:
        parts.append(float(wide[whole:].sum()))
    return math.fsum(parts)


def masked(tau: torch.Tensor, threshold: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mask, tau with dropped entries zeroed): Eq. 2 without a boolean gather."""
    mask = keep_mask(tau, threshold)
    if threshold == -math.inf:
        return mask, tau
    return mask, torch.where(mask, tau, torch.zeros((), dtype=tau.dtype, device=tau.device))


def gamma_from_norms(full_sq: float, kept_sq: float) -> float:
    """Eq. 3."""
    return math.sqrt(full_sq) / (math.sqrt(kept_sq) + GAMMA_EPS)


@dataclass
class DotsStats:
    """What the streaming pre-pass learns: per model, the thresholds of every
    tensor (or one threshold for the whole model, ``sparsify: global``) and the
    global norms that give gamma_i (Eq. 3 over the whole model)."""

    thresholds: List[Dict[str, float]]
    full_sq: List[float]
    kept_sq: List[float]
    global_thresholds: Optional[List[float]] = None

    def gamma(self, index: int, rescale: str) -> Optional[float]:
        """The model's global gamma, or None when gamma is per tensor or 1."""
        if rescale != "global":
            return None
        return gamma_from_norms(self.full_sq[index], self.kept_sq[index])

    def threshold(self, index: int, name: str) -> Optional[float]:
        if self.global_thresholds is not None:
            return self.global_thresholds[index]
        return self.thresholds[index].get(name)

    @classmethod
    def empty(cls, count: int) -> "DotsStats":
        return cls([{} for _ in range(count)], [0.0] * count, [0.0] * count)

    def add(self, name: str, base: torch.Tensor, models: Sequence[torch.Tensor], densities: Sequence[float]) -> None:
        """One tensor of the pre-pass: its thresholds, and its terms of the norms."""
        for i, (model, density) in enumerate(zip(models, densities)):
            tau = task_vector(model, base)
            threshold = magnitude_threshold(tau, density)
            full, part = squared_norms(tau, keep_mask(tau, threshold))
            self.thresholds[i][name] = threshold
            self.full_sq[i] += full
            self.kept_sq[i] += part
            del tau


def dots_stats(
    tensors: Iterable[Tuple[str, torch.Tensor, Sequence[torch.Tensor]]],
    densities: Sequence[float],
) -> DotsStats:
    """Streaming pre-pass over (name, base, [model_i]) triples, one tensor at a time,
    so memory is bounded by the largest tensor, not the model."""
    stats = DotsStats.empty(len(densities))
    for name, base, models in tensors:
        stats.add(name, base, models, densities)
    return stats


def dots_vector(base: torch.Tensor, model: torch.Tensor, density: float, rescale: str,
                gamma: Optional[float] = None, threshold: Optional[float] = None) -> SparseVector:
    """tau~ = gamma * (tau masked to its top int(density*n) magnitudes).

    ``gamma`` is the model's global factor when ``rescale == "global"`` (from
    :class:`DotsStats`); ``threshold`` may come from the pre-pass to avoid
    selecting twice (it is the same value either way).
    """
    return dots_masked_vector(base, model, density, rescale, gamma, threshold).compact()


def dots_masked_vector(
    base: torch.Tensor,
    model: torch.Tensor,
    density: float,
    rescale: str,
    gamma: Optional[float] = None,
    threshold: Optional[float] = None,
) -> MaskedVector:
    """:func:`dots_vector` in full-shape layout (what the mergekit kernel uses):
    the same entries, the same values, bit for bit."""
    tau = task_vector(model, base)
    if threshold is None:
        threshold = magnitude_threshold(tau, density)
    mask, kept = masked(tau, threshold)
    if rescale == "tensor":
        gamma = gamma_from_norms(*squared_norms(tau, mask))
    elif rescale == "none":
        gamma = None
    elif gamma is None:
        raise ValueError("rescale='global' needs the model's gamma from dots_stats")
    return MaskedVector(mask, tau * gamma if gamma is not None else tau)
