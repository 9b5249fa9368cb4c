"""Diagonal Fisher files: safetensors with the model's tensor names and shapes.

Values are float32 mantissas with a per-tensor power-of-two scale so that tiny
squared gradients never underflow to zero: the Fisher value is
``stored * 2 ** -log2_scale[name]`` (metadata key ``log2_scale``, a JSON object;
absent means 0, so any plain safetensors file of Fisher values also works).
A path may be one file or a directory of ``*.safetensors`` shards.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, Iterable, Optional, Tuple

import torch

from mergekit_rlvr.methods.common import MergeInputError

SCALE_KEY = "log2_scale"


def _times_power_of_two(value: torch.Tensor, exponent: int) -> torch.Tensor:
    """value * 2**exponent, exact, in steps: ``torch.ldexp`` forms 2**exponent
    first, which overflows float64 beyond 2**1023 (a scale of 1096 for Fisher values
    near 1e-300 made them Inf on write and 0 on read)."""
    while exponent:
        step = max(-512, min(512, exponent))
        value = value * (2.0**step)
        exponent -= step
    return value


def to_storable(value: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(float32 tensor, log2 scale) representing a float64 tensor of Fisher values."""
    value = value.to(torch.float64)
    peak = float(value.abs().max()) if value.numel() else 0.0
    if peak == 0.0 or not math.isfinite(peak):
        return value.to(torch.float32), 0
    # put the largest value near 2**100: far from overflow, 250 binades above underflow
    scale = 100 - math.frexp(peak)[1]
    return _times_power_of_two(value, scale).to(torch.float32), scale


def save_fisher(
    tensors: Dict[str, torch.Tensor],
    path: str,
    metadata: Optional[Dict[str, str]] = None,
    consume: bool = False,
) -> None:
    """Write atomically (temporary name, then rename); ``metadata`` (strings) is kept
    in the header beside the scales. ``consume`` empties ``tensors`` as it converts
    them, so a caller holding no other reference never has the float64 values and
    their float32 copies in memory at once."""
    from safetensors.torch import save_file

    stored, scales = {}, {}
    for name in list(tensors):
        value = tensors.pop(name) if consume else tensors[name]
        stored[name], scales[name] = to_storable(value)
        del value
    header = {str(k): str(v) for k, v in (metadata or {}).items()}
    header.update({"format": "mergekit-rlvr-fisher", SCALE_KEY: json.dumps(scales)})
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(stored, tmp, metadata=header)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # an ordinary file, not the 0600 of a temporary one
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class FisherStore:
    """Lazy reader of one Fisher file or a directory of shards."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        if os.path.isdir(path):
            files = sorted(
                os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors")
            )
            if not files:
                raise MergeInputError(f"fisher directory {path} holds no .safetensors files")
        elif os.path.isfile(path):
            files = [path]
        else:
            raise MergeInputError(f"fisher file {path} does not exist")
        self._where: Dict[str, str] = {}
        self._scales: Dict[str, int] = {}
        self._handles = {}
        for file in files:
            try:
                handle = safe_open(file, framework="pt")
            except Exception as error:  # safetensors raises several kinds
                raise MergeInputError(f"fisher file {file} is not a readable safetensors file: {error}") from None
            self._handles[file] = handle
            meta = handle.metadata() or {}
            scales = json.loads(meta.get(SCALE_KEY, "{}"))
            for name in handle.keys():
                self._where[name] = file
                self._scales[name] = int(scales.get(name, 0))

    def names(self) -> Iterable[str]:
        return self._where.keys()

    def __reduce__(self):
        """Pickled as its path: another process (a vLLM worker adopting the driver's
        pre-pass) opens the same file through its own cache."""
        return fisher_store, (os.path.abspath(self.path),)

    def get(self, name: str, shape: Optional[torch.Size] = None) -> torch.Tensor:
        """The Fisher values of one tensor as float64, checked against ``shape``."""
        if name not in self._where:
            raise MergeInputError(f"fisher file {self.path} has no tensor {name}")
        stored = self._handles[self._where[name]].get_tensor(name)
        if shape is not None and tuple(stored.shape) != tuple(shape):
            raise MergeInputError(
                f"fisher file {self.path}: tensor {name} has shape {tuple(stored.shape)},"
                f" the model's is {tuple(shape)}"
            )
        value = stored.to(torch.float64)
        scale = self._scales[name]
        if scale:
            value = _times_power_of_two(value, -scale)
        if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
            raise MergeInputError(f"fisher file {self.path}: tensor {name} has NaN, Inf or negative values")
        return value


_stores: Dict[str, FisherStore] = {}


def fisher_store(path: str) -> FisherStore:
    """Process-wide cache of open Fisher files."""
    key = os.path.abspath(path)
    if key not in _stores:
        _stores[key] = FisherStore(path)
    return _stores[key]
