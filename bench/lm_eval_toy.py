"""lm-eval scores of the toy family's parents and a searched DoTS merge, on one engine.

    python bench/lm_eval_toy.py FAMILY_DIR [--sft 1.067 --rl 1.314] [--limit N]

FAMILY_DIR is `mergekit-rlvr toy-family FAMILY_DIR`'s output. Tasks toy_k and toy_r are
written from its held-out sets (generate_until, the \\boxed{} answer extracted by lm-eval's
regex filter, exact_match). The parents are the corners of a task_arithmetic recipe on the
same base (base + 1.0 * (parent - base)), the merge is the DoTS recipe at the given
coefficients (default: the demo's selection at seed 0); one HotSwapLLM engine switches
between the two recipes with load_recipe. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import yaml

ENGINE = dict(dtype="float32", max_model_len=128, kv_cache_memory_bytes=64 << 20, enforce_eager=True, seed=0)


def write_tasks(family: str, directory: str) -> list:
    names = []
    for name in ("K", "R"):
        task = f"toy_{name.lower()}"
        names.append(task)
        with open(os.path.join(directory, f"{task}.yaml"), "w") as f:
            yaml.safe_dump({
                "task": task, "dataset_path": "json", "test_split": "test",
                "dataset_kwargs": {"data_files": {"test": os.path.join(family, "data", f"eval_{name}.jsonl")}},
                "output_type": "generate_until", "doc_to_text": "prompt", "doc_to_target": "answer",
                "generation_kwargs": {"until": ["\n"], "max_gen_toks": 40, "do_sample": False},
                "filter_list": [{"name": "boxed", "filter": [
                    {"function": "regex", "regex_pattern": r"\\boxed\{([^{}]*)\}", "group_select": -1},
                    {"function": "take_first"}]}],
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            }, f)
    return names


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("family")
    parser.add_argument("--sft", type=float, default=1.067)
    parser.add_argument("--rl", type=float, default=1.314)
    parser.add_argument("--limit", type=float)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # toy engine in process: ~3 s start
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import lm_eval
    from lm_eval.tasks import TaskManager

    from mergekit_rlvr.eval import HotSwapLM
    from mergekit_rlvr.toy.family import dots_recipe
    from vllm_plugins.hotswap import HotSwapLLM

    paths = {k: os.path.join(args.family, k) for k in ("base", "sft", "rl")}
    corners = {"merge_method": "task_arithmetic", "base_model": paths["base"], "dtype": "float32",
               "parameters": {"normalize": False},
               "models": [{"model": paths["sft"], "parameters": {"weight": 1.0}},
                          {"model": paths["rl"], "parameters": {"weight": 0.0}}]}
    dots = dots_recipe(paths, args.sft, args.rl)
    with tempfile.TemporaryDirectory() as tasks_dir:
        tasks = write_tasks(args.family, tasks_dir)
        manager = TaskManager(include_path=tasks_dir)
        engine = HotSwapLLM.from_recipe(corners, **ENGINE)
        lm = HotSwapLM(engine)
        rows = []
        settings = [("base", corners, [0.0, 0.0]), ("sft", corners, [1.0, 0.0]), ("rl", corners, [0.0, 1.0]),
                    (f"DoTS merge ({args.sft}, {args.rl})", dots, None)]
        for label, recipe, values in settings:
            if recipe is dots:
                engine.load_recipe(dots)  # same base, the recipe's own coefficients
            else:
                engine.set_coefficients(values)
            out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=args.limit)
            results = {t: {"exact_match": m["exact_match,boxed"]} for t, m in out["results"].items()}
            rows.append({"coefficients": {"model": label}, "results": results})
        engine.close()
    lines = ["| model | " + " | ".join(tasks) + " | union |", "| --- |" + " --- |" * (len(tasks) + 1)]
    for row in rows:
        scores = [row["results"][t]["exact_match"] for t in tasks]
        lines.append(f"| {row['coefficients']['model']} | " + " | ".join(f"{s:.3f}" for s in scores)
                     + f" | {sum(scores) / len(scores):.3f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
