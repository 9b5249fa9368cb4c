"""Model strings as mergekit reads them: a local directory, or a Hugging Face Hub id
with an optional ``@revision`` (``org/name``, ``org/name@main``, ``org/name@<commit>``).

A hub id is resolved through the Hugging Face cache with
``huggingface_hub.snapshot_download``: online it downloads what is missing (the files
mergekit and vLLM read: configs, tokenizer, ``*.safetensors``, or ``*.bin`` when the
repository has no safetensors); with ``HF_HUB_OFFLINE=1`` it reads the cache only
(``HF_HUB_CACHE``, ``HF_HOME``), which ``mergekit-yaml`` itself cannot do since it
lists the repository's files online first. Every command that reads a recipe
(decompose, HotSwapLLM, serve, search, select-queries) resolves through
:func:`resolve_recipe`, so the engine starts on the very snapshot directory whose
tensors were planned, and coefficient names keep the strings the recipe wrote.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple

from mergekit_rlvr.errors import UserError

#: what mergekit-yaml accepts as a hub id: owner/name (no leading dot or slash)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
#: what mergekit and vLLM read from a repository (weights added by kind)
PATTERNS = ["*.json", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]

_resolved: Dict[Tuple[str, Optional[str], Optional[str], bool], str] = {}


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), read now rather than at import."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or value.strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve_model(model: str) -> str:
    """The local directory of a recipe's ``model:`` string (absolute); UserError
    naming the model otherwise. Resolutions are kept for the process, so that every
    reader in one command sees the same snapshot even if a branch moves."""
    if os.path.isdir(model):
        return os.path.abspath(model)
    from mergekit.common import ModelReference

    try:
        ref = ModelReference.parse(model)
    except Exception as error:  # pydantic / RuntimeError on several '@'
        raise UserError(f"model {model}: not a model path or Hugging Face id ({str(error).splitlines()[0]})") from None
    if ref.lora is not None:
        raise UserError(f"model {model} has a LoRA; merge it first (hot-swap reads plain checkpoints)")
    path, revision = ref.model.path, ref.model.revision
    if os.path.isdir(path):
        return os.path.abspath(path)
    if os.path.exists(path) or not HUB_ID.fullmatch(path) or path.count("/") != 1:
        raise UserError(f"model {model}: no such local directory, and not a Hugging Face id (owner/name[@revision])")
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    key = (path, revision, cache_dir, offline())
    if key not in _resolved:
        _resolved[key] = _snapshot(model, path, revision, cache_dir, key[3])
    return _resolved[key]


def _snapshot(model: str, repo: str, revision: Optional[str], cache_dir: Optional[str], local_only: bool) -> str:
    import huggingface_hub
    from huggingface_hub import errors

    try:
        patterns = None
        if not local_only:
            try:
                files = huggingface_hub.list_repo_files(repo, revision=revision)
                weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin"
                patterns = PATTERNS + [weights]
            except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError):
                raise
            except Exception:  # noqa: BLE001 - Hub unreachable: snapshot_download falls back to the cache
                patterns = None
        return huggingface_hub.snapshot_download(repo, revision=revision, cache_dir=cache_dir,
                                                 allow_patterns=patterns, local_files_only=local_only)
    except errors.RevisionNotFoundError:
        raise UserError(f"model {model}: the Hub repository {repo} has no revision {revision}") from None
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as error:
        raise UserError(f"model {model}: no such Hub repository, or it is private/gated and needs a token"
                        f" (hf auth login): {_first_line(error)}") from None
    except errors.LocalEntryNotFoundError:
        where = cache_dir or huggingface_hub.constants.HF_HUB_CACHE
        how = "HF_HUB_OFFLINE is set" if local_only else "the Hub cannot be reached"
        raise UserError(f"model {model}: not in the Hugging Face cache {where} and {how};"
                        f" download it first (hf download {repo}{' --revision ' + revision if revision else ''})"
                        ) from None
    except Exception as error:  # noqa: BLE001 - connection errors, Hub outages: one line
        raise UserError(f"model {model}: cannot fetch it from the Hub: {_first_line(error)}") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def model_strings(recipe: Mapping[str, Any]):
    """Every ``base_model`` / ``models[].model`` string of a recipe, in order."""
    values = [recipe.get("base_model")]
    values += [e.get("model") for e in recipe.get("models") or [] if isinstance(e, Mapping)]
    return [v for v in values if isinstance(v, str)]


def resolve_recipe(recipe: Mapping[str, Any], models: Optional[Mapping[str, str]] = None,
                   where: str = "recipe") -> Tuple[Dict[str, Any], Dict[str, str]]:
    """(copy of ``recipe`` with each model string replaced by its local directory,
    {local directory: the string as written}). ``models`` (as written -> directory)
    pins resolutions made earlier, e.g. by the process that started an engine."""
    import copy

    pinned = dict(models or {})
    local: Dict[str, str] = {}
    for written in model_strings(recipe):
        if written not in local:
            try:
                local[written] = pinned.get(written) or resolve_model(written)
            except UserError as error:
                raise UserError(f"{where}: {error}") from None
    data = copy.deepcopy(dict(recipe))
    if isinstance(data.get("base_model"), str):
        data["base_model"] = local[data["base_model"]]
    for entry in data.get("models") or []:
        if isinstance(entry, dict) and isinstance(entry.get("model"), str):
            entry["model"] = local[entry["model"]]
    aliases = {directory: written for written, directory in local.items() if directory != written}
    return data, aliases
