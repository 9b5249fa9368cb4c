"""The model the Fisher is taken of: where it is, on which device, loaded with
transformers, and which of its parameters each checkpoint tensor name is."""

from __future__ import annotations

import os
import re
from typing import Callable, Dict, List, Optional, Tuple

import torch

from mergekit_rlvr.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_model_dir(model: str) -> str:
    """A local directory as is; otherwise a Hugging Face Hub id, downloaded."""
    if os.path.isdir(model):
        return model
    if os.path.exists(model):
        raise UserError(f"model {model} is not a directory")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        raise UserError(f"model {model} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as error:
        raise UserError(f"model {model} is neither a directory nor a reachable Hub repository: "
                        f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None


def pick_device(device: Optional[str]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here")
    return device


def load_model(model_dir: str, dtype: str, device: torch.device):
    """(model, tokenizer) with transformers, as UserError when unreadable."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")

    def first_line(error):
        text = str(error).strip()
        return text.splitlines()[0] if text else type(error).__name__

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as error:
        raise UserError(f"model {model_dir}: cannot load its tokenizer: {first_line(error)}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype])
    except Exception as error:
        raise UserError(f"model {model_dir}: cannot load it as a causal LM: {first_line(error)}") from None
    model.to(device)
    for p in model.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    return model, tokenizer


def _transformers_renamer(model) -> Callable[[str], Optional[str]]:
    """transformers' own checkpoint-key -> parameter-name renaming (v5), or None when
    unavailable. Fused weights (WeightConverter) are not supported: None."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        keys = dict.fromkeys(n for n, _ in model.named_parameters(remove_duplicate=False))
        keys = {k: True for k in keys}
        prefix = getattr(model, "base_model_prefix", None) or None
    except Exception:  # older or newer transformers: fall back to plain names
        return lambda key: None

    def rename(key: str) -> Optional[str]:
        try:
            renamed, converter = rename_source_key(key, renamings, converters, prefix, keys)
        except Exception:
            return None
        return None if converter is not None else renamed

    return rename


def checkpoint_map(model, tensors: Dict[str, Tuple[Tuple[int, ...], bool]]) -> Tuple[Dict[str, Optional[str]], List[str]]:
    """(checkpoint name -> canonical parameter name or None, parameters found under no
    checkpoint name). The canonical name is the one ``named_parameters()`` yields
    (tied parameters once); every checkpoint name of a tied weight maps to it.
    Floating checkpoint tensors that are no parameter (buffers) map to None."""
    every = dict(model.named_parameters(remove_duplicate=False))
    canonical = {id(p): n for n, p in model.named_parameters()}
    rename = _transformers_renamer(model)
    prefix = getattr(model, "base_model_prefix", "") or ""
    mapping: Dict[str, Optional[str]] = {}
    for key, (shape, floating) in tensors.items():
        if not floating:
            continue
        candidates = [key, rename(key)]
        if prefix:
            candidates += [key[len(prefix) + 1 :] if key.startswith(prefix + ".") else f"{prefix}.{key}"]
        found = next((c for c in candidates if c and c in every), None)
        if found is None:
            mapping[key] = None
            continue
        param = every[found]
        if tuple(param.shape) != tuple(shape):
            raise UserError(
                f"checkpoint tensor {key} has shape {tuple(shape)} but the loaded parameter {found}"
                f" has {tuple(param.shape)}"
            )
        mapping[key] = canonical[id(param)]
    covered = set(n for n in mapping.values() if n)
    uncovered = [n for n in canonical.values() if n not in covered]
    return mapping, uncovered
