"""Check the family's point: grid a few DoTS coefficient pairs, materialize each
merge with the real ``mergekit-yaml`` and score base, sft, rl and every merge on
the held-out sets (labels used: this is an oracle check, not the label-free search).

    python -m mergekit_rlvr.toy.probe FAMILY_DIR [--grid-sft 0.5,1,1.5 --grid-rl 0.5,1,2,4]
        [--backend hf|vllm] [--verify-vllm]

Writes FAMILY_DIR/probe/probe.json and probe.png (union accuracy heat map)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Sequence

import yaml


def mergekit_yaml(recipe: dict, out: str) -> None:
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
    try:
        proc = subprocess.run([exe, f.name, out], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"mergekit-yaml failed: {proc.stderr.strip().splitlines()[-1:]}")
    finally:
        os.unlink(f.name)


def probe(family_dir: str, grid_sft: Sequence[float], grid_rl: Sequence[float], backend: str = "hf",
          density: float = 0.3, verify_vllm: bool = False) -> Dict:
    from tqdm.auto import tqdm

    from mergekit_rlvr.toy.evaluate import evaluate
    from mergekit_rlvr.toy.family import dots_recipe
    from mergekit_rlvr.toy.tasks import eval_sets

    with open(os.path.join(family_dir, "family.json")) as f:
        settings = json.load(f)["settings"]
    sets = eval_sets(settings["eval_size"], settings["seed"])
    paths = {s: os.path.join(family_dir, s) for s in ("base", "sft", "rl")}
    result = {"parents": {}, "merges": [], "density": density, "backend": backend}
    for name, path in paths.items():
        result["parents"][name] = evaluate(path, sets, backend=backend)
    work = os.path.join(family_dir, "probe")
    os.makedirs(work, exist_ok=True)
    pairs = [(a, b) for a in grid_sft for b in grid_rl]
    for l_sft, l_rl in tqdm(pairs, desc="dots merges"):
        out = os.path.join(work, f"merge_{l_sft}_{l_rl}")
        mergekit_yaml(dots_recipe(paths, l_sft, l_rl, density), out)
        acc = evaluate(out, sets, backend=backend)
        shutil.rmtree(out, ignore_errors=True)
        result["merges"].append({"l_sft": l_sft, "l_rl": l_rl, **acc})
    best = max(result["merges"], key=lambda m: m["union"])
    result["best"] = best
    if verify_vllm and backend != "vllm":
        # the parents and the best merge again, greedy on a vLLM CPU engine
        out = os.path.join(work, "best")
        mergekit_yaml(dots_recipe(paths, best["l_sft"], best["l_rl"], density), out)
        result["vllm"] = {name: evaluate(path, sets, backend="vllm") for name, path in dict(paths, merged=out).items()}
        shutil.rmtree(out, ignore_errors=True)
    with open(os.path.join(work, "probe.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, grid_sft, grid_rl, os.path.join(work, "probe.png"))
    with open(os.path.join(work, "probe.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def plot(result: Dict, grid_sft, grid_rl, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    table = np.zeros((len(grid_sft), len(grid_rl)))
    for m in result["merges"]:
        table[list(grid_sft).index(m["l_sft"]), list(grid_rl).index(m["l_rl"])] = m["union"]
    fig, ax = plt.subplots(figsize=(5, 4))
    im = ax.imshow(table, vmin=0, vmax=1, cmap="viridis", origin="lower")
    ax.set_xticks(range(len(grid_rl)), [str(v) for v in grid_rl])
    ax.set_yticks(range(len(grid_sft)), [str(v) for v in grid_sft])
    ax.set_xlabel("lambda_rl")
    ax.set_ylabel("lambda_sft")
    for i in range(table.shape[0]):
        for j in range(table.shape[1]):
            ax.text(j, i, f"{table[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
    p = result["parents"]
    ax.set_title(f"DoTS union accuracy (base {p['base']['union']:.2f}, sft {p['sft']['union']:.2f}, "
                 f"rl {p['rl']['union']:.2f})", fontsize=8)
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _floats(text: str) -> List[float]:
    return [float(v) for v in text.split(",")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family_dir")
    parser.add_argument("--grid-sft", default="0.5,1.0,1.5")
    parser.add_argument("--grid-rl", default="0.5,1.0,2.0,4.0")
    parser.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    parser.add_argument("--density", type=float, default=0.3)
    parser.add_argument("--verify-vllm", action="store_true", help="Score parents and best merge on vLLM too.")
    args = parser.parse_args(argv)
    from mergekit_rlvr.toy.lm import set_threads

    set_threads(1)  # far faster than 2 on a busy 2-core machine
    r = probe(args.family_dir, _floats(args.grid_sft), _floats(args.grid_rl), args.backend, args.density,
              args.verify_vllm)
    for name, acc in r["parents"].items():
        print(f"{name:>6}: K {acc['K']:.3f}  R {acc['R']:.3f}  union {acc['union']:.3f}")
    for m in r["merges"]:
        print(f"dots l_sft={m['l_sft']:<4} l_rl={m['l_rl']:<4}: K {m['K']:.3f}  R {m['R']:.3f}  union {m['union']:.3f}")
    b = r["best"]
    print(f"best: l_sft={b['l_sft']} l_rl={b['l_rl']} union {b['union']:.3f}")
    for name, acc in r.get("vllm", {}).items():
        print(f"vllm {name:>6}: K {acc['K']:.3f}  R {acc['R']:.3f}  union {acc['union']:.3f}")


if __name__ == "__main__":
    main()
