"""Per-trial storage overhead of the search: sqlite (the default) vs PostgreSQL vs the
journal file, side by side in one run.

Runs the real trial loop (`mergekit_rlvr.search.runner.run_search`: Optuna ask/tell,
the heartbeat, the trial's user attributes, the progress callbacks, the final report)
with the scripted engine of tests/support/fake_engine.py, which answers at once, so
the loop's time per trial is Optuna + storage. PostgreSQL is a real server started
here (tests/support/pg_server.py: Unix socket, fsync off as in the tests; a production server
with fsync on adds its commit latency). Each backend runs ``--rounds`` times in turn;
the best round is reported.

    .venv/bin/python bench/storage_overhead.py [--trials 40] [--rounds 2] [--sampler random]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"


def one_run(url, root: Path, args, tag: str) -> float:
    from mergekit_rlvr.search.runner import run_search
    from support.fake_engine import fake_opener, write_fake_recipe, write_queries

    recipe = write_fake_recipe(root / f"{tag}.yml", extra={"sampler": args.sampler})
    queries = write_queries(root / "q.jsonl", args.queries)
    overrides = {"trials": args.trials, "study_name": tag}
    if url:
        overrides["storage"] = url
    summary = run_search(recipe, queries, str(root / tag), overrides, open_engine=fake_opener(), progress=False)
    t = summary["timings"]
    return (t["search_s"] - t["generate_s"] - t["score_s"]) / args.trials


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--sampler", default="random", choices=["random", "tpe", "nsga2"])
    args = parser.parse_args()
    sys.path.insert(0, str(TESTS))
    from support import pg_server

    why = pg_server.missing()
    if why:
        sys.exit(f"storage_overhead: {why}")
    root = Path(tempfile.mkdtemp(prefix="storage-overhead-"))
    server = pg_server.PostgresServer().start()
    try:
        best = {"sqlite": [], "postgresql": [], "journal": []}
        for r in range(args.rounds):
            urls = {"sqlite": None, "postgresql": server.create_database(f"bench{r}"),
                    "journal": f"journal://{root}/study{r}.log"}
            for name, url in urls.items():
                best[name].append(one_run(url, root, args, f"{name}{r}"))
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    base = min(best["sqlite"])
    print(f"\nper-trial loop time outside the (instant, scripted) engine, {args.trials} trials,"
          f" sampler {args.sampler}, best of {args.rounds}:")
    for name, values in best.items():
        v = min(values)
        print(f"  {name:11s} {1000 * v:8.1f} ms/trial   {v / base:5.2f}x sqlite   ({1000 * (v - base):+.1f} ms)")
    print("  (a DoTS trial at 7B generates for minutes; any of these is a negligible share of it)")


if __name__ == "__main__":
    main()
