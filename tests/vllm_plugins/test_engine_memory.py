"""KV-cache sizing before vLLM starts (vllm_plugins.memory), without an engine:
hand-computed sizes, the one-line errors of settings that cannot fit, and the
commands refusing them before any engine starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_recipe
from mergekit_rlvr.errors import UserError
from vllm_plugins import memory
from vllm_plugins.memory import MiB, GiB, Memory

BIN = Path(sys.executable).parent
#: the machine of the bug report: 10 GB on NUMA node 0, 9.2 GB of it free
SMALL_NODE = Memory(total=10 * GiB, available=int(9.2 * GiB), where="NUMA node 0")


def test_kv_bytes_per_token_by_hand(tiny_family):
    # tiny Qwen2: 2 layers, 1 KV head of 64, float32: K and V = 2 x 2 x 1 x 64 x 4 bytes
    assert memory.kv_bytes_per_token(tiny_family["base"]) == 1024
    assert memory.kv_bytes_per_token(tiny_family["base"], dtype="bfloat16") == 512
    assert memory.kv_bytes_per_token(tiny_family["base"], dtype="bfloat16", kv_cache_dtype="fp8") == 256
    assert memory.kv_cache_bytes(tiny_family["base"], 1000) == 1 * MiB  # 1,024,000 bytes, rounded up
    assert memory.max_model_len(tiny_family["base"], {}) == 4096  # the model's own context


def test_cpu_engine_without_settings_gets_bytes_for_what_it_runs(tiny_family):
    # 512 tokens (two 256-token blocks) x 1 KiB x 8 sequences = 4 MiB
    kwargs = memory.plan_cpu({"max_model_len": 512}, tiny_family["base"], SMALL_NODE, sequences=8)
    assert kwargs == {"max_model_len": 512, "kv_cache_memory_bytes": 4 * MiB}
    # default: vLLM's 256 sequences; capped by a quarter of what the node has free
    assert memory.plan_cpu({"max_model_len": 512}, tiny_family["base"], SMALL_NODE)["kv_cache_memory_bytes"] \
        == 256 * 512 * 1024
    tight = Memory(total=GiB, available=64 * MiB, where="NUMA node 0")
    assert memory.plan_cpu({"max_model_len": 512}, tiny_family["base"], tight)["kv_cache_memory_bytes"] == 16 * MiB


def test_explicit_bytes_are_kept_or_refused_in_one_line(tiny_family):
    base = tiny_family["base"]
    kept = memory.plan_cpu({"max_model_len": 512, "kv_cache_memory_bytes": 3 * MiB}, base, SMALL_NODE)
    assert kept["kv_cache_memory_bytes"] == 3 * MiB
    with pytest.raises(UserError, match=r"^search\.engine\.kv_cache_memory_bytes 1000: one 512-token sequence "
                                        r"needs 524288 bytes"):
        memory.plan_cpu({"max_model_len": 512, "kv_cache_memory_bytes": 1000}, base, SMALL_NODE,
                        prefix="search.engine.")
    with pytest.raises(UserError, match=r"^--kv-cache-memory-bytes 21474836480 \(20.00 GiB\) is more than the "
                                        r"9.20 GiB free on NUMA node 0"):
        memory.plan_cpu({"kv_cache_memory_bytes": 20 * GiB}, base, SMALL_NODE, prefix="--")


def test_a_small_ram_fraction_on_cpu_is_refused_before_the_engine(tiny_family):
    """The bug: 0.05 x 10 GB is below an engine's own RSS."""
    with pytest.raises(UserError) as error:
        memory.plan_cpu({"gpu_memory_utilization": 0.05, "max_model_len": 128}, tiny_family["base"], SMALL_NODE,
                        prefix="search.engine.")
    line = str(error.value)
    assert line.startswith("search.engine.gpu_memory_utilization 0.05: on CPU vLLM gives its KV cache 0.05 x "
                           "10.00 GiB")
    assert "set search.engine.kv_cache_memory_bytes instead" in line and "\n" not in line
    # a fraction that leaves room becomes the bytes it stands for: 0.5 x 10 GiB minus the
    # engine's own 768 MiB and weights, whole MiB (vLLM is never left to size from RAM)
    weights = sum(f.stat().st_size for f in Path(tiny_family["base"]).glob("*.safetensors"))
    assert memory.plan_cpu({"gpu_memory_utilization": 0.5}, tiny_family["base"], SMALL_NODE) == \
        {"kv_cache_memory_bytes": (5 * GiB - 768 * MiB - weights) // MiB * MiB}


def test_gpu_fraction_above_the_free_memory_is_refused():
    card = Memory(total=80 * GiB, available=60 * GiB, where="cuda:0")
    with pytest.raises(UserError, match=r"^gpu_memory_utilization 0.9: vLLM would take 72.00 GiB of cuda:0, "
                                        r"which has 60.00 GiB free; set gpu_memory_utilization to at most 0.75$"):
        memory.check_gpu({"gpu_memory_utilization": 0.9}, card)
    memory.check_gpu({"gpu_memory_utilization": 0.7}, card)
    memory.check_gpu({"kv_cache_memory_bytes": GiB}, card)  # vLLM then takes no fraction


def test_vllm_memory_errors_become_one_line():
    vllm_says = ("Available memory on node 0 (9.23/9.96 GiB) on kv cache allocation is less than requested "
                 "memory for kv (-0.2/0.5 GiB). Reduce CPU memory used by other processes.")
    with pytest.raises(UserError) as error:
        with memory.start_errors("search.engine."):
            try:
                raise ValueError(vllm_says)
            except ValueError as inner:
                raise RuntimeError("worker failed") from inner
    assert str(error.value) == (f"the vLLM engine could not size its KV cache ({vllm_says}); set "
                                "search.engine.kv_cache_memory_bytes (CPU) or a lower "
                                "search.engine.gpu_memory_utilization (GPU)")
    with pytest.raises(UserError, match="failed to start .* if it ran out of memory, set kv_cache_memory_bytes"):
        with memory.start_errors():
            raise RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): {}")
    with pytest.raises(KeyError):  # anything else is not ours to reword
        with memory.start_errors():
            raise KeyError("model.layers.0")


def _search(recipe: Path, queries: Path, out: Path):
    return subprocess.run([str(BIN / "mergekit-rlvr"), "search", str(recipe), "--queries", str(queries),
                           "--out", str(out), "--trials", "1"], capture_output=True, text=True)


@pytest.mark.slow
def test_search_with_a_tiny_ram_fraction_fails_in_one_line_before_the_engine(tiny_family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", {
        "merge_method": "dots", "base_model": tiny_family["base"], "dtype": "float32",
        "models": [{"model": tiny_family["sft"], "parameters": {"weight": 1.0}},
                   {"model": tiny_family["rl"], "parameters": {"weight": 1.0}}],
        # 1e-4 of any node below 7 TB is less than an engine's own memory
        "search": {"engine": {"gpu_memory_utilization": 1e-4, "max_model_len": 128}},
    })
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"prompt": "1+1?"}\n')
    proc = _search(recipe, queries, tmp_path / "out")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: search.engine.gpu_memory_utilization 0.0001: on CPU vLLM gives"), lines
    assert "search.engine.kv_cache_memory_bytes" in lines[-1]
    assert "Traceback" not in proc.stderr and "Initializing" not in proc.stderr  # no engine was started


def test_serve_sizes_the_kv_cache_in_bytes_on_cpu(tiny_family):
    from mergekit_rlvr.cli.serve import kv_cache_args

    # 512 tokens x 1 KiB x vLLM's 256 sequences
    assert kv_cache_args(tiny_family["base"], ["--max-model-len", "512"]) == \
        ["--kv-cache-memory-bytes", str(256 * 512 * 1024)]
    assert kv_cache_args(tiny_family["base"], ["--max-model-len=512", "--max-num-seqs", "4"]) == \
        ["--kv-cache-memory-bytes", str(4 * 512 * 1024)]
    assert kv_cache_args(tiny_family["base"], ["--kv-cache-memory-bytes", str(8 << 20)]) == []
    with pytest.raises(UserError, match=r"^--gpu-memory-utilization 0.0001: on CPU"):
        kv_cache_args(tiny_family["base"], ["--gpu-memory-utilization", "0.0001"])
    with pytest.raises(UserError, match=r"^--max-model-len 4k: give a number"):
        kv_cache_args(tiny_family["base"], ["--max-model-len", "4k"])
    # serve reserves the hot swap's bytes first: a swap larger than the node fails in one line
    with pytest.raises(UserError, match=r"^the hot swap needs .* per device beside the weights"):
        kv_cache_args(tiny_family["base"], ["--max-model-len", "512"], swap_bytes=1 << 50)


@pytest.mark.slow
def test_serve_refuses_a_recipe_whose_swap_cannot_fit_before_vllm_starts(tiny_family, tmp_path):
    """server_command sizes the swap from the recipe (vllm_plugins.plan) and takes it
    from the KV cache's room: with a KV cache of all node 0 has free, one line, no engine."""
    from mergekit_rlvr.cli.serve import server_command
    from vllm_plugins import memory

    recipe = write_recipe(tmp_path / "dots.yml", {"merge_method": "dots", "base_model": tiny_family["base"],
                                                  "dtype": "float32",
                                                  "models": [{"model": tiny_family["sft"], "parameters": {"weight": 1.0}}]})
    free = memory._node_memory().available
    with pytest.raises(UserError, match=r"^the hot swap needs [0-9.]+ [GM]iB per device"):
        server_command(recipe, ["--kv-cache-memory-bytes", str(free - (1 << 20))])
    argv, _ = server_command(recipe, ["--max-model-len", "512"])
    assert argv[argv.index("--kv-cache-memory-bytes") + 1] == str(256 * 512 * 1024)


def test_hot_swap_memory_is_reserved_before_vllm_sizes_its_cache(tiny_family):
    """The swap's bytes per device (vllm_plugins.plan.swap_bytes) are taken first: on
    CPU from what the KV cache may have, on a GPU off gpu_memory_utilization."""
    base = tiny_family["base"]
    swap = 2 * GiB
    auto = memory.plan_cpu({"max_model_len": 512}, base, SMALL_NODE, swap_bytes=swap)["kv_cache_memory_bytes"]
    assert auto == 256 * 512 * 1024  # 128 MiB still fits in a quarter of the 7.2 GiB left
    weights = sum(f.stat().st_size for f in Path(base).glob("*.safetensors"))
    assert memory.plan_cpu({"gpu_memory_utilization": 0.5}, base, SMALL_NODE, swap_bytes=swap) == \
        {"kv_cache_memory_bytes": (5 * GiB - swap - 768 * MiB - weights) // MiB * MiB}
    with pytest.raises(UserError, match=r"^the hot swap needs 2.00 GiB per device beside the weights, .* NUMA node 0 "
                                        r"has 9.20 GiB free; options: --kv-cache-memory-bytes at most"):
        memory.plan_cpu({"kv_cache_memory_bytes": 8 * GiB}, base, SMALL_NODE, prefix="--", swap_bytes=swap)
    card = Memory(total=80 * GiB, available=79 * GiB, where="cuda:0")
    lowered = memory.check_gpu({"gpu_memory_utilization": 0.9}, card, swap_bytes=10 * GiB, weight_bytes=15 * GiB)
    assert lowered == {"gpu_memory_utilization": 0.775}  # 0.9 - 10/80
    with pytest.raises(UserError, match=r"^the hot swap needs 60.00 GiB per device .* cuda:0 has 79.00 GiB free"):
        memory.check_gpu({"gpu_memory_utilization": 0.9}, card, swap_bytes=60 * GiB, weight_bytes=15 * GiB)


def test_a_recipe_too_large_for_its_memory_fails_before_the_engine_starts(tiny_family, monkeypatch):
    from mergekit_rlvr.decompose import decompose
    from vllm_plugins import HotSwapLLM
    from vllm_plugins.plan import swap_bytes

    recipe = {"merge_method": "dots", "base_model": tiny_family["base"], "dtype": "float32",
              "models": [{"model": tiny_family["sft"], "parameters": {"weight": 0.7, "density": 0.3}},
                         {"model": tiny_family["rl"], "parameters": {"weight": 1.3, "density": 0.3}}]}
    planned = swap_bytes(decompose(recipe))
    assert 0 < planned["per_rank"] == planned["total"] <= 1.3 * planned["weights"]
    weights = sum(f.stat().st_size for f in Path(tiny_family["base"]).glob("*.safetensors"))
    # room for the engine and its 64 MiB cache, but not for the swap beside them
    room = memory.WORKER_BASE_RSS + weights + 64 * MiB + planned["per_rank"] // 2
    monkeypatch.setattr(memory, "_node_memory", lambda: Memory(total=GiB, available=room, where="NUMA node 0"))
    monkeypatch.setattr(memory, "_on_cpu", lambda: True)
    with pytest.raises(UserError, match=r"^the hot swap needs .* per device beside the weights") as error:
        HotSwapLLM.from_recipe(recipe, kv_cache_memory_bytes=64 * MiB, max_model_len=128)
    line = str(error.value)
    assert "\n" not in line and "options:" in line and "kv_cache_memory_bytes at most" in line
