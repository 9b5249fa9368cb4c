"""`mergekit-rlvr demo`: the whole pipeline on the toy family (what `make demo` runs)."""

from pathlib import Path

import click


@click.command("demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"), show_default=True)
@click.option("--family", "family_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the toy family is trained and cached (default: OUT/family).")
@click.option("--trials", type=int, default=30, show_default=True, help="Search trials.")
@click.option("--queries", "n_queries", type=int, default=24, show_default=True, help="Selected queries.")
@click.option("--samples", type=int, default=6, show_default=True, help="Answers per query.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of query selection and of the search (the family has its own).")
def demo(out, family_dir, trials, n_queries, samples, seed):
    """Toy family -> analyze -> select-queries -> search -> mergekit-yaml -> serve -> evaluate.
    Writes OUT/summary.json and OUT/summary.png."""
    from mergekit_rlvr.demo.pipeline import print_table, run_demo

    summary = run_demo(out, family_dir or out / "family", trials, n_queries, samples, seed)
    print_table(summary)
    click.echo(f"\nwrote {out / 'summary.json'} and {out / 'summary.png'} in {summary['total_s']:.0f} s")
