"""Diagonal empirical Fisher of paper 001, Sec. 5.2, Eq. 13 (for `merge_method: sar`).

    S_j = E_{(x, y) ~ D_val} [ (d log p(y | x; theta) / d theta_j) ** 2 ]

Each example's gradient is taken alone (batch size 1), of the log-probability of
the answer tokens given the prompt, summed over the answer tokens only (the prompt
tokens are context, never targets). Squared gradients are accumulated in float64
(a squared float32 gradient of 1e-25 is 1e-50, far below float32's range) and the
mean is written with ``mergekit_rlvr.io.fisher.save_fisher`` under the model's
*checkpoint* tensor names and shapes, the names `mergekit-yaml` sees.

Layers: ``mergekit_rlvr.io.examples`` (the JSONL file: ``read_rows``/``count_rows``),
``gradients`` (``encode``: tokens; ``diagonal_fisher``: the math, on any module
returning logits), ``model`` (loading it; ``checkpoint_map``: parameter -> checkpoint
names, from ``mergekit_rlvr.io.checkpoint``'s headers) and :func:`compute_fisher`
here (all of it, file to file).
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional

import torch

from mergekit_rlvr.errors import UserError
from mergekit_rlvr.fisher.gradients import FisherResult, answer_log_prob, diagonal_fisher, encode
from mergekit_rlvr.fisher.model import checkpoint_map, load_model, pick_device, resolve_model_dir
from mergekit_rlvr.io.checkpoint import checkpoint_tensors
from mergekit_rlvr.io.examples import Row, count_rows, read_rows

__all__ = ["FisherResult", "Row", "answer_log_prob", "checkpoint_map", "compute_fisher", "count_rows",
           "diagonal_fisher", "encode", "read_rows"]

LOG = logging.getLogger(__name__)


def _check_arguments(data: str, out: str, max_examples: Optional[int], accumulate_on: str) -> int:
    """Everything checkable before the model loads (the whole data file among it);
    returns the number of examples."""
    if os.path.isdir(out):
        raise UserError(f"--out {out} is a directory; give a file name such as {os.path.join(out, 'fisher.safetensors')}")
    total = count_rows(data, max_examples)  # the whole file is checked before the model loads
    if accumulate_on not in ("device", "cpu"):
        raise UserError(f"--accumulate-on must be 'device' or 'cpu', got {accumulate_on!r}")
    return total


def _mapped(model: str, net, tensors):
    """(checkpoint name -> parameter name or None, tensors that are no parameter,
    parameters in no checkpoint tensor); the last two are logged."""
    mapping, uncovered = checkpoint_map(net, tensors)
    if not any(mapping.values()):
        raise UserError(f"model {model}: no checkpoint tensor name matches a parameter of the loaded model")
    buffers = [k for k, v in mapping.items() if v is None]
    if buffers:
        LOG.warning("fisher: %d checkpoint tensors are no parameter (Fisher 0): %s", len(buffers), ", ".join(buffers[:5]))
    if uncovered:
        LOG.warning("fisher: %d parameters are in no checkpoint tensor (not written): %s",
                    len(uncovered), ", ".join(uncovered[:5]))
    return mapping, buffers, uncovered


def _fisher_of_rows(net, tokenizer, data, total, target, *, max_examples, chat_template, add_eos, accumulate_on,
                    progress) -> FisherResult:
    """diagonal_fisher over the data file's rows, an error naming the row's line."""
    rows = read_rows(data, max_examples)
    lines: List[int] = []

    def examples():
        for row in rows:
            lines.append(row.line)
            yield encode(tokenizer, row, chat_template=chat_template, add_eos=add_eos, source=f"data file {data}")

    return diagonal_fisher(
        net,
        examples(),
        total=total,
        device=target,
        accumulate_device=torch.device("cpu") if accumulate_on == "cpu" else None,
        progress=progress,
        describe=lambda i: f"data file {data} line {lines[i] if i < len(lines) else '?'}",
    )


def _checkpoint_values(tensors, mapping, result: FisherResult) -> Dict[str, torch.Tensor]:
    """The Fisher of every floating checkpoint tensor, by checkpoint name (0 for buffers)."""
    values = {}
    for key in tensors:
        if key not in mapping:
            continue  # integer tensors: no Fisher
        name = mapping[key]
        values[key] = (result.values[name] if name else torch.zeros(tensors[key][0], dtype=torch.float64)).cpu()
    return values


def _write(values: Dict[str, torch.Tensor], out: str, metadata: Dict[str, object]) -> None:
    from mergekit_rlvr.io.fisher import save_fisher

    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        save_fisher(values, out, consume=True, metadata=metadata)
    except OSError as error:
        raise UserError(f"cannot write --out {out}: {error.strerror or error}") from None


def compute_fisher(
    model: str,
    data: str,
    out: str,
    *,
    device: Optional[str] = None,
    dtype: str = "float32",
    max_examples: Optional[int] = None,
    chat_template: bool = False,
    add_eos: bool = False,
    accumulate_on: str = "device",
    progress: bool = True,
) -> Dict[str, object]:
    """MODEL + JSONL -> Fisher file at ``out`` (atomic). Returns a summary."""
    total = _check_arguments(data, out, max_examples, accumulate_on)
    target = pick_device(device)
    model_dir = resolve_model_dir(model)
    tensors = checkpoint_tensors(model_dir)
    net, tokenizer = load_model(model_dir, dtype, target)
    mapping, buffers, uncovered = _mapped(model, net, tensors)
    result = _fisher_of_rows(net, tokenizer, data, total, target, max_examples=max_examples,
                             chat_template=chat_template, add_eos=add_eos, accumulate_on=accumulate_on,
                             progress=progress)
    del net
    values = _checkpoint_values(tensors, mapping, result)
    examples, mean_log_prob = result.examples, result.mean_log_prob
    del result  # from here on `values` holds the only references: save_fisher frees them one by one
    peak = max((float(v.max()) for v in values.values() if v.numel()), default=0.0)
    positive = [float(v[v > 0].min()) for v in values.values() if bool((v > 0).any())]
    count = len(values)
    _write(values, out, {"model": model, "data": os.path.abspath(data), "examples": examples, "dtype": dtype,
                         "chat_template": chat_template, "add_eos": add_eos, "equation": "paper 001 Eq. 13"})
    return {
        "out": out,
        "examples": examples,
        "tensors": count,
        "mean_log_prob": mean_log_prob,
        "max": peak,
        "min_positive": min(positive) if positive else 0.0,
        "zero_tensors": buffers,
        "unwritten_parameters": uncovered,
        "device": str(target),
        "dtype": dtype,
    }
