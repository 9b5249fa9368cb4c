"""`mergekit-rlvr toy-family OUT`: train (or reuse) the toy base/sft/rl family."""

from __future__ import annotations

import click


def _parse_settings(pairs):
    from mergekit_rlvr.errors import UserError
    from mergekit_rlvr.toy.family import FamilySettings

    defaults = FamilySettings()
    values = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not hasattr(defaults, key):
            raise UserError(f"--set {pair!r}: expected NAME=VALUE with NAME one of "
                            f"{', '.join(FamilySettings.__dataclass_fields__)}")
        kind = type(getattr(defaults, key))
        try:
            values[key] = kind(text)
        except ValueError:
            raise UserError(f"--set {pair!r}: {key} must be {kind.__name__}")
    return values


@click.command("toy-family")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=None, help="Seed of every stage (default 0).")
@click.option("--set", "pairs", multiple=True, metavar="NAME=VALUE",
              help="Override a training setting (see mergekit_rlvr.toy.family.FamilySettings).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def toy_family(out, seed, pairs, quiet):
    """Train the toy family in OUT: base (pretrained on both task formats), sft
    (supervised on task K, a secret lexicon) and rl (GRPO on task R, carrying in
    addition), plus held-out eval sets and an unlabeled query pool. A second call
    with the same settings reuses what exists."""
    from mergekit_rlvr.toy.family import FamilySettings, build_family

    values = _parse_settings(pairs)
    if seed is not None:
        values["seed"] = seed
    settings = FamilySettings.from_dict(values)
    fam = build_family(out, settings, show_progress=not quiet, log=lambda m: click.echo(m, err=True))
    for name, path in fam.paths.items():
        click.echo(f"{name}: {path}")
    click.echo(f"eval sets: {out}/data/eval_K.jsonl, {out}/data/eval_R.jsonl; pool: {out}/data/pool.jsonl")
    seconds = fam.info["seconds"]
    click.echo("training seconds: " + ", ".join(f"{k} {v}" for k, v in seconds.items()))
    upd = fam.info["updates"]
    click.echo(f"update L2: sft {upd['sft']['l2']:.3f}, rl {upd['rl']['l2']:.4f} "
               f"(ratio {upd['norm_ratio_sft_over_rl']:.1f}); share changed >1e-5: "
               f"sft {upd['sft']['changed_share']:.3f}, rl {upd['rl']['changed_share']:.3f}; "
               f"share holding 90% of the squared norm: sft {upd['sft']['energy90_share']:.3f}, "
               f"rl {upd['rl']['energy90_share']:.3f}")
