"""Shared pieces of the merge math: task vectors, sparse vectors and `combine`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from mergekit_rlvr.errors import MergeInputError


@dataclass(frozen=True)
class SparseVector:
    """A vector that is zero outside ``mask``; ``values`` are the kept entries in
    row-major order (``dense()[mask] == values``)."""

    mask: torch.Tensor  # bool, the weight's shape
    values: torch.Tensor  # float32, 1-D, mask.sum() entries

    @property
    def shape(self) -> torch.Size:
        return self.mask.shape

    def dense(self) -> torch.Tensor:
        out = torch.zeros(self.mask.shape, dtype=self.values.dtype, device=self.values.device)
        out[self.mask] = self.values
        return out

    def to(self, device) -> "SparseVector":
        return SparseVector(self.mask.to(device), self.values.to(device))


@dataclass(frozen=True)
class MaskedVector:
    """The same vector as a ``SparseVector`` in full-shape layout: ``values`` has
    the weight's shape and only entries under ``mask`` count. Faster to build and
    apply on CPU (no boolean gather/scatter); :func:`combine` gives bit for bit the
    same result for both layouts."""

    mask: torch.Tensor  # bool, the weight's shape
    values: torch.Tensor  # float32, the weight's shape (ignored outside mask)

    @property
    def shape(self) -> torch.Size:
        return self.mask.shape

    def compact(self) -> SparseVector:
        return SparseVector(self.mask, self.values[self.mask])

    def dense(self) -> torch.Tensor:
        return torch.where(self.mask, self.values, torch.zeros((), dtype=self.values.dtype, device=self.values.device))


@dataclass(frozen=True)
class RecomputedVector:
    """``v = (model - base) * scale`` under ``mask``, kept as the model's own values:
    the task vector is recomputed (``task_vector``, then one multiply by ``scale``)
    from the base it is added to, so the result is bit for bit the kernels'
    ``tau * gamma`` (dots) or ``tau * lambda`` (task_arithmetic) or ``tau``
    (reasoning_interp, ``scale`` None). ``mask`` None: every entry."""

    model: torch.Tensor  # the base's shape and merge dtype
    mask: Optional[torch.Tensor] = None  # bool, the weight's shape
    scale: Optional[float] = None

    @property
    def shape(self) -> torch.Size:
        return self.model.shape

    def values(self, base: torch.Tensor) -> torch.Tensor:
        tau = task_vector(self.model, base)
        return tau * self.scale if self.scale is not None else tau


Vector = Union[torch.Tensor, SparseVector, MaskedVector, RecomputedVector]


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """MergeInputError when any entry is NaN or Inf. A NaN or Inf entry makes the sum
    non-finite, so a finite sum proves every entry finite; only a non-finite sum (NaN,
    Inf, or an overflow of large finite values) is checked entry by entry. A float32
    sum reads the tensor once without allocating a mask (on a 4M-entry tensor: 0.19 ms,
    against 3.0 ms for a float64 sum and 6.9 ms for isfinite().all())."""
    if tensor.is_floating_point() and tensor.numel():
        total = float(tensor.sum())
        if not math.isfinite(total) and not bool(torch.isfinite(tensor).all()):
            raise MergeInputError(f"{what} contains NaN or Inf")


def check_shapes(base: torch.Tensor, other: torch.Tensor, what: str) -> None:
    if base.shape != other.shape:
        raise MergeInputError(
            f"{what}: shape {tuple(other.shape)} differs from the base's {tuple(base.shape)}"
            " (a resized vocabulary?)"
        )


def task_vector(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """tau = theta_model - theta_base, in float32 (float64 stays float64)."""
    dtype = torch.float64 if torch.float64 in (model.dtype, base.dtype) else torch.float32
    return model.to(dtype) - base.to(dtype)


def combine(
    base: torch.Tensor,
    vectors: Sequence[Vector],
    coefficients: Sequence[float],
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """theta = theta_base + sum_j c_j * v_j, computed in float32 and rounded once.

    Each term is one float32 multiply and one float32 add per entry, in vector
    order, and a sparse (or masked) vector only touches its mask. Every path that builds a
    merged weight (mergekit kernels, vLLM hot-swap in place or through reload)
    calls this function, on full tensors or on shards: the result is the same
    bit for bit because every entry sees the same operations.
    """
    if len(vectors) != len(coefficients):
        raise ValueError(f"{len(vectors)} vectors but {len(coefficients)} coefficients")
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    acc = base.to(work, copy=True)
    for vector, coefficient in zip(vectors, coefficients):
        c = float(coefficient)
        if isinstance(vector, SparseVector):
            if vector.values.numel():
                acc[vector.mask] += vector.values.to(work) * c
        elif isinstance(vector, MaskedVector):
            acc = torch.where(vector.mask, acc + vector.values.to(work) * c, acc)
        elif isinstance(vector, RecomputedVector):
            values = vector.values(base).to(work) * c
            acc = acc + values if vector.mask is None else torch.where(vector.mask, acc + values, acc)
        else:
            acc += vector.to(work) * c
    return acc.to(out_dtype or base.dtype)
