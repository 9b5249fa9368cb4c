"""A Hugging Face cache directory in the hub's own layout, built from the tiny family
(``models--org--name/{blobs,refs,snapshots/<commit>}``, snapshot files symlinked to
content-addressed blobs), for recipes that name hub ids offline.

``toy-org/tiny-sft`` has two commits: ``main`` holds other weights (rl2's) and the
branch ``v1`` holds sft's; recipes name ``toy-org/tiny-sft@v1``, so a resolution that
ignored the revision would give other weights."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Dict

SFT_V1 = "toy-org/tiny-sft@v1"
RL = "toy-org/tiny-rl"
BASE = "toy-org/tiny-base"


def commit_of(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def add_commit(cache: Path, repo: str, source: str, commit: str, refs=("main",)) -> Path:
    """One commit of ``repo`` as huggingface_hub's cache stores it; returns the snapshot."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(Path(source).iterdir()):
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        if not (root / "blobs" / blob).exists():
            shutil.copyfile(file, root / "blobs" / blob)
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / blob)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)  # no newline, like the hub's own
    return snapshot


def write_hub_cache(cache: Path, family: Dict[str, str]) -> Dict[str, str]:
    """The tiny family as hub repositories in ``cache``; {id as recipes name it: snapshot}."""
    snapshots = {
        BASE: add_commit(cache, BASE, family["base"], commit_of("base")),
        SFT_V1: add_commit(cache, "toy-org/tiny-sft", family["sft"], commit_of("sft-v1"), refs=("v1",)),
        "toy-org/tiny-sft": add_commit(cache, "toy-org/tiny-sft", family["rl2"], commit_of("sft-main")),
        RL: add_commit(cache, RL, family["rl"], commit_of("rl")),
    }
    return {k: str(v) for k, v in snapshots.items()}


def hub_env(cache: Path) -> Dict[str, str]:
    """What makes huggingface_hub (and so mergekit, vLLM, us) read only ``cache``."""
    return {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
