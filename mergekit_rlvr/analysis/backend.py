"""Which kernels ``mergekit-rlvr analyze`` runs, behind one interface per pass.

- :class:`~.cpu_kernels.CpuKernels`: the native C loops, on CPU (the default there);
- :class:`TorchKernels`: the torch kernels of :mod:`.kernels` (eager or fused by
  ``torch.compile``) plus :class:`~.histograms.Counting` of their keys: on CUDA, on
  CPU with ``MERGEKIT_RLVR_NATIVE=0``, with ``compile=True``, or where no C compiler
  builds the native kernels (one warning line).

Each pass method counts into the histogram tensors it is given (``flush`` after the
pass completes them) and returns the scalars of :func:`.kernels.pass1_kernel` /
``pass3_kernel``: the same integers either way, float sums to the last digits.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from mergekit_rlvr.analysis import histograms as H
from mergekit_rlvr.analysis.kernels import Kernels, sample_kernel

#: parameters from which the torch kernels are fused by torch.compile by default
COMPILE_FROM = 50_000_000


class TorchKernels:
    """The torch kernels on any device; their keys counted by :class:`.histograms.Counting`."""

    def __init__(self, compiled: bool, device, threads: Optional[int] = None):
        self.kernels = Kernels(compiled)
        self.count = H.Counting(device, threads)

    def sample(self, ms, b, counts: List[torch.Tensor]) -> None:
        for c, keys in zip(counts, sample_kernel(ms, b)):
            c.zero_()
            H.count_into(c, keys)

    def pass1(self, ms, b, hists, tables, refined, epsilon: float, eta: float):
        per_model, per_pair = self.kernels("pass1", ms, b, tables, refined, epsilon, eta)
        self.count([(h, terms[3]) for h, terms in zip(hists, per_model)])
        return [terms[:3] for terms in per_model], per_pair

    def pass2(self, ms, b, hists: Sequence[Optional[torch.Tensor]], tables, dump: int) -> None:
        keys = self.kernels("pass2", ms, b, tables, dump)
        self.count([(h, k) for h, k in zip(hists, keys) if h is not None])

    def pass3(self, ms, b, values, top_slots, epsilon: float, hists) -> list:
        tops, codes = self.kernels("pass3", ms, b, values, top_slots, epsilon)
        self.count(list(zip(hists, codes)))
        return tops

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.count.close()


def select(device: torch.device, compile: Optional[bool], parameters: int):
    """The native kernels on CPU unless ``compile`` is True (the torch kernels fused by
    torch.compile, on request) or they are off or unavailable; else the torch kernels,
    fused when ``compile`` is True, or None and the models hold ``COMPILE_FROM``+
    parameters."""
    if device.type == "cpu" and compile is not True:
        from mergekit_rlvr.analysis import cpu_kernels

        lib = cpu_kernels.library() if cpu_kernels.enabled() else None
        if lib is not None:
            return cpu_kernels.CpuKernels(lib)
    fused = compile if compile is not None else parameters >= COMPILE_FROM
    return TorchKernels(bool(fused), device)
