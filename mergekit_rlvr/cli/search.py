"""`mergekit-rlvr search RECIPE --queries FILE --out DIR`: coefficient search on one
hot-swapped vLLM engine (DoTS consistency/perplexity, or reasoning rate)."""

from __future__ import annotations

import click

from mergekit_rlvr.errors import UserError
from mergekit_rlvr.search.objective import OBJECTIVES


def parse_sets(pairs) -> dict:
    """--set key=value pairs; values are YAML (numbers, lists, true/false, mappings)."""
    import yaml

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set {pair}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--set {pair}: the value is not valid YAML") from None
    return out


@click.command("search")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--queries", type=click.Path(dir_okay=False),
              help="JSONL with 'prompt' (optional 'answer', reported only) or parquet with a 'prompt' column"
                   " (required except with --report-only).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for trials.csv, summary.json, best.yml, plots and the study.")
@click.option("--trials", type=int, help="Finished trials the study should hold (dots).")
@click.option("--storage", help="Optuna storage (default: sqlite in --out): sqlite:///f.db, postgresql://user@host/db,"
                                " journal:///shared/fs/study.log; share it between workers to scale out.")
@click.option("--objective", type=click.Choice(list(OBJECTIVES)))
@click.option("--sampler", type=click.Choice(["tpe", "nsga2", "random"]))
@click.option("--samples", type=int, help="Answers per query.")
@click.option("--temperature", type=float)
@click.option("--max-tokens", type=int)
@click.option("--perplexity", type=click.Choice(["prompt", "response"]))
@click.option("--select", type=click.Choice(["max_consistency", "knee"]))
@click.option("--strategy", type=click.Choice(["binary", "grid"]))
@click.option("--detect", type=click.Choice(["prefix", "logit", "full"]))
@click.option("--rho-min", type=float)
@click.option("--seed", type=int)
@click.option("--study-name", help="Name of the study in the storage (default: search-<objective>).")
@click.option("--prune/--no-prune", default=None, help="Stop trials that can no longer reach the Pareto front.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Any search: setting (YAML value).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--report-only", is_flag=True,
              help="Run no trial and start no engine: rebuild --out's report from the study in the storage.")
def search(recipe, queries, out_dir, trials, storage, objective, sampler, samples, temperature, max_tokens,
           perplexity, select, strategy, detect, rho_min, seed, study_name, prune, sets, quiet, report_only):
    """Search merge coefficients of RECIPE on a hot-swapped vLLM engine."""
    from mergekit_rlvr.search.runner import run_search

    overrides = parse_sets(sets)
    overrides.update({k: v for k, v in dict(
        trials=trials, storage=storage, objective=objective, sampler=sampler, samples=samples,
        temperature=temperature, max_tokens=max_tokens, perplexity=perplexity, select=select,
        strategy=strategy, detect=detect, rho_min=rho_min, seed=seed, study_name=study_name, prune=prune,
    ).items() if v is not None})
    summary = run_search(recipe, queries, out_dir, overrides, progress=not quiet, report_only=report_only)
    selected = summary["selected"]
    if selected is None:
        click.echo(f"no finished trial yet; report in {out_dir}")
        return
    values = ", ".join(f"{k}={v:.6g}" for k, v in selected["coefficients"].items())
    objectives = ", ".join(f"{k}={v:.4g}" for k, v in selected["objectives"].items() if v is not None)
    click.echo(f"selected: {values} ({objectives}); {summary['finished_trials']} trials in study")
    click.echo(f"wrote {out_dir}/best.yml, trials.csv, summary.json")
