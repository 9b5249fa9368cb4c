"""Reasoning interpolation (paper 003, Sec. 3): theta = (1 - alpha) * theta_M +
alpha * theta_SFT, written as theta_M + alpha * (theta_SFT - theta_M) so that it is
one fixed vector and one coefficient like every other method."""

from __future__ import annotations

import math

import torch

from mergekit_rlvr.methods.common import MergeInputError, task_vector

#: used when a recipe gives no alpha (mergekit needs a default to list the method)
DEFAULT_ALPHA = 0.5


def check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not (0.0 <= alpha <= 1.0) or math.isnan(alpha):
        raise MergeInputError(f"alpha must be in [0, 1], got {alpha}")
    return alpha


def interp_vector(reasoning: torch.Tensor, sft: torch.Tensor) -> torch.Tensor:
    """v = theta_SFT - theta_M; theta = theta_M + alpha * v."""
    return task_vector(sft, reasoning)
