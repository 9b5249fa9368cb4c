"""Which vLLM parameters the swap rewrites in place and which checkpoint tensors go
through vLLM's ``reload_weights``: a pure function of facts about the model (no
vLLM, no tensors), so it is tested without an engine (tests/decompose/test_decompose.py).

Rules (see :mod:`vllm_plugins.worker`):

- a parameter can be rewritten in place when it is a plain floating tensor of its
  loading shape, contiguous, holding exactly what the loaders put there (the base
  check), and all checkpoint tensors that fill it share their coefficients;
- a module goes in place when all its parameters can and vLLM keeps no derived copy
  of them (the CPU backend repacks linear layers; quantized methods repack);
- a checkpoint tensor that fills parameters of several modules sends all of them to
  reload as soon as one of them must (a reload re-runs every loader it feeds);
- a checkpoint tensor goes in place when every parameter it fills does, else through
  reload (with the positions this rank reads, when it reads only part of it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Sequence, Tuple


@dataclass(frozen=True)
class ParamFacts:
    name: str  # vLLM parameter name
    checkpoints: Tuple[str, ...]  # checkpoint tensors its loaders copy from
    plain: bool  # plain, contiguous, loading shape, equal to the base as loaded (False unchecked: see worker)
    slots: Tuple[Tuple[int, ...], ...]  # per checkpoint: its coefficients' indices
    derived_free: bool  # its module computes with it as loaded

    @property
    def module(self) -> str:
        return self.name.rpartition(".")[0]


@dataclass
class Plan:
    inplace: Dict[str, List[str]] = field(default_factory=dict)  # parameter -> its checkpoint tensors
    reload: List[str] = field(default_factory=list)  # checkpoint tensors, in task order
    paths: Dict[str, str] = field(default_factory=dict)  # parameter -> "inplace" | "reload"

    def route(self, checkpoint: str) -> str:
        return "reload" if checkpoint in self.reload else "inplace"


def plan_paths(params: Mapping[str, ParamFacts], checkpoints: Sequence[str], force_reload: bool = False) -> Plan:
    """The plan for ``checkpoints`` (every planned tensor, in task order)."""
    by_checkpoint: Dict[str, List[str]] = {}
    for facts in params.values():
        for c in facts.checkpoints:
            by_checkpoint.setdefault(c, []).append(facts.name)
    modules: Dict[str, bool] = {}
    for facts in params.values():
        ok = not force_reload and facts.plain and facts.derived_free and len(set(facts.slots)) == 1
        modules[facts.module] = modules.get(facts.module, True) and ok
    changed = True
    while changed:  # a tensor feeding a reload module sends every module it feeds to reload
        changed = False
        for targets in by_checkpoint.values():
            mods = {params[p].module for p in targets}
            if len(mods) > 1 and not all(modules[m] for m in mods):
                for m in mods:
                    changed |= modules[m]
                    modules[m] = False
    plan = Plan()
    for c in checkpoints:
        targets = by_checkpoint.get(c, [])
        if targets and all(modules[params[p].module] for p in targets):
            for p in targets:
                plan.inplace.setdefault(p, list(params[p].checkpoints))
                plan.paths[p] = "inplace"
        else:
            plan.reload.append(c)
            for p in targets:
                plan.paths[p] = "reload"
    return plan


def swap_bytes(d, tensor_parallel_size: int = 1, progress: bool = False) -> Dict[str, int]:
    """What the swap will hold on each rank for decomposition ``d``, before any engine
    starts: the packed bytes of every tensor (:mod:`vllm_plugins.packed`, exact for one
    rank), a tensor of two or more dimensions split over the ranks (vLLM shards
    linear and embedding weights, and each rank keeps a bitmask of the entries it
    reads), a 1-D one (norms, biases of replicated layers) on each. Returns
    ``{"per_rank": ..., "total": ..., "weights": ..., "sized_in_prepass": ..., "bounded": ...}``
    (bytes; ``total``: one rank holding everything; ``weights``: the merged tensors in
    the dtype mergekit writes; the count of tensors sized in the pre-pass's read, and
    of those sized as an upper bound).

    Where ``d`` is not prepared yet and its method has an incremental pre-pass
    (``swap_accumulator``), the tensors are sized as the pre-pass streams them: no read
    of their own on the driver. Dots with ``sparsify: global`` sizes them in the last
    pass of its radix select, where each threshold is known but for its last 16 bits:
    the few tensors with entries in that range (``bounded``) are sized as an upper
    bound (:func:`packed_nbytes`), the others exactly. An already prepared ``d`` (or a
    tensor of another merge dtype) is read again."""
    sizes: Dict[str, Tuple[int, int, int, int]] = {}
    bounded = []

    def size(task, base, sources, exact: bool = True) -> None:
        sizes[task.name] = _sized(task, base, sources, exact)
        if not exact:
            bounded.append(task.name)

    d.prepare(visit=size)
    rest = [t for t in d.tasks if t.name not in sizes]
    in_prepass = len(d.tasks) - len(rest)
    if progress and rest:
        from tqdm import tqdm

        rest = tqdm(rest, desc=f"{d.method}: sizing the swap", leave=False)
    for task in rest:
        size(task, *d.sources(task))
    total = per_rank = weights = 0
    tp = int(tensor_parallel_size)
    shares = _shares(d, tp)
    for name, (held, numel, dims, width) in ((t.name, sizes[t.name]) for t in d.tasks):
        total += held
        if dims < 2 or tp <= 1:
            per_rank += held
        else:  # the largest rank's share, and the bitmask of the entries it reads (reload path)
            num, den = shares["kv"] if _KV.search(name) else shares["vocab"] if _VOCAB.search(name) else (1, tp)
            per_rank += -(-held * num // den) + -(-numel // 8)
        weights += numel * width
    return {"per_rank": per_rank, "total": total, "weights": weights, "sized_in_prepass": in_prepass,
            "bounded": len(bounded)}


#: the checkpoint names of key and value projections, and of the vocabulary's rows
#: (Llama, Qwen, Mistral families)
_KV = re.compile(r"\.(k_proj|v_proj)\.")
_VOCAB = re.compile(r"(embed_tokens|lm_head)\.weight$")
_VOCAB_PADDING = 64  # vLLM pads the vocabulary to a multiple of this before splitting it


def _shares(d, tp: int) -> Dict[str, Tuple[int, int]]:
    """The largest rank's share (numerator, denominator) of a key or value projection
    (one head per rank at least: with fewer key/value heads than ranks each rank holds
    1/heads of it) and of a vocabulary tensor (padded, then split in equal row blocks:
    the first rank's holds the most real rows), from the base's config.json."""
    import json
    import os

    try:
        with open(os.path.join(d.base_path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        config = {}
    config = config.get("text_config", config)
    heads = config.get("num_key_value_heads") or config.get("num_attention_heads")
    kv = (1, max(1, min(tp, int(heads)))) if heads else (1, tp)
    vocab = int(config.get("vocab_size") or 0)
    if not vocab:
        return {"kv": kv, "vocab": (1, tp)}
    padded = -(-vocab // _VOCAB_PADDING) * _VOCAB_PADDING
    rows = -(-padded // tp)  # each rank's block of the padded rows
    return {"kv": kv, "vocab": (min(vocab, rows), vocab)}


def _sized(task, base, sources, exact: bool = True) -> Tuple[int, int, int, int]:
    """(packed bytes, entries, dimensions, bytes per entry as mergekit writes it) of one
    tensor. ``exact`` False: ``sources``' supports hold the final ones, and the bytes
    are an upper bound (:func:`packed_nbytes`'s ``bound``)."""
    import torch

    dtype = task.save_dtype or base.dtype
    held = packed_nbytes(base, sources, bound=not exact)
    return held, base.numel(), base.dim(), torch.empty(0, dtype=dtype).element_size()


def packed_nbytes(base: torch.Tensor, vectors: Sequence, bound: bool = False) -> int:
    """``packed.pack(base, vectors).nbytes`` without building the packing (what the driver
    sizes the swap with, at about 0.4x pack's time): the same supports and counts, and
    each kept part's narrowest exact dtype tested where it is kept, without gathering it.

    ``bound``: at least the packed bytes of any supports within these (each vector's,
    the touched entries): fewer entries take fewer bytes, in a dtype no wider (a subset
    of values exact in a dtype is exact in it), but a bitmask these leave out (all
    touched, or a vector's support all of them) may be needed, so it is counted."""
    from vllm_plugins import packed

    flat = base.reshape(-1)
    parts, touched = packed.supports(base, vectors)
    n = flat.numel()
    count = int(touched.sum())
    everything = count == n
    starts = 8 * ((n + packed.BLOCK - 1) // packed.BLOCK + 1)  # int64 per block edge
    total = 0 if everything and not bound else -(-n // 8) + starts
    total += count * packed.narrowest_size(flat, None if everything else touched)
    for support, values, *_ in parts:
        size = int(support.sum())  # within the touched entries
        whole = size == count
        total += 0 if whole and not bound else -(-count // 8) + starts
        total += size * packed.narrowest_size(values, None if everything and whole else support)
    return total
