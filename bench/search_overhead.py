"""Search overhead on the hot-swapped engine vs the authors' per-trial reload.

Runs a short DoTS search (`mergekit_rlvr.search.runner.run_search`, the code behind
`mergekit-rlvr search`) on one HotSwapLLM over a generated tiny family and prints
the share of wall time after the engine has started that is spent outside
generation and scoring (Optuna, sqlite, swaps, report; goal: under 5%). In the same
run, on the same model, it times what the DoTS authors' code does per trial instead
of a swap: materialize the merge with the real `mergekit-yaml` and start a fresh
vLLM engine on it, and prints what that would have added for the same trials.

    .venv/bin/python bench/search_overhead.py [--trials 16] [--queries 64] [--samples 5] [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
ENGINE = {"dtype": "float32", "max_model_len": 512, "kv_cache_memory_bytes": 2**26, "seed": 0}
QUESTIONS = ["What is {a}+{b}?", "Compute {a}*{b}.", "What is {a}-{b}?", "Half of {a}{b}?"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="search-overhead-"))
    try:
        run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(args, root: Path):
    from mergekit_rlvr.search.runner import run_search
    from mergekit_rlvr.toy.tiny import write_family

    family = write_family(str(root / "family"), {"sft": (0.3, 1.0), "rl": (0.01, 0.3)})
    recipe = {
        "merge_method": "dots",
        "base_model": family["base"],
        "models": [{"model": family["sft"], "parameters": {"weight": 1.0}},
                   {"model": family["rl"], "parameters": {"weight": 1.0}}],
        "parameters": {"density": 0.3},
        "dtype": "float32",
        "search": {"trials": args.trials, "samples": args.samples, "max_tokens": args.max_tokens,
                   "engine": ENGINE},
    }
    recipe_path = root / "recipe.yml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    queries = root / "queries.jsonl"
    queries.write_text("".join(
        json.dumps({"prompt": QUESTIONS[i % len(QUESTIONS)].format(a=i + 2, b=2 * i + 1)}) + "\n"
        for i in range(args.queries)))

    # --- the search, as `mergekit-rlvr search` runs it: the engine (HotSwapLLM) starts
    # inside, at the first trial, after the recipe, queries and study are read
    start = time.perf_counter()
    summary = run_search(str(recipe_path), str(queries), str(root / "out"), progress=False)
    total = time.perf_counter() - start
    t = summary["timings"]
    engine_start = t["engine_start_s"]
    after_start = total - engine_start - t["setup_s"] - t["engine_close_s"]  # engine start/stop: once
    inside = t["generate_s"] + t["score_s"]
    import csv

    with open(root / "out" / "trials.csv") as f:
        swaps = [float(r["swap_s"]) for r in csv.DictReader(f)]

    # --- what the authors' code adds per trial: write the merge, start a fresh engine on it
    best = root / "out" / "best.yml"
    merged = root / "merged"
    start = time.perf_counter()
    proc = subprocess.run([str(BIN / "mergekit-yaml"), str(best), str(merged)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    materialize = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"mergekit-yaml failed:\n{proc.stderr[-2000:]}")
    from vllm import LLM

    start = time.perf_counter()
    fresh = LLM(model=str(merged), **ENGINE)
    fresh_start = time.perf_counter() - start
    from vllm_plugins.hotswap import shutdown

    shutdown(fresh)
    reload = materialize + fresh_start
    n = len(swaps)

    print(f"\nsearch overhead on the tiny model ({n} trials, {args.queries} queries x {args.samples} samples,"
          f" {args.max_tokens} tokens), one run:")
    print(f"  before the engine (recipe, queries, study)  {t['setup_s']:9.2f} s")
    print(f"  engine start / stop (once)                  {engine_start:9.2f} s / {t['engine_close_s']:.2f} s")
    print(f"  wall time after engine start                {after_start:9.2f} s")
    print(f"    of which generation + scoring             {inside:9.2f} s")
    print(f"    outside generation + scoring              {after_start - inside:9.2f} s  ="
          f" {100 * (after_start - inside) / after_start:.2f} %  (goal < 5 %)")
    print(f"      in the trial loop (Optuna, sqlite, swaps) {t['search_s'] - inside:7.2f} s  ="
          f" {100 * (t['search_s'] - inside) / t['search_s']:.2f} % of the loop")
    print(f"      after it (selection, plots, files)        {after_start - t['search_s']:7.2f} s")
    print(f"    per trial: {1000 * (t['search_s'] - inside) / n:.0f} ms outside vs {inside / n:.2f} s generating +"
          f" scoring (the share falls as generation grows: DoTS runs 64 queries x 5 x 8192 tokens)")
    print(f"    swaps: median {1000 * statistics.median(swaps):.1f} ms, total {sum(swaps):.2f} s")
    print(f"  authors' per-trial reload: mergekit-yaml {materialize:.2f} s + fresh engine {fresh_start:.2f} s"
          f" = {reload:.2f} s")
    print(f"    x {n} trials = {reload * n:.1f} s added, {reload * n / after_start:.1f}x this search's time;"
          f" per trial {reload / statistics.median(swaps):.0f}x a swap")


if __name__ == "__main__":
    main()
