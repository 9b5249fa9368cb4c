"""The demo pipeline: the steps a user takes at 7B, on the toy family.

analyze -> select-queries -> search (objective dots, one hot-swapped engine) ->
mergekit-yaml on best.yml -> a live `serve` round trip -> held-out evaluation of
base, sft, rl and the merge. Every step runs the real command in a subprocess, as
a user would; the evaluation starts one vLLM engine per model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import yaml

from mergekit_rlvr.io.atomic import write_atomic

BIN = Path(sys.executable).parent
#: vLLM's engine core in the calling process (a documented vLLM switch): a toy engine
#: starts in ~3 s instead of ~25 s, two fewer processes importing vLLM and torch. Used
#: for select-queries, search and the evaluation; `serve` keeps vLLM's default.
IN_PROCESS_ENGINE = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def say(message: str) -> None:
    print(f"\n== {message}", flush=True)


def run(command: List[str], what: str, env: Optional[Dict[str, str]] = None) -> float:
    """Run a command with its own progress output; returns seconds."""
    print("$ " + "".join(f"{k}={v} " for k, v in (env or {}).items()) + " ".join(str(c) for c in command),
          flush=True)
    start = time.perf_counter()
    proc = subprocess.run([str(c) for c in command], env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"demo: {what} failed (exit code {proc.returncode})")
    return time.perf_counter() - start


def cli(*args) -> List[str]:
    return [sys.executable, "-m", "mergekit_rlvr.cli", *args]


def search_recipe(paths: Dict[str, str], trials: int, samples: int, engine: dict, seed: int = 0) -> dict:
    from mergekit_rlvr.toy.family import dots_recipe

    recipe = dots_recipe(paths, 1.0, 1.0)
    recipe["search"] = {
        "objective": "dots", "trials": trials, "sampler": "tpe", "bounds": [0.0, 2.0],
        # The paper samples at 0.6. The toy K answers are four independently sampled
        # letters: at 0.6 every sample of a K query differs even where the merge
        # answers it right greedily, and consistency cannot see task K at all (all
        # K queries score 1/samples). At 0.3 it can (see README, "The toy family").
        "samples": samples, "temperature": 0.3, "max_tokens": 40, "perplexity": "prompt",
        "select": "max_consistency", "seed": seed, "engine": engine,
        # the toy prompts are complete as they are: no chat template, no appended instruction
        "template": "{prompt}", "instruction": "",
    }
    return recipe


def write_yaml(path: Path, data: dict) -> Path:
    write_atomic(str(path), yaml.safe_dump(data, sort_keys=False).encode())
    return path


def evaluate_all(paths: Dict[str, str], eval_sets, merged: str) -> tuple:
    """Accuracies of every model, and the seconds a fresh engine took to start on
    the merged checkpoint (what the authors' code pays per trial, after writing)."""
    from vllm import LLM

    from mergekit_rlvr.toy.evaluate import evaluate, vllm_kwargs

    results, start_s = {}, None
    for name, path in [("base", paths["base"]), ("sft", paths["sft"]), ("rl", paths["rl"])]:
        # Hugging Face greedy decoding gives the same answers as vLLM on these tiny
        # models (checked in tests/toy/test_toy.py) without three more engine starts.
        results[name] = evaluate(path, eval_sets, backend="hf")
        print(f"  {name:7s} " + "  ".join(f"{k}={v:.3f}" for k, v in results[name].items()), flush=True)
    os.environ.update(IN_PROCESS_ENGINE)
    for name, path in [("merged", merged)]:
        started = time.perf_counter()
        kwargs = vllm_kwargs(path)
        print(f"  engine on {name}: kv_cache_memory_bytes={kwargs['kv_cache_memory_bytes']} "
              f"({kwargs['max_num_seqs']} sequences x {kwargs['max_model_len']} tokens)", flush=True)
        llm = LLM(model=path, **kwargs)
        if name == "merged":
            start_s = time.perf_counter() - started
        results[name] = evaluate(llm, eval_sets)
        print(f"  {name:7s} " + "  ".join(f"{k}={v:.3f}" for k, v in results[name].items()), flush=True)
        del llm
        import gc

        gc.collect()
    return results, start_s


def plot(summary: dict, search_dir: Path, out: Path) -> None:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    acc = summary["accuracy_by_task"]
    names = list(acc)
    tasks = [t for t in next(iter(acc.values())) if t != "union"] + ["union"]
    width = 0.8 / len(tasks)
    for i, task in enumerate(tasks):
        left.bar([j + i * width for j in range(len(names))], [acc[n][task] for n in names], width, label=task)
    left.set_xticks([j + width * (len(tasks) - 1) / 2 for j in range(len(names))], names)
    left.set_ylim(0, 1)
    left.set_ylabel("held-out accuracy")
    left.set_title("toy family: parents vs the searched DoTS merge")
    left.legend()
    with open(search_dir / "trials.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("consistency") not in (None, "")]
    xs = [float(r["perplexity"]) for r in rows]
    ys = [float(r["consistency"]) for r in rows]
    right.scatter(xs, ys, c="tab:gray", label="trials")
    front = summary["search"].get("pareto_front") or []
    fx = sorted((p["objectives"]["perplexity"], p["objectives"]["consistency"]) for p in front)
    if fx:
        right.plot([p[0] for p in fx], [p[1] for p in fx], "o-", c="tab:blue", label="Pareto front")
    sel = summary["search"].get("selected") or {}
    if sel:
        right.scatter([sel["objectives"]["perplexity"]], [sel["objectives"]["consistency"]], marker="*", s=250,
                      c="tab:red", zorder=5, label="selected")
    right.set_xscale("log")
    from matplotlib.ticker import NullFormatter

    right.xaxis.set_minor_formatter(NullFormatter())  # the minor labels overlap on a short range
    right.set_xlabel("perplexity (lower is better, log scale)")
    right.set_ylabel("consistency (higher is better)")
    right.set_title("label-free coefficient search")
    right.legend()
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)


def _family(family_dir: Path, timings: dict):
    from mergekit_rlvr.toy.family import build_family

    say(f"1/7 toy family in {family_dir} (trained once, then reused)")
    started = time.perf_counter()
    family = build_family(str(family_dir), log=lambda m: print("  " + m, flush=True))
    timings["family_s"] = time.perf_counter() - started
    updates = family.info.get("updates", {})
    if updates:
        print(f"  ||tau_sft|| / ||tau_rl|| = {updates.get('norm_ratio_sft_over_rl', float('nan')):.1f}")
    return family, updates


def _analyze(out: Path, paths: Dict[str, str], timings: dict) -> None:
    say("2/7 analyze the task vectors (streaming, all the papers' measurements)")
    analysis = out / "analysis"
    timings["analyze_s"] = run(cli("analyze", "--base", paths["base"], paths["sft"], paths["rl"], "--out", analysis,
                                   "--no-progress"), "analyze")
    report = (analysis / "report.md").read_text().strip().splitlines()
    findings = [l for l in report if l.strip() and not l.startswith("#") and not l.startswith("|")][:6]
    for line in findings:
        print("  " + line)


def _select(out: Path, recipe: Path, pool: Path, n_queries: int, samples: int, seed: int, timings: dict) -> Path:
    say(f"3/7 difficulty-aware query selection: {n_queries} of {sum(1 for _ in open(pool))} unlabeled prompts")
    queries = out / "queries.jsonl"
    command = cli("select-queries", recipe, "--pool", pool, "--out", queries, "-n", n_queries,
                  "--samples", samples, "--seed", seed)
    timings["select_s"] = run(command, "select-queries", IN_PROCESS_ENGINE)
    kept = sum(1 for line in open(queries) if line.strip())
    if kept < n_queries // 2:
        print(f"  only {kept} queries passed the difficulty threshold 1 - 1/{samples} = {1 - 1 / samples:.3f}; "
              "selecting again without it")
        timings["select_s"] += run(command + ["--threshold", "1.0"], "select-queries", IN_PROCESS_ENGINE)
    return queries


def _search(out: Path, recipe: Path, queries: Path, trials: int, timings: dict):
    say(f"4/7 coefficient search: {trials} trials on one hot-swapped engine (no checkpoint written per trial)")
    search_dir = out / "search"
    shutil.rmtree(search_dir, ignore_errors=True)  # a fresh study each run (the family is what is cached)
    timings["search_s"] = run(cli("search", recipe, "--queries", queries, "--out", search_dir, "--trials", trials),
                              "search", IN_PROCESS_ENGINE)
    search = json.loads((search_dir / "summary.json").read_text())
    selected = search["selected"]["coefficients"]
    print("  selected: " + ", ".join(f"{Path(k).name}={v:.3f}" for k, v in selected.items()))

    say("5/7 materialize best.yml with plain mergekit-yaml")
    merged = out / "merged"
    shutil.rmtree(merged, ignore_errors=True)
    timings["materialize_s"] = run([BIN / "mergekit-yaml", search_dir / "best.yml", merged, "--quiet"],
                                   "mergekit-yaml")
    return search_dir, search, merged


def _serve(out: Path, family, search_dir: Path, selected: Dict[str, float], engine: dict, timings: dict) -> dict:
    from mergekit_rlvr.demo.serve_roundtrip import roundtrip

    say("6/7 serve best.yml, one completion, one live coefficient change, stop")
    prompt = family.eval_sets[next(iter(family.eval_sets))][0].prompt
    other = {k: round(2.0 - v, 3) for k, v in selected.items()}
    serve_args = ["--dtype", engine["dtype"], "--max-model-len", str(engine["max_model_len"]),
                  "--kv-cache-memory-bytes", str(engine["kv_cache_memory_bytes"]), "--enforce-eager"]
    started = time.perf_counter()
    served = roundtrip(str(search_dir / "best.yml"), prompt, other, serve_args, str(out / "serve.log"))
    timings["serve_s"] = time.perf_counter() - started
    print(f"  v{served['before']['version']} {served['before']['text']!r}")
    print(f"  swap to {other}: {served['swap']['seconds'] * 1000:.0f} ms")
    print(f"  v{served['after']['version']} {served['after']['text']!r}")
    return served


def _summary(accuracy, engine_start_s, search, served, family, updates, family_dir, seed, timings, t0) -> dict:
    summary = {
        "accuracy": {name: round(r["union"], 4) for name, r in accuracy.items()},
        "accuracy_by_task": {name: {k: round(v, 4) for k, v in r.items()} for name, r in accuracy.items()},
        "coefficients": search["selected"]["coefficients"],
        "swap_ms": round(served["swap"]["seconds"] * 1000, 1),
        "worker_swap_ms": None if served["swap"].get("worker_seconds") is None
        else round(served["swap"]["worker_seconds"] * 1000, 1),
        "reload_s": round(timings["materialize_s"] + engine_start_s, 1),
        "reload_parts_s": {"mergekit_yaml": round(timings["materialize_s"], 1),
                           "engine_start": round(engine_start_s, 1)},
        "serve": served,
        "search": {k: search.get(k) for k in ("selected", "pareto_front", "complete_trials", "settings")},
        "family": {"dir": str(family_dir), "updates": updates, "trained_now": family.trained},
        "seed": seed,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "total_s": round(time.perf_counter() - t0, 1),
    }
    summary["merged_beats_both_parents"] = (
        summary["accuracy"]["merged"] > max(summary["accuracy"]["sft"], summary["accuracy"]["rl"]))
    return summary


def run_demo(out: Path, family_dir: Path, trials: int, n_queries: int, samples: int, seed: int = 0) -> dict:
    from mergekit_rlvr.toy.evaluate import vllm_kwargs

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    timings: Dict[str, float] = {}
    family, updates = _family(family_dir, timings)
    paths = family.paths
    _analyze(out, paths, timings)

    engine = vllm_kwargs(paths["base"])
    print(f"  engines of select-queries, search and serve: kv_cache_memory_bytes="
          f"{engine['kv_cache_memory_bytes']} ({engine['max_num_seqs']} sequences x {engine['max_model_len']} "
          "tokens; never a fraction of RAM)", flush=True)
    recipe = write_yaml(out / "recipe.yml", search_recipe(paths, trials, samples, engine, seed))
    queries = _select(out, recipe, Path(family_dir) / "data" / "pool.jsonl", n_queries, samples, seed, timings)
    search_dir, search, merged = _search(out, recipe, queries, trials, timings)
    served = _serve(out, family, search_dir, search["selected"]["coefficients"], engine, timings)

    say("7/7 held-out accuracy (greedy) of base, sft, rl and the merge")
    accuracy, engine_start_s = evaluate_all(paths, family.eval_sets, str(merged))
    summary = _summary(accuracy, engine_start_s, search, served, family, updates, family_dir, seed, timings, t0)
    write_atomic(str(out / "summary.json"), (json.dumps(summary, indent=2) + "\n").encode())
    plot(summary, search_dir, out / "summary.png")
    return summary


def print_table(summary: dict) -> None:
    acc = summary["accuracy_by_task"]
    tasks = [t for t in next(iter(acc.values()))]
    print("\n| model | " + " | ".join(tasks) + " |")
    print("| --- | " + " | ".join("---" for _ in tasks) + " |")
    for name, row in acc.items():
        print(f"| {name} | " + " | ".join(f"{row[t]:.3f}" for t in tasks) + " |")
    c = ", ".join(f"{Path(k).name}={v:.3f}" for k, v in summary["coefficients"].items())
    print(f"\nselected coefficients: {c}")
    print(f"live swap: {summary['swap_ms']} ms; write merged model + start a fresh engine: {summary['reload_s']} s")
    verdict = "beats" if summary["merged_beats_both_parents"] else "does NOT beat"
    print(f"the searched merge {verdict} both parents on the union of the held-out sets")
