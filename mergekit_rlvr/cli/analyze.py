"""`mergekit-rlvr analyze`: the papers' task-vector measurements in one streaming command."""

from __future__ import annotations

import click


@click.command("analyze")
@click.option("--base", "base", required=True, help="Base model: local directory or Hugging Face id.")
@click.argument("models", nargs=-1, required=True)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Directory for report.json, report.md and plots.")
@click.option("--epsilon", default=1e-5, show_default=True, type=float, help="An entry is updated when |Delta| > epsilon.")
@click.option("--eta", default=1e-3, show_default=True, type=float,
              help="Changed-weight mask |Delta| > eta * max(|theta_model|, |theta_base|) for the Jaccard overlap.")
@click.option("--top", default=0.1, show_default=True, type=float, help="Kept share for module_top_share (global top-k).")
@click.option("--compile/--no-compile", "compile_", default=None,
              help="Run the torch kernels fused by torch.compile (on CPU instead of the native C kernels, the "
                   "default there; on CUDA the default from 50M parameters). --no-compile: never torch.compile.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda", "auto"]),
              help="Where the kernels run: cpu, cuda (a GPU; an error if none) or auto (cuda when present).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")
def analyze(base, models, out, epsilon, eta, top, compile_, device, progress):
    """Task vectors of MODEL... against --base: norms, sparsity, sign conflicts, regions,
    Jaccard overlaps and module shares, streamed with bounded memory (a row sample, then two
    passes, three if the sample missed a threshold)."""
    from mergekit_rlvr.analysis.report import findings, write_report
    from mergekit_rlvr.analysis.stream import analyze as run

    report = run(base, list(models), epsilon=epsilon, eta=eta, top=top, progress=progress, compile=compile_,
                 device=device)
    written = write_report(report, out)
    for sentence in findings(report):
        click.echo(sentence)
    click.echo(f"wrote {written['report.json']}, {written['report.md']} and {len(written) - 2} plots")
