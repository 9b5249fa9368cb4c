"""Files the tests write and read: recipes, the real `mergekit-yaml` (a fresh console
script process, or a child of the fork server in support/mergekit_fork.py), and a
checkpoint directory's safetensors state."""
from __future__ import annotations

import atexit
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

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


def mergekit_yaml(recipe: Path, out: Path, *extra: str, exe: Optional[Path] = None, check=True):
    """Run the real ``mergekit-yaml`` on one recipe; returns the CompletedProcess.
    ``exe``: that console script in a fresh process (another venv's, or to test the
    interpreter start itself); otherwise a child of the fork server
    (:mod:`support.mergekit_fork`: the console script's own entry point, imports paid once)."""
    if exe is not None:
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        proc = subprocess.run([str(exe), str(recipe), str(out), *extra], capture_output=True, text=True, env=env)
    else:
        (proc,) = mergekit_yaml_all([(recipe, out, *extra)], check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"mergekit-yaml {recipe} failed:\n{proc.stderr[-4000:]}")
    return proc


def mergekit_yaml_all(jobs, check=True):
    """``mergekit-yaml recipe out [options]`` for every ``(recipe, out, *options)`` at
    once (children of the fork server); their CompletedProcesses, in order."""
    import tempfile

    global _SERVER
    if _SERVER is None or _SERVER.env != _environment():  # a changed environment gets a fresh server
        if _SERVER is not None:
            _SERVER.close()
        from support.mergekit_fork import Server

        _SERVER = Server(_environment())
        atexit.register(_SERVER.close)
    with tempfile.TemporaryDirectory() as workdir:
        procs = _SERVER.run_all(jobs, workdir)
    for job, proc in zip(jobs, procs):
        if check and proc.returncode != 0:
            raise AssertionError(f"mergekit-yaml {job[0]} failed:\n{proc.stderr[-4000:]}")
    return procs


_SERVER = None


def _environment() -> dict:
    """os.environ less what pytest changes per test and vLLM's settings (not mergekit's)."""
    return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST" and not k.startswith("VLLM_")}


def load_state(path) -> dict:
    from safetensors.torch import load_file

    path = Path(path)
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state
