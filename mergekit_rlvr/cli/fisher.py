"""`mergekit-rlvr fisher MODEL --data val.jsonl --out FILE` (paper 001, Eq. 13)."""

from __future__ import annotations

import click


@click.command("fisher")
@click.argument("model")
@click.option("--data", "data", required=True, metavar="JSONL",
              help="Validation rows {\"prompt\": ..., \"answer\": ...}, one JSON object a line.")
@click.option("--out", "out", required=True, metavar="FILE", help="Fisher file to write (safetensors).")
@click.option("--device", default=None, help="torch device; default cuda when available, else cpu.")
@click.option("--dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "bfloat16", "float16", "auto"]),
              help="Dtype the model runs in (the squared gradients are summed in float64 regardless).")
@click.option("--max-examples", type=int, default=None, help="Use only the first N rows.")
@click.option("--chat-template", is_flag=True,
              help="Wrap each prompt as a user message with the tokenizer's chat template.")
@click.option("--add-eos", is_flag=True, help="Append the EOS token to each answer (scored like the answer).")
@click.option("--accumulate-on", default="device", show_default=True, type=click.Choice(["device", "cpu"]),
              help="Where the float64 sums live (cpu saves accelerator memory: 2x a float32 model).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def fisher(model, data, out, device, dtype, max_examples, chat_template, add_eos, accumulate_on, quiet):
    """Diagonal empirical Fisher of MODEL (a Hugging Face causal LM directory or Hub id):
    the mean over the rows of DATA of the squared per-example gradient of
    log p(answer | prompt), answer tokens only. Writes the model's checkpoint tensor
    names and shapes, ready for `merge_method: sar` (`parameters: {fisher: FILE}`)."""
    import logging
    import time

    from mergekit_rlvr.fisher import compute_fisher

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    start = time.perf_counter()
    summary = compute_fisher(
        model,
        data,
        out,
        device=device,
        dtype=dtype,
        max_examples=max_examples,
        chat_template=chat_template,
        add_eos=add_eos,
        accumulate_on=accumulate_on,
        progress=not quiet,
    )
    click.echo(
        f"wrote {summary['out']}: {summary['tensors']} tensors from {summary['examples']} examples"
        f" on {summary['device']} ({summary['dtype']}) in {time.perf_counter() - start:.1f} s;"
        f" mean log p(answer|prompt) {summary['mean_log_prob']:.3f},"
        f" Fisher max {summary['max']:.3e}, smallest nonzero {summary['min_positive']:.3e}"
    )
