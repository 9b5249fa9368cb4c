"""Diagonal empirical Fisher of paper 001, Sec. 5.2, Eq. 13 (for `merge_method: sar`).

    S_j = E_{(x, y) ~ D_val} [ (d log p(y | x; theta) / d theta_j) ** 2 ]

Each example's gradient is taken alone (batch size 1), of the log-probability of
the answer tokens given the prompt, summed over the answer tokens only (the prompt
tokens are context, never targets). Squared gradients are accumulated in float64
(a squared float32 gradient of 1e-25 is 1e-50, far below float32's range) and the
mean is written with ``mergekit_rlvr.io.fisher.save_fisher`` under the model's
*checkpoint* tensor names and shapes, the names `mergekit-yaml` sees.

Layers: ``read_rows``/``count_rows`` (the JSONL file), ``encode`` (tokens),
``diagonal_fisher`` (the math, on any module returning logits), ``checkpoint_map``
(parameter -> checkpoint names) and ``compute_fisher`` (all of it, file to file).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from mergekit_rlvr.errors import UserError

LOG = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


# ---------------------------------------------------------------- the data file


@dataclass(frozen=True)
class Row:
    line: int
    prompt: str
    answer: str


def read_rows(path: str, limit: Optional[int] = None) -> Iterator[Row]:
    """Rows of a JSONL file with string fields ``prompt`` and ``answer``, streamed.
    Blank lines are skipped; anything else that is not such a row is a UserError
    naming the file and line."""
    try:
        handle = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"data file {path} does not exist") from None
    except (OSError, UnicodeError) as error:
        raise UserError(f"data file {path} is not readable: {error}") from None
    count = 0
    with handle:
        line_no = 0
        while limit is None or count < limit:
            try:
                text = handle.readline()
            except UnicodeError as error:
                raise UserError(f"data file {path} line {line_no + 1}: not UTF-8 text ({error})") from None
            if not text:
                break
            line_no += 1
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                raise UserError(f"data file {path} line {line_no}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"data file {path} line {line_no}: a row must be a JSON object with prompt and answer")
            for key in ("prompt", "answer"):
                if key not in row:
                    raise UserError(f"data file {path} line {line_no}: row has no '{key}'")
                if not isinstance(row[key], str):
                    raise UserError(f"data file {path} line {line_no}: '{key}' must be a string")
            if not row["answer"]:
                raise UserError(f"data file {path} line {line_no}: 'answer' is empty (nothing to score)")
            count += 1
            yield Row(line_no, row["prompt"], row["answer"])


def count_rows(path: str, limit: Optional[int] = None) -> int:
    """Validate the whole file (before any model is loaded) and count its rows."""
    if limit is not None and limit < 1:
        raise UserError(f"--max-examples must be >= 1, got {limit}")
    count = sum(1 for _ in read_rows(path, limit))
    if count == 0:
        raise UserError(f"data file {path} holds no examples (rows with prompt and answer)")
    return count


# ---------------------------------------------------------------- tokens


def encode(tokenizer, row: Row, *, chat_template: bool = False, add_eos: bool = False,
           source: str = "data") -> Tuple[torch.Tensor, int]:
    """(token ids, number of prompt tokens). Prompt and answer are tokenized
    separately and concatenated, so the split between context and targets is exact
    (joint tokenization can merge tokens across the boundary)."""
    if chat_template:
        prompt_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": row.prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "keys"):
            prompt_ids = prompt_ids["input_ids"]
    else:
        prompt_ids = tokenizer(row.prompt, add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(row.answer, add_special_tokens=False)["input_ids"]
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise UserError("--add-eos: the tokenizer has no eos token")
        answer_ids = list(answer_ids) + [tokenizer.eos_token_id]
    prompt_ids, answer_ids = list(prompt_ids), list(answer_ids)
    if not answer_ids:
        raise UserError(f"{source} line {row.line}: the answer has no tokens")
    if not prompt_ids:
        raise UserError(
            f"{source} line {row.line}: the prompt has no tokens (and the tokenizer adds no BOS),"
            " so the first answer token has no context"
        )
    return torch.tensor(prompt_ids + answer_ids, dtype=torch.long), len(prompt_ids)


# ---------------------------------------------------------------- the math


def answer_log_prob(model: torch.nn.Module, ids: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """log p(answer | prompt) = sum over answer positions t of log p(ids[t] | ids[:t]).
    ``model(input_ids=...)`` returns logits (a tensor or an object with ``.logits``)."""
    out = model(input_ids=ids.unsqueeze(0))
    logits = out.logits if hasattr(out, "logits") else out
    logits = logits[0, n_prompt - 1 : ids.numel() - 1].float()  # the positions predicting answer tokens
    targets = ids[n_prompt:].to(logits.device)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).sum()


@dataclass
class FisherResult:
    """Mean squared per-example gradient (float64) per parameter (named as in
    ``model.named_parameters()``, tied parameters once)."""

    values: Dict[str, torch.Tensor]
    examples: int
    mean_log_prob: float = float("nan")
    extra: Dict[str, object] = field(default_factory=dict)


def diagonal_fisher(
    model: torch.nn.Module,
    examples: Iterable[Tuple[torch.Tensor, int]],
    *,
    total: Optional[int] = None,
    device: Optional[torch.device] = None,
    accumulate_device: Optional[torch.device] = None,
    progress: bool = True,
    describe: Callable[[int], str] = lambda i: f"example {i + 1}",
) -> FisherResult:
    """Eq. 13 over ``examples`` = (ids, n_prompt) pairs, one backward pass each.

    Squared gradients are added to float64 sums by post-accumulate-grad hooks and
    the gradient is freed at once, so peak memory is the model, the sums and one
    example's activations. ``accumulate_device`` (default: each parameter's own)
    may be "cpu" to keep the float64 sums off an accelerator."""
    from tqdm import tqdm

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters to take gradients of")
    device = device or params[0][1].device
    sums = {
        n: torch.zeros(p.shape, dtype=torch.float64, device=accumulate_device or p.device) for n, p in params
    }

    def hook(name):
        acc = sums[name]

        def add_square(p):
            acc.add_(p.grad.to(device=acc.device, dtype=torch.float64).square_())
            p.grad = None

        return add_square

    handles = [p.register_post_accumulate_grad_hook(hook(n)) for n, p in params]
    was_training = model.training
    model.eval()  # no dropout: the gradient of the model as it is
    count, log_prob_sum = 0, 0.0
    try:
        with torch.enable_grad():
            for ids, n_prompt in tqdm(examples, total=total, desc="fisher", unit="ex", disable=not progress):
                model.zero_grad(set_to_none=True)
                log_prob = answer_log_prob(model, ids.to(device), n_prompt)
                value = float(log_prob.detach())
                if not math.isfinite(value):
                    raise UserError(f"{describe(count)}: log p(answer | prompt) is {value} (try --dtype float32)")
                log_prob.backward()
                log_prob_sum += value
                count += 1
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if count == 0:
        raise UserError("no examples to compute the Fisher information on")
    for name, acc in sums.items():
        acc.div_(count)
        if not bool(torch.isfinite(acc).all()):
            raise UserError(f"the Fisher values of {name} are not finite (gradients overflowed; try --dtype float32)")
    return FisherResult(sums, count, log_prob_sum / count)


# ---------------------------------------------------------------- checkpoint names


def checkpoint_tensors(model_dir: str) -> Dict[str, Tuple[Tuple[int, ...], bool]]:
    """name -> (shape, is floating point) of every tensor in the checkpoint files
    (``*.safetensors``, else ``*.bin``), read from headers only."""
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    out: Dict[str, Tuple[Tuple[int, ...], bool]] = {}
    if files:
        from safetensors import safe_open

        for file in files:
            path = os.path.join(model_dir, file)
            try:
                with safe_open(path, framework="pt") as handle:
                    for name in handle.keys():
                        piece = handle.get_slice(name)
                        dtype = piece.get_dtype()
                        out[name] = (tuple(piece.get_shape()), dtype.startswith(("F", "BF", "E")))
            except Exception as error:  # safetensors raises several kinds
                raise UserError(f"model checkpoint {path} is not a readable safetensors file: {error}") from None
        return out
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".bin") and "training_args" not in f)
    for file in files:
        path = os.path.join(model_dir, file)
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as error:
            raise UserError(f"model checkpoint {path} is not readable: {error}") from None
        for name, value in state.items():
            out[name] = (tuple(value.shape), value.is_floating_point())
    if not out:
        raise UserError(f"model {model_dir} has no *.safetensors or *.bin checkpoint files")
    return out


def _transformers_renamer(model) -> Callable[[str], Optional[str]]:
    """transformers' own checkpoint-key -> parameter-name renaming (v5), or None when
    unavailable. Fused weights (WeightConverter) are not supported: None."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        keys = dict.fromkeys(n for n, _ in model.named_parameters(remove_duplicate=False))
        keys = {k: True for k in keys}
        prefix = getattr(model, "base_model_prefix", None) or None
    except Exception:  # older or newer transformers: fall back to plain names
        return lambda key: None

    def rename(key: str) -> Optional[str]:
        try:
            renamed, converter = rename_source_key(key, renamings, converters, prefix, keys)
        except Exception:
            return None
        return None if converter is not None else renamed

    return rename


def checkpoint_map(model, tensors: Dict[str, Tuple[Tuple[int, ...], bool]]) -> Tuple[Dict[str, Optional[str]], List[str]]:
    """(checkpoint name -> canonical parameter name or None, parameters found under no
    checkpoint name). The canonical name is the one ``named_parameters()`` yields
    (tied parameters once); every checkpoint name of a tied weight maps to it.
    Floating checkpoint tensors that are no parameter (buffers) map to None."""
    every = dict(model.named_parameters(remove_duplicate=False))
    canonical = {id(p): n for n, p in model.named_parameters()}
    rename = _transformers_renamer(model)
    prefix = getattr(model, "base_model_prefix", "") or ""
    mapping: Dict[str, Optional[str]] = {}
    for key, (shape, floating) in tensors.items():
        if not floating:
            continue
        candidates = [key, rename(key)]
        if prefix:
            candidates += [key[len(prefix) + 1 :] if key.startswith(prefix + ".") else f"{prefix}.{key}"]
        found = next((c for c in candidates if c and c in every), None)
        if found is None:
            mapping[key] = None
            continue
        param = every[found]
        if tuple(param.shape) != tuple(shape):
            raise UserError(
                f"checkpoint tensor {key} has shape {tuple(shape)} but the loaded parameter {found}"
                f" has {tuple(param.shape)}"
            )
        mapping[key] = canonical[id(param)]
    covered = set(n for n in mapping.values() if n)
    uncovered = [n for n in canonical.values() if n not in covered]
    return mapping, uncovered


# ---------------------------------------------------------------- file to file


def resolve_model_dir(model: str) -> str:
    """A local directory as is; otherwise a Hugging Face Hub id, downloaded."""
    if os.path.isdir(model):
        return model
    if os.path.exists(model):
        raise UserError(f"model {model} is not a directory")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        raise UserError(f"model {model} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as error:
        raise UserError(f"model {model} is neither a directory nor a reachable Hub repository: "
                        f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None


def pick_device(device: Optional[str]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here")
    return device


def load_model(model_dir: str, dtype: str, device: torch.device):
    """(model, tokenizer) with transformers, as UserError when unreadable."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")

    def first_line(error):
        text = str(error).strip()
        return text.splitlines()[0] if text else type(error).__name__

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as error:
        raise UserError(f"model {model_dir}: cannot load its tokenizer: {first_line(error)}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype])
    except Exception as error:
        raise UserError(f"model {model_dir}: cannot load it as a causal LM: {first_line(error)}") from None
    model.to(device)
    for p in model.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    return model, tokenizer


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
    from mergekit_rlvr.io.fisher import save_fisher

    if os.path.isdir(out):
        raise UserError(f"--out {out} is a directory; give a file name such as {os.path.join(out, 'fisher.safetensors')}")
    total = count_rows(data, max_examples)  # the whole file is checked before the model loads
    if accumulate_on not in ("device", "cpu"):
        raise UserError(f"--accumulate-on must be 'device' or 'cpu', got {accumulate_on!r}")
    target = pick_device(device)
    model_dir = resolve_model_dir(model)
    tensors = checkpoint_tensors(model_dir)
    net, tokenizer = load_model(model_dir, dtype, target)
    mapping, uncovered = checkpoint_map(net, tensors)
    if not any(mapping.values()):
        raise UserError(f"model {model}: no checkpoint tensor name matches a parameter of the loaded model")
    buffers = [k for k, v in mapping.items() if v is None]
    if buffers:
        LOG.warning("fisher: %d checkpoint tensors are no parameter (Fisher 0): %s", len(buffers), ", ".join(buffers[:5]))
    if uncovered:
        LOG.warning("fisher: %d parameters are in no checkpoint tensor (not written): %s",
                    len(uncovered), ", ".join(uncovered[:5]))

    rows = read_rows(data, max_examples)
    lines: List[int] = []

    def examples():
        for row in rows:
            lines.append(row.line)
            yield encode(tokenizer, row, chat_template=chat_template, add_eos=add_eos, source=f"data file {data}")

    result = diagonal_fisher(
        net,
        examples(),
        total=total,
        device=target,
        accumulate_device=torch.device("cpu") if accumulate_on == "cpu" else None,
        progress=progress,
        describe=lambda i: f"data file {data} line {lines[i] if i < len(lines) else '?'}",
    )
    del net
    values = {}
    for key in tensors:
        if key not in mapping:
            continue  # integer tensors: no Fisher
        name = mapping[key]
        values[key] = (result.values[name] if name else torch.zeros(tensors[key][0], dtype=torch.float64)).cpu()
    examples, mean_log_prob = result.examples, result.mean_log_prob
    del result  # from here on `values` holds the only references: save_fisher frees them one by one
    peak = max((float(v.max()) for v in values.values() if v.numel()), default=0.0)
    positive = [float(v[v > 0].min()) for v in values.values() if bool((v > 0).any())]
    count = len(values)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        save_fisher(values, out, consume=True, metadata={
            "model": model, "data": os.path.abspath(data), "examples": examples, "dtype": dtype,
            "chat_template": chat_template, "add_eos": add_eos, "equation": "paper 001 Eq. 13",
        })
    except OSError as error:
        raise UserError(f"cannot write --out {out}: {error.strerror or error}") from None
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
