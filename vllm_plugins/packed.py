"""Compact device storage for the fixed vectors, and the swap's arithmetic on it.

A sparse vector (DoTS) is kept as its kept values plus their flat positions
(int32): 8 bytes per kept entry, 0.6x a dense float32 copy at density 0.3. A dense
vector is kept as is. :func:`combine_stored` computes exactly what
``mergekit_rlvr.methods.common.combine`` computes on the unpacked vectors (same
per-entry float operations in the same order: the result is bit-identical, see
tests/test_hotswap.py), with an indexed add instead of boolean-mask indexing,
which is several times faster on CPU. Pure torch, no vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from mergekit_rlvr.methods.common import SparseVector


@dataclass
class IndexedSparse:
    index: torch.Tensor  # flat positions of the kept entries, ascending (int32, or int64 if huge)
    values: torch.Tensor  # kept entries, same order
    shape: torch.Size

    @classmethod
    def from_sparse(cls, vector: SparseVector, base: Optional[torch.Tensor] = None) -> "IndexedSparse":
        """With ``base``, kept entries whose value is zero are dropped wherever the
        base is not -0.0: there the running sum is never -0.0 (a float sum is -0.0
        only when every term is), so adding +-0 leaves it bit for bit unchanged.
        (DoTS keeps ties at the threshold, so a sparse update keeps all its zeros.)"""
        flat = vector.mask.reshape(-1)
        index = flat.nonzero().squeeze(1)
        values = vector.values.reshape(-1)
        if base is not None and values.numel():
            base_flat = base.reshape(-1)[index]
            negative_zero = (base_flat == 0) & torch.signbit(base_flat)
            keep = (values != 0) | negative_zero
            if not bool(keep.all()):
                index, values = index[keep], values[keep]
        if flat.numel() < 2**31:
            index = index.to(torch.int32)
        return cls(index, values.contiguous(), vector.mask.shape)

    def unpack(self) -> SparseVector:
        mask = torch.zeros(self.shape, dtype=torch.bool, device=self.values.device)
        mask.view(-1)[self.index.long()] = True
        return SparseVector(mask, self.values)

    @property
    def nbytes(self) -> int:
        return self.index.numel() * self.index.element_size() + self.values.numel() * self.values.element_size()

    def dense_nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * self.values.element_size()

    def to(self, device) -> "IndexedSparse":
        return IndexedSparse(self.index.to(device), self.values.to(device), self.shape)


Stored = Union[torch.Tensor, IndexedSparse]


def store(vector, base: Optional[torch.Tensor] = None) -> Stored:
    """``base``: the tensor the vector is added to (lets zero entries be dropped)."""
    if isinstance(vector, SparseVector):
        return IndexedSparse.from_sparse(vector, base)
    return vector.contiguous()


def nbytes(stored: Stored) -> int:
    if isinstance(stored, IndexedSparse):
        return stored.nbytes
    return stored.numel() * stored.element_size()


def dense_nbytes(stored: Stored) -> int:
    if isinstance(stored, IndexedSparse):
        return stored.dense_nbytes()
    return stored.numel() * stored.element_size()


def combine_stored(
    base: torch.Tensor,
    vectors: Sequence[Stored],
    coefficients: Sequence[float],
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``combine(base, [unpacked vectors], coefficients, out_dtype)``, bit for bit:
    float32 work (float64 for a float64 base), one multiply and one add per kept
    entry, vectors in order, rounded once."""
    if len(vectors) != len(coefficients):
        raise ValueError(f"{len(vectors)} vectors but {len(coefficients)} coefficients")
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    acc = base.to(work, copy=True)
    flat = acc.view(-1)
    for vector, coefficient in zip(vectors, coefficients):
        c = float(coefficient)
        if isinstance(vector, IndexedSparse):
            if vector.values.numel():
                flat.index_add_(0, vector.index, vector.values.to(work) * c)
        else:
            acc += vector.to(work) * c
    return acc.to(out_dtype or base.dtype)
