"""Recipes that name Hugging Face ids, offline: a Hugging Face cache directory in the
hub's own layout (``models--org--name/{blobs,refs,snapshots/<commit>}``, snapshot
files symlinked to content-addressed blobs) built from the tiny generated family, with
``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` set.

``toy-org/tiny-sft`` has two commits: ``main`` holds other weights (rl2's) and the
branch ``v1`` holds sft's; the recipe names ``toy-org/tiny-sft@v1``, so a resolution
that ignored the revision would give other weights. Known answers: the hub-id engine's
readable weights equal ``mergekit-yaml`` of the same recipe written with local paths;
the server's greedy completion equals the HotSwapLLM engine's at the same coefficients.
One HotSwapLLM engine for the module (search runs on it too) and one server.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import load_state, mergekit_yaml, write_recipe

BIN = Path(sys.executable).parent
ENGINE = {"dtype": "float32", "max_model_len": 256, "kv_cache_memory_bytes": 64 << 20, "seed": 0,
          "enforce_eager": True}
SFT_V1 = "toy-org/tiny-sft@v1"
RL = "toy-org/tiny-rl"
BASE = "toy-org/tiny-base"
WEIGHTS = {SFT_V1: 0.7, RL: 1.6}
STARTUP_TIMEOUT = 600  # a loaded 2-core machine needs minutes for a server and its engine


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


@pytest.fixture(scope="module")
def hub(tiny_family, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf-cache")
    snaps = {
        BASE: add_commit(cache, BASE, tiny_family["base"], commit_of("base")),
        SFT_V1: add_commit(cache, "toy-org/tiny-sft", tiny_family["sft"], commit_of("sft-v1"), refs=("v1",)),
        "toy-org/tiny-sft": add_commit(cache, "toy-org/tiny-sft", tiny_family["rl2"], commit_of("sft-main")),
        RL: add_commit(cache, RL, tiny_family["rl"], commit_of("rl")),
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HUB_CACHE", str(cache))
        yield {"cache": cache, "snapshots": {k: str(v) for k, v in snaps.items()}}


def dots_recipe(base, sft, rl, **extra):
    return {"merge_method": "dots", "base_model": base, "dtype": "float32",
            "models": [{"model": sft, "parameters": {"weight": WEIGHTS[SFT_V1]}},
                       {"model": rl, "parameters": {"weight": WEIGHTS[RL]}}],
            "parameters": {"density": 0.3}, **extra}


@pytest.fixture(scope="module")
def recipe(hub, tmp_path_factory):
    search = {"samples": 2, "max_tokens": 8, "temperature": 0.8, "engine": ENGINE}
    return write_recipe(tmp_path_factory.mktemp("hub-recipe") / "hub.yml",
                        dots_recipe(BASE, SFT_V1, RL, search=search))


# ------------------------------------------------------------------ no engine
def test_ids_resolve_to_cache_snapshots(hub, tiny_family, monkeypatch):
    from mergekit_rlvr.hub import resolve_model

    snaps = hub["snapshots"]
    assert resolve_model(BASE) == snaps[BASE]
    assert resolve_model("toy-org/tiny-sft") == snaps["toy-org/tiny-sft"]  # main
    assert resolve_model(SFT_V1) == snaps[SFT_V1]  # a branch
    assert resolve_model("toy-org/tiny-sft@" + commit_of("sft-v1")) == snaps[SFT_V1]  # a commit
    assert resolve_model(tiny_family["base"]) == tiny_family["base"]  # local directories as they are
    monkeypatch.chdir(Path(tiny_family["base"]).parent)
    assert resolve_model("base") == tiny_family["base"]


@pytest.mark.parametrize("model, message", [
    ("toy-org/missing", "model toy-org/missing: not in the Hugging Face cache"),
    ("toy-org/tiny-sft@v9", "model toy-org/tiny-sft@v9: not in the Hugging Face cache"),
    ("./no/such/dir", "model ./no/such/dir: no such local directory, and not a Hugging Face id"),
    ("a@b@c", "model a@b@c: not a model path or Hugging Face id"),
])
def test_unresolvable_models_fail_in_one_line(hub, model, message):
    from mergekit_rlvr.decompose import decompose
    from mergekit_rlvr.errors import UserError

    with pytest.raises(UserError) as error:
        decompose(dots_recipe(BASE, model, RL))
    assert str(error.value).startswith("recipe: " + message)
    assert "\n" not in str(error.value)


def test_decompose_keeps_names_as_written(hub, recipe):
    from mergekit_rlvr.decompose import decompose
    from mergekit_rlvr.cli.serve import MODELS_ENV, server_command

    d = decompose(str(recipe))
    assert d.coefficient_dict() == WEIGHTS
    assert d.base_path == hub["snapshots"][BASE]
    assert d.model_paths == [hub["snapshots"][SFT_V1], hub["snapshots"][RL]]
    argv, env = server_command(recipe, ["--port", "1"])
    assert argv[argv.index("--model") + 1] == hub["snapshots"][BASE]
    assert json.loads(env[MODELS_ENV]) == {m: hub["snapshots"][m] for m in (BASE, SFT_V1, RL)}


# ------------------------------------------------------------------ one engine
@pytest.fixture(scope="module")
def engine(hub, recipe):
    from vllm_plugins.hotswap import HotSwapLLM

    llm = HotSwapLLM.from_recipe(str(recipe), **ENGINE)
    yield llm
    llm.close()


@pytest.mark.vllm
@pytest.mark.slow
def test_hotswap_on_hub_ids_equals_mergekit_yaml_on_paths(engine, hub, tiny_family, tmp_path):
    assert engine.llm.llm_engine.model_config.model == hub["snapshots"][BASE]
    assert engine.coefficients == WEIGHTS
    engine.set_coefficients({SFT_V1: 0.1, RL: 2.0})
    engine.set_coefficients(WEIGHTS)
    local = write_recipe(tmp_path / "local.yml", dots_recipe(tiny_family["base"], tiny_family["sft"],
                                                            tiny_family["rl"]))
    mergekit_yaml(local, tmp_path / "merged")
    merged = load_state(tmp_path / "merged")
    ours = engine.read_weights()[0]
    shared = [name for name in ours if name in merged]
    assert any("layernorm" in n for n in shared), (sorted(ours), sorted(merged))
    for name in shared:
        live = ours[name][: merged[name].shape[0]]  # vLLM pads the vocabulary rows
        assert torch.equal(live, merged[name]), name


@pytest.mark.vllm
@pytest.mark.slow
def test_search_on_hub_ids(engine, recipe, tmp_path):
    from mergekit_rlvr.search.runner import run_search

    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"prompt": q, "answer": "2"}) + "\n" for q in ("1+1?", "4-2?")))
    opened = []

    def open_engine(recipe_arg, kwargs):
        opened.append(recipe_arg)
        return engine

    summary = run_search(str(recipe), str(queries), str(tmp_path / "out"), {"trials": 2},
                         open_engine=open_engine, progress=False)
    assert opened == [str(recipe)]
    assert summary["complete_trials"] == 2
    assert list(summary["selected"]["coefficients"]) == [SFT_V1, RL]
    best = yaml.safe_load((tmp_path / "out" / "best.yml").read_text())
    assert best["base_model"] == BASE
    assert [m["model"] for m in best["models"]] == [SFT_V1, RL]
    assert [m["parameters"]["weight"] for m in best["models"]] == list(summary["selected"]["coefficients"].values())


# ------------------------------------------------------------------ one server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(hub, recipe, tmp_path_factory):
    requests = pytest.importorskip("requests")
    port = _free_port()
    log = tmp_path_factory.mktemp("hub-serve") / "server.log"
    cmd = [str(BIN / "mergekit-rlvr"), "serve", str(recipe), "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", "256", "--kv-cache-memory-bytes", str(64 << 20), "--enforce-eager"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONWARNINGS="ignore"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"server not ready:\n{log.read_text()[-3000:]}"
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)  # poll interval; the deadline bounds the wait
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


@pytest.mark.vllm
@pytest.mark.slow
def test_serve_on_hub_ids(server, engine, hub):
    import requests
    from vllm import SamplingParams

    merge = requests.get(server + "/v1/merge", timeout=60).json()
    assert merge["coefficients"] == WEIGHTS
    model = requests.get(server + "/v1/models", timeout=60).json()["data"][0]
    assert model["root"] == hub["snapshots"][BASE]
    engine.set_coefficients(WEIGHTS)
    expected = engine.generate(["hello world"], SamplingParams(max_tokens=8, temperature=0.0),
                               use_tqdm=False)[0].outputs[0].text
    body = {"model": model["id"], "prompt": "hello world", "max_tokens": 8, "temperature": 0}
    got = requests.post(server + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    assert got == expected
