"""Compact device storage for the fixed vectors: a sparse vector as its kept values
plus a bitmask (1 bit per entry), a dense vector as is. Pure torch, no vLLM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from mergekit_rlvr.methods.common import SparseVector

_BITS = None


def _bit_weights(device) -> torch.Tensor:
    return (1 << torch.arange(8, dtype=torch.uint8, device=device)).to(torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor -> uint8 (little-endian bit order), length ceil(n / 8)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _bit_weights(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, shape) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= int(s)
    expanded = bits.unsqueeze(1).bitwise_and(_bit_weights(bits.device)).ne(0)
    return expanded.reshape(-1)[:n].reshape(shape)


@dataclass
class PackedSparse:
    bits: torch.Tensor  # uint8, ceil(n/8)
    values: torch.Tensor  # kept entries, row-major order
    shape: torch.Size

    @classmethod
    def from_sparse(cls, vector: SparseVector) -> "PackedSparse":
        return cls(pack_bits(vector.mask), vector.values.contiguous(), vector.mask.shape)

    def unpack(self) -> SparseVector:
        return SparseVector(unpack_bits(self.bits, self.shape), self.values)

    @property
    def nbytes(self) -> int:
        return self.bits.numel() * self.bits.element_size() + self.values.numel() * self.values.element_size()

    def dense_nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * self.values.element_size()

    def to(self, device) -> "PackedSparse":
        return PackedSparse(self.bits.to(device), self.values.to(device), self.shape)


Stored = Union[torch.Tensor, PackedSparse]


def store(vector) -> Stored:
    if isinstance(vector, SparseVector):
        return PackedSparse.from_sparse(vector)
    return vector.contiguous()


def load(stored: Stored):
    if isinstance(stored, PackedSparse):
        return stored.unpack()
    return stored


def nbytes(stored: Stored) -> int:
    if isinstance(stored, PackedSparse):
        return stored.nbytes
    return stored.numel() * stored.element_size()


def dense_nbytes(stored: Stored) -> int:
    if isinstance(stored, PackedSparse):
        return stored.dense_nbytes()
    return stored.numel() * stored.element_size()
