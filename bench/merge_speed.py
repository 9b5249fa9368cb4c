"""Merge speed and peak memory: dots vs mergekit's task_arithmetic and ties.

Writes a base and two fine-tuned checkpoints of at least 1 GB each (float32,
Qwen2-shaped, so plain mergekit-yaml reads them), then merges them with each
method through the real `mergekit-yaml`, side by side in one run (methods
interleaved over the rounds so that machine load hits all of them alike), and
prints wall time, peak RSS of each merge process and the ratios.

    .venv/bin/python bench/merge_speed.py [--rounds 2] [--layers 18] [--keep DIR]
"""

from __future__ import annotations

import argparse
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
SHARD = "200M"  # output shard size in parameters, the same for every method


def make_models(root: Path, layers: int) -> dict:
    from mergekit_rlvr.toy.tiny import write_family

    if (root / "family.json").exists():
        return {n: str(root / n) for n in ("base", "sft", "rl")}
    return write_family(str(root), {"sft": (0.3, 1.0), "rl": (0.01, 0.3)}, hidden=1024,
                        layers=layers, intermediate=4096)


def recipe(method: str, models: dict) -> dict:
    entries = [{"model": models["sft"], "parameters": {"weight": 0.79}},
               {"model": models["rl"], "parameters": {"weight": 1.82}}]
    out = {"merge_method": method, "base_model": models["base"], "models": entries, "dtype": "float32"}
    if method in ("dots", "ties"):
        for e in entries:
            e["parameters"]["density"] = 0.3
    return out


def run(method: str, models: dict, work: Path) -> tuple:
    path = work / f"{method}.yml"
    path.write_text(yaml.safe_dump(recipe(method, models)))
    out = work / f"out-{method}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "mergekit-yaml"), str(path), str(out), "--quiet",
                             "--out-shard-size", SHARD], stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{method} failed:\n{proc.stderr.read()[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return elapsed, usage.ru_maxrss * 1024  # kB -> bytes on Linux


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", type=int, default=18)  # 1.07 GB per checkpoint in float32
    parser.add_argument("--keep", type=Path, help="cache the generated models here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="merge-speed-"))
    root = args.keep or work / "models"
    try:
        print(f"writing models in {root} ...", flush=True)
        models = make_models(root, args.layers)
        size = (Path(models["base"]) / "model.safetensors").stat().st_size
        from safetensors import safe_open

        with safe_open(str(Path(models["base"]) / "model.safetensors"), "pt") as f:
            largest = max(f.get_slice(k).get_shape()[0] * (f.get_slice(k).get_shape() + [1])[1] for k in f.keys()) * 4
        print(f"each checkpoint: {size / 1e9:.2f} GB; largest tensor {largest / 1e6:.0f} MB")
        for name in ("base", "sft", "rl"):  # page cache warm for every method alike
            with open(Path(models[name]) / "model.safetensors", "rb") as f:
                while f.read(1 << 26):
                    pass
        methods = ["task_arithmetic", "dots", "ties"]
        times = {m: [] for m in methods}
        peaks = {m: [] for m in methods}
        for r in range(args.rounds):
            for m in methods:
                t, peak = run(m, models, work)
                times[m].append(t)
                peaks[m].append(peak)
                print(f"round {r + 1}: {m:16s} {t:7.1f} s  peak RSS {peak / 1e9:.2f} GB", flush=True)
        med = {m: statistics.median(v) for m, v in times.items()}
        peak = {m: max(v) for m, v in peaks.items()}
        print("\nmethod            median s   peak RSS GB")
        for m in methods:
            print(f"{m:16s} {med[m]:9.1f} {peak[m] / 1e9:12.2f}")
        print(f"\ndots / task_arithmetic time: {med['dots'] / med['task_arithmetic']:.2f}x  (goal <= 1.3x)")
        print(f"dots / ties time:            {med['dots'] / med['ties']:.2f}x  (goal <= 1.0x)")
        print(f"dots peak RSS / checkpoint size: {peak['dots'] / size:.2f};"
              f" dots - task_arithmetic peak: {(peak['dots'] - peak['task_arithmetic']) / 1e6:.0f} MB"
              f" (= {(peak['dots'] - peak['task_arithmetic']) / largest:.1f} largest tensors)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
