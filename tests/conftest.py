"""Shared fixtures: tiny generated checkpoints written as real safetensors files,
and the real `mergekit-yaml` console script run in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """base, sft (large dense update), rl (small sparse update), rl2: float32 tiny Qwen2."""
    from mergekit_rlvr.toy.tiny import write_family

    out = tmp_path_factory.mktemp("family")
    return write_family(str(out), {"sft": (0.3, 1.0), "rl": (0.01, 0.3), "rl2": (0.01, 0.3)})


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


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


@pytest.fixture(scope="session")
def postgresql_server():
    """A real PostgreSQL server for the session (tests/pg_server.py): Unix socket only,
    stopped at the end; skipped, with the reason, where the binaries are absent."""
    import pg_server

    why = pg_server.missing()
    if why:
        pytest.skip(f"no PostgreSQL server: {why}")
    server = pg_server.PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture
def postgresql_url(postgresql_server, request):
    """A fresh, empty database on the session's server; its SQLAlchemy URL."""
    import re

    _DATABASES.append(request.node.name)
    name = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:50] + f"_{len(_DATABASES)}"
    return postgresql_server.create_database(name)


_DATABASES: list = []
