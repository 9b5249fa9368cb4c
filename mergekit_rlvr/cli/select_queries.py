"""`mergekit-rlvr select-queries RECIPE --pool FILE --out FILE`: difficulty-aware
query selection (paper 000, Sec. 4.2, Alg. 1 stage 1) on one hot-swapped engine."""

from __future__ import annotations

import click


@click.command("select-queries")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--pool", required=True, type=click.Path(dir_okay=False), help="Unlabeled queries (JSONL or parquet).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Selected queries (JSONL).")
@click.option("-n", "n", default=64, show_default=True, help="Queries to select (half per difficulty half).")
@click.option("--samples", default=5, show_default=True, help="Answers per query and source model (m).")
@click.option("--threshold", default=0.8, show_default=True, help="Drop queries with difficulty above this.")
@click.option("--seed", default=0, show_default=True)
@click.option("--max-tokens", type=int, help="Override search.max_tokens for the sampling.")
def select_queries(recipe, pool, out_path, n, samples, threshold, seed, max_tokens):
    """Pick N queries of RECIPE's pool stratified by the source models' consistency."""
    from mergekit_rlvr.search.runner import run_select_queries

    overrides = {} if max_tokens is None else {"max_tokens": max_tokens}
    result = run_select_queries(recipe, pool, out_path, n=n, samples=samples, threshold=threshold, seed=seed,
                                overrides=overrides)
    click.echo(f"selected {result['selected']} of {result['pool']} queries ({result['kept']} kept at"
               f" D <= {threshold}) -> {out_path}")
