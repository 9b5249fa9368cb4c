"""Files the tests write and read: recipes, the real `mergekit-yaml` console script run
in a subprocess, and a checkpoint directory's safetensors state."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def write_jsonl(path: Path, rows) -> str:
    """One JSON object a line (query files, pools); the path as a string."""
    import json

    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def mergekit_yaml(recipe: Path, out: Path, *extra: str, exe: Path = BIN / "mergekit-yaml", check=True):
    """Run the real console script; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [str(exe), str(recipe), str(out), *extra],
        capture_output=True, text=True, env=env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"mergekit-yaml failed:\n{proc.stderr[-4000:]}")
    return proc


def load_state(path) -> dict:
    from safetensors.torch import load_file

    path = Path(path)
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state
