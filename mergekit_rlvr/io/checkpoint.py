"""A checkpoint directory's tensor names, shapes and kinds, from the files' headers
(``*.safetensors``, else ``*.bin`` memory-mapped): what the Fisher file is written for."""

from __future__ import annotations

import os
from typing import Dict, Tuple

import torch

from mergekit_rlvr.errors import UserError


def checkpoint_tensors(model_dir: str) -> Dict[str, Tuple[Tuple[int, ...], bool]]:
    """name -> (shape, is floating point) of every tensor in the checkpoint files
    (``*.safetensors``, else ``*.bin``), read from headers only."""
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    out: Dict[str, Tuple[Tuple[int, ...], bool]] = {}
    if files:
        from safetensors import safe_open

        for file in files:
            path = os.path.join(model_dir, file)
            try:
                with safe_open(path, framework="pt") as handle:
                    for name in handle.keys():
                        piece = handle.get_slice(name)
                        dtype = piece.get_dtype()
                        out[name] = (tuple(piece.get_shape()), dtype.startswith(("F", "BF", "E")))
            except Exception as error:  # safetensors raises several kinds
                raise UserError(f"model checkpoint {path} is not a readable safetensors file: {error}") from None
        return out
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".bin") and "training_args" not in f)
    for file in files:
        path = os.path.join(model_dir, file)
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as error:
            raise UserError(f"model checkpoint {path} is not readable: {error}") from None
        for name, value in state.items():
            out[name] = (tuple(value.shape), value.is_floating_point())
    if not out:
        raise UserError(f"model {model_dir} has no *.safetensors or *.bin checkpoint files")
    return out
