"""Shared fixtures: tiny generated checkpoints written as real safetensors files,
recipe files of them, and a real PostgreSQL server. The helpers behind them are in
tests/support/ (``from support.files import write_recipe`` ...); the names below
stay importable from conftest for the test modules that still do."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import pytest

from support.files import BIN, load_state, mergekit_yaml, write_recipe  # noqa: F401 (re-exported)


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """base, sft (large dense update), rl (small sparse update), rl2: float32 tiny Qwen2."""
    from mergekit_rlvr.toy.tiny import write_family

    out = tmp_path_factory.mktemp("family")
    return write_family(str(out), {"sft": (0.3, 1.0), "rl": (0.01, 0.3), "rl2": (0.01, 0.3)})


@pytest.fixture(scope="session")
def recipe_file(tmp_path_factory) -> Callable[..., Path]:
    """``recipe_file(recipe, name="recipe.yml")``: the recipe written in a fresh
    directory of the session (build it with ``support.recipes``); its path."""
    def write(recipe: dict, name: str = "recipe.yml"):
        return write_recipe(tmp_path_factory.mktemp(name.split(".")[0]) / name, recipe)
    return write


@pytest.fixture(scope="session")
def materialized(tiny_family, tmp_path_factory):
    """``{case: (recipe file, mergekit-yaml output directory)}`` for every recipe of
    ``support.recipes.table``, merged once for the session by the real mergekit-yaml."""
    from support.files import mergekit_yaml_all
    from support.recipes import table

    root = tmp_path_factory.mktemp("materialized")
    out = {name: (write_recipe(root / f"{name}.yml", recipe), root / f"out-{name}")
           for name, recipe in table(tiny_family).items()}
    mergekit_yaml_all(list(out.values()))
    return out


@pytest.fixture(scope="module")
def in_process_engines():
    """vLLM engine cores started in the test process for the module
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as the demo and search workers run them):
    seconds to start instead of tens. For modules whose engine is a vehicle (search,
    eval, hub ids); test_hotswap and the servers keep vLLM's default, a separate engine
    core process, so the RPC path across processes stays under test."""
    from vllm import envs

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        envs.disable_envs_cache()
        yield
    # an engine core in this process froze vLLM's environment variables (vllm.envs caches them once
    # an engine has started); later modules' settings must be read again
    envs.disable_envs_cache()


@pytest.fixture(scope="module")
def engine(recipe, request):
    """One HotSwapLLM for the test module, on its ``recipe`` fixture with its ``ENGINE``
    keyword arguments (support.engines.hotswap_engine), closed after the module."""
    from support.engines import hotswap_engine

    yield from hotswap_engine(recipe, **request.module.ENGINE)


@pytest.fixture(scope="session")
def postgresql_server():
    """A real PostgreSQL server for the session (tests/support/pg_server.py): Unix
    socket only, stopped at the end; skipped, with the reason, where the binaries are
    absent."""
    from support import pg_server

    why = pg_server.missing()
    if why:
        pytest.skip(f"no PostgreSQL server: {why}")
    server = pg_server.PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture
def postgresql_url(postgresql_server, request):
    """A fresh, empty database on the session's server; its SQLAlchemy URL."""
    _DATABASES.append(request.node.name)
    name = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:50] + f"_{len(_DATABASES)}"
    return postgresql_server.create_database(name)


_DATABASES: list = []
