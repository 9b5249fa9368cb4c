"""`mergekit-rlvr eval RECIPE --tasks T[,T] [--coefficients SETTING]...`: lm-evaluation-harness
scores of one or several coefficient settings of RECIPE on one hot-swapped engine."""

from __future__ import annotations

import click


@click.command("eval")
@click.argument("recipe", type=click.Path(dir_okay=False, exists=True))
@click.option("--tasks", required=True, help="lm-eval task names, comma-separated.")
@click.option("--coefficients", "settings", multiple=True,
              help="A setting to score: JSON ({name: value} or a list) or name=value,...; repeat for several"
                   " (default: the recipe's own). Names left out keep the recipe's value.")
@click.option("--include-path", type=click.Path(file_okay=False, exists=True), help="Directory of your task YAMLs.")
@click.option("--limit", type=float, help="Documents per task (a fraction below 1).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="Write the rows as JSON here.")
def eval_command(recipe, tasks, settings, include_path, limit, out_path):
    """Score RECIPE's merge with lm-evaluation-harness without writing it: the engine
    starts once (settings from the recipe's search.engine) and swaps to each setting."""
    import json

    from mergekit_rlvr.eval import parse_setting, run_eval, score_table
    from mergekit_rlvr.io.atomic import write_atomic

    rows = run_eval(recipe, [t.strip() for t in tasks.split(",") if t.strip()],
                    [parse_setting(s) for s in settings], include_path=include_path, limit=limit)
    click.echo(score_table(rows))
    if out_path:
        write_atomic(out_path, (json.dumps(rows, indent=2) + "\n").encode())
