"""`mergekit-rlvr select-queries RECIPE --pool FILE --out FILE`: difficulty-aware
query selection (paper 000, Sec. 4.2, Alg. 1 stage 1) on one hot-swapped engine."""

from __future__ import annotations

import click

from mergekit_rlvr.search.queries import STRATEGIES
from mergekit_rlvr.search.select import SOURCES


@click.command("select-queries")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--pool", required=True, type=click.Path(dir_okay=False), help="Unlabeled queries (JSONL or parquet).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Selected queries (JSONL).")
@click.option("-n", "n", default=64, show_default=True, help="Queries to select.")
@click.option("--samples", default=5, show_default=True, help="Answers per query and source model (m).")
@click.option("--threshold", type=float, default=None,
              help="Drop queries with difficulty above this (default 1 - 1/m, Sec. 4.2: 0.8 at m = 5).")
@click.option("--sources", type=click.Choice(SOURCES), default="models", show_default=True,
              help="Score the source checkpoints themselves (Sec. 4.2) or the recipe's sparsified sources.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default="stratified", show_default=True,
              help="stratified (Alg. 1), easy, medium, random or diverse (equal per data source): Tables 7-8.")
@click.option("--easy-fraction", type=float, default=0.5, show_default=True,
              help="stratified: share of the low-difficulty half (Table 7's easy:medium ratio).")
@click.option("--source-key", default="data_source", show_default=True,
              help="diverse: the row field naming each query's data source.")
@click.option("--seed", default=0, show_default=True)
@click.option("--max-tokens", type=int, help="Override search.max_tokens for the sampling.")
def select_queries(recipe, pool, out_path, n, samples, threshold, sources, strategy, easy_fraction, source_key,
                   seed, max_tokens):
    """Pick N queries of RECIPE's pool stratified by the source models' consistency."""
    from mergekit_rlvr.search.runner import run_select_queries

    overrides = {} if max_tokens is None else {"max_tokens": max_tokens}
    result = run_select_queries(recipe, pool, out_path, n=n, samples=samples, threshold=threshold, seed=seed,
                                overrides=overrides, sources=sources, strategy=strategy,
                                easy_fraction=easy_fraction, source_key=source_key)
    click.echo(f"selected {result['selected']} of {result['pool']} queries ({result['kept']} kept at"
               f" D <= {result['threshold']:.4g}; {strategy}) -> {out_path}")
