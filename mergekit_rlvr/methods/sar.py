"""SAR-Merging (paper 001, Eq. 12-16): sum agreeing updates, keep the more
Fisher-sensitive update where models disagree in sign, DARE-drop the low-magnitude
half of the private region, then theta_0 + lambda * delta_final.

More than two models (our generalization): where the models' updates disagree in
sign (some positive, some negative), keep the update of the model with the largest
sensitivity among those with a nonzero update (ties go to the later model, as Eq. 14
gives them to B); elsewhere sum. With two models this is exactly Eq. 14.

Without Fisher values the sensitivity is |delta| (keep the larger update).
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import Optional, Sequence

import torch

from mergekit_rlvr.methods.common import MergeInputError, task_vector

DEFAULT_DROP_RATE = 0.2
DEFAULT_EPSILON = 1e-5  # paper 001, Table 1


def check_drop_rate(drop_rate: float) -> float:
    drop_rate = float(drop_rate)
    if not (0.0 <= drop_rate < 1.0) or math.isnan(drop_rate):
        raise MergeInputError(f"drop_rate must be in [0, 1), got {drop_rate}")
    return drop_rate


def check_epsilon(epsilon: float) -> float:
    epsilon = float(epsilon)
    if not epsilon >= 0.0:
        raise MergeInputError(f"epsilon must be >= 0, got {epsilon}")
    return epsilon


def tensor_seed(seed: int, name: Optional[str]) -> int:
    """A per-tensor seed: the same tensor gets the same dropout mask in every run,
    whatever order tensors are merged in."""
    return (int(seed) * 1_000_003 + zlib.crc32((name or "").encode())) % (2**63)


def resolve_conflicts(
    deltas: Sequence[torch.Tensor], sensitivities: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Eq. 14 (generalized to any number of models)."""
    stacked = torch.stack(list(deltas))
    # a left fold, not stacked.sum(0): the same additions in the same order on every
    # device (a device's reduction may associate three or more terms differently)
    summed = functools.reduce(torch.add, deltas[1:], deltas[0])
    conflict = (stacked > 0).any(0) & (stacked < 0).any(0)
    if not bool(conflict.any()):
        return summed
    sens = torch.stack([s.to(torch.float64) for s in sensitivities])
    sens = torch.where(stacked != 0, sens, torch.full_like(sens, -math.inf))
    count = stacked.shape[0]
    # argmax returns the first maximum; flip so that ties go to the later model.
    winner = (count - 1) - sens.flip(0).argmax(0)
    chosen = stacked.gather(0, winner.unsqueeze(0)).squeeze(0)
    return torch.where(conflict, chosen, summed)


def private_region(deltas: Sequence[torch.Tensor], epsilon: float) -> torch.Tensor:
    """Entries updated (|delta| > epsilon) by exactly one model."""
    updated = torch.stack([d.abs() > epsilon for d in deltas]).sum(0)
    return updated == 1


def low_private(resolved: torch.Tensor, private: torch.Tensor) -> torch.Tensor:
    """The lower-magnitude half of the private region by rank: the floor(n/2) private
    entries of smallest |resolved delta|, ties broken by flat (row-major) position
    (a stable sort), so exactly half the private entries are dropout candidates
    however many magnitudes tie (bf16 deltas take few distinct values)."""
    where = private.reshape(-1).nonzero().squeeze(1)
    half = where.numel() // 2
    low = torch.zeros(private.numel(), dtype=torch.bool, device=private.device)
    if half:
        mags = resolved.detach().reshape(-1).abs()[where]
        order = torch.sort(mags, stable=True).indices
        low[where[order[:half]]] = True
    return low.reshape(private.shape)


def dare_low_private(
    resolved: torch.Tensor,
    private: torch.Tensor,
    drop_rate: float,
    generator: torch.Generator,
    rescale: bool = True,
) -> torch.Tensor:
    """Eq. 15 on the low half of the private region; everything else untouched.
    Survivors are divided by (1 - drop_rate) unless ``rescale`` is off (paper 001,
    Table 5's ablation without rescaling)."""
    if drop_rate == 0.0:
        return resolved
    low = low_private(resolved, private)
    keep = torch.rand(resolved.shape, generator=generator, device="cpu") >= drop_rate
    keep = keep.to(resolved.device)
    survivors = resolved / (1.0 - drop_rate) if rescale else resolved
    dropped = torch.where(keep, survivors, torch.zeros_like(resolved))
    return torch.where(low, dropped, resolved)


def sar_vector(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    fishers: Sequence[Optional[torch.Tensor]],
    *,
    drop_rate: float = DEFAULT_DROP_RATE,
    epsilon: float = DEFAULT_EPSILON,
    seed: int = 0,
    name: Optional[str] = None,
    rescale: bool = True,
) -> torch.Tensor:
    """delta_final (Eq. 15) for one tensor; theta = base + scale * delta_final."""
    deltas = [task_vector(m, base) for m in models]
    if any(f is None for f in fishers):
        sensitivities = [d.abs() for d in deltas]
    else:
        sensitivities = list(fishers)
    resolved = resolve_conflicts(deltas, sensitivities)
    private = private_region(deltas, epsilon)
    generator = torch.Generator(device="cpu").manual_seed(tensor_seed(seed, name))
    return dare_low_private(resolved, private, drop_rate, generator, rescale)
