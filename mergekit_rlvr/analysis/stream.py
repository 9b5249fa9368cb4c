"""Streaming reader and the three-pass driver of ``mergekit-rlvr analyze``.

Models are resolved the way mergekit resolves them (``ModelReference`` for Hugging
Face ids, ``ShardedTensorIndex`` for a local directory, sharded or not) and read as
row slices of their safetensors files with ``pread`` (no mmap, so the resident
memory is the chunks in flight, never a whole tensor or model). A background thread
reads the next chunk while torch works on the current one.

Only tensors present in the base and in every MODEL with the same shape are
analyzed (the others are listed under "skipped" with the reason), so every vector
and pair is measured over the same entries.

Pass 1 computes everything that needs no global threshold and the coarse |Delta|
histograms; pass 2 the fine histograms that pin the global top-k thresholds
exactly; pass 3 the counts that depend on them (see ``stats``). Global, not per
tensor: paper 000 Table 12's module ratios only make sense globally (per-tensor
top-10% would give 10% for every module), and its Fig. 1b / paper 002 Fig. 8 keep
"the top k% of the task vector". The dots merge itself keeps the top k per tensor.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from mergekit_rlvr.analysis import breakdown as B
from mergekit_rlvr.analysis import stats as S
from mergekit_rlvr.errors import UserError

#: entries per chunk (float32 intermediates of a few times 16 MB)
CHUNK_ENTRIES = 1 << 22
#: parameters per model from which ``analyze`` fuses its kernels by default
COMPILE_FROM = 50_000_000


_TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _TORCH_DTYPES[_name] = getattr(torch, _attr)


class SafetensorsFile:
    """A safetensors file read with ``pread`` (no mmap): a row slice costs one read of
    its bytes, and memory holds only what was read."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        head = os.pread(self.fd, 8, 0)
        if len(head) != 8:
            raise ValueError("file shorter than a safetensors header")
        size = int.from_bytes(head, "little")
        if size > 100_000_000:
            raise ValueError(f"implausible header size {size}")
        header = json.loads(os.pread(self.fd, size, 8))
        header.pop("__metadata__", None)
        self.data_start = 8 + size
        self.entries = header

    def __del__(self):
        fd = getattr(self, "fd", None)
        if fd is not None:
            os.close(fd)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> str:
        return self.entries[name]["dtype"]

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        entry = self.entries[name]
        dtype = _TORCH_DTYPES[entry["dtype"]]
        shape = entry["shape"]
        begin, end = entry["data_offsets"]
        rows = shape[0] if shape else 1
        row_bytes = (end - begin) // max(rows, 1)
        count = (stop - start) * row_bytes
        buffer = torch.empty(count, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        got = 0
        while got < count:
            n = os.preadv(self.fd, [view[got:]], self.data_start + begin + start * row_bytes + got)
            if n <= 0:
                raise OSError(f"{self.path}: unexpected end of file in tensor {name}")
            got += n
        out = buffer.view(dtype)
        return out.reshape(shape) if not shape else out.reshape(stop - start, *shape[1:])


class Source:
    """One checkpoint: tensor name -> safetensors file, read in row slices."""

    def __init__(self, arg: str):
        self.arg = arg
        path = resolve(arg)
        try:
            from mergekit.io.lazy_tensor_loader import ShardedTensorIndex

            index = ShardedTensorIndex.from_disk(path)
        except (RuntimeError, OSError, ValueError, KeyError) as error:
            raise UserError(f"model {arg}: no readable checkpoint at {path} ({error})") from None
        if not index.is_safetensors:
            raise UserError(f"model {arg}: only safetensors checkpoints can be streamed (found pytorch .bin files)")
        self._files: Dict[str, SafetensorsFile] = {}
        self.where: Dict[str, SafetensorsFile] = {}
        for name, shard in index.tensor_paths.items():
            file = os.path.join(index.base_path, shard)
            if file not in self._files:
                try:
                    self._files[file] = SafetensorsFile(file)
                except (OSError, ValueError) as error:
                    raise UserError(f"model {arg}: {file} is not a readable safetensors file: {error}") from None
            if name not in self._files[file].entries:
                raise UserError(f"model {arg}: tensor {name} is listed in the index but not in {file}")
            self.where[name] = self._files[file]
        self.order = {file: i for i, file in enumerate(sorted(self._files))}

    def names(self) -> List[str]:
        """Tensor names in file order (one shard after the other, by offset)."""
        return sorted(self.where, key=lambda n: (self.order[self.where[n].path],
                                                 self.where[n].entries[n]["data_offsets"][0]))

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.where[name].shape(name)

    def dtype(self, name: str) -> str:
        return self.where[name].dtype(name)

    def read(self, name: str, start: int, stop: int, scalar: bool) -> torch.Tensor:
        file = self.where[name]
        try:
            return file.read_rows(name, 0, 1) if scalar else file.read_rows(name, start, stop)
        except (OSError, KeyError, RuntimeError) as error:
            raise UserError(f"model {self.arg}: tensor {name} is unreadable in {file.path}: {error}") from None


def resolve(arg: str) -> str:
    """Local path of a model argument, downloading a Hugging Face id like mergekit."""
    if os.path.exists(arg):
        return arg  # local: skip importing mergekit.common (peft, transformers: seconds)
    if os.path.isabs(arg) or arg.startswith(".") or arg.split("@")[0].count("/") > 1:
        raise UserError(f"model {arg}: no such directory (and not a Hugging Face id like owner/name)")
    from mergekit.common import ModelReference

    try:
        reference = ModelReference.parse(arg)
    except Exception as error:
        raise UserError(f"model {arg}: not a model path or Hugging Face id ({error})") from None
    if reference.lora is not None:
        raise UserError(f"model {arg}: LoRA adapters are not supported by analyze (merge it first)")
    if os.path.exists(reference.model.path):
        return reference.model.path
    try:
        return reference.local_path()
    except Exception as error:  # huggingface_hub raises many kinds
        raise UserError(f"model {arg}: not a local directory and not downloadable ({type(error).__name__}: {error})") from None


FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


@dataclass
class Plan:
    names: List[str]
    shapes: Dict[str, Tuple[int, ...]]
    skipped: List[Dict[str, str]]


def plan(base: Source, models: Sequence[Source]) -> Plan:
    """Tensors present in the base and every model with equal shapes; the rest skipped."""
    names, shapes, skipped = [], {}, []
    model_names = [set(m.where) for m in models]
    for name in base.names():
        shape = base.shape(name)
        reasons = []
        if base.dtype(name) not in FLOAT_DTYPES:
            skipped.append({"tensor": name, "model": base.arg, "reason": f"not floating point ({base.dtype(name)})"})
            continue
        for model, present in zip(models, model_names):
            if name not in present:
                reasons.append({"tensor": name, "model": model.arg, "reason": "missing in the model"})
            elif model.shape(name) != shape:
                reasons.append({"tensor": name, "model": model.arg,
                                "reason": f"shape {list(model.shape(name))} differs from the base's {list(shape)}"})
            elif model.dtype(name) not in FLOAT_DTYPES:
                reasons.append({"tensor": name, "model": model.arg, "reason": f"not floating point ({model.dtype(name)})"})
        if reasons:
            skipped.extend(reasons)
            continue
        names.append(name)
        shapes[name] = shape
    base_names = set(base.where)
    for model in models:
        for name in sorted(set(model.where) - base_names):
            skipped.append({"tensor": name, "model": model.arg, "reason": "missing in the base"})
    return Plan(names, shapes, skipped)


def chunks(plan_: Plan, base: Source, models: Sequence[Source], chunk_entries: int = CHUNK_ENTRIES
           ) -> Iterator[Tuple[str, torch.Tensor, List[torch.Tensor]]]:
    """(name, base chunk, [model chunks]) row slices of at most ``chunk_entries`` entries
    (at least one row)."""
    for name in plan_.names:
        shape = plan_.shapes[name]
        if not shape:
            yield name, base.read(name, 0, 1, True), [m.read(name, 0, 1, True) for m in models]
            continue
        row = math.prod(shape[1:])
        step = max(1, chunk_entries // max(row, 1))
        for start in range(0, shape[0], step):
            stop = min(shape[0], start + step)
            yield name, base.read(name, start, stop, False), [m.read(name, start, stop, False) for m in models]


def prefetch(iterator, depth: int = 2):
    """Run ``iterator`` in a background thread, ``depth`` items ahead: file reads
    (``pread`` releases the GIL) overlap the torch work on the previous chunk."""
    import queue
    import threading

    items: "queue.Queue" = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        items.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put((done, None))
        except BaseException as error:  # re-raised in the consumer
            items.put((done, error))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item[0] is done:
                if item[1] is not None:
                    raise item[1]
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                items.get_nowait()
            except queue.Empty:
                thread.join(0.05)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="param", unit_scale=True, disable=not enabled, leave=False)


def _check_finite(name: str, tensors: Sequence[torch.Tensor], args: Sequence[str]) -> None:
    for tensor, arg in zip(tensors, args):
        if not bool(torch.isfinite(tensor).all()):
            raise UserError(f"model {arg}: tensor {name} contains NaN or Inf")


def analyze(base_arg: str, model_args: Sequence[str], epsilon: float = 1e-5, eta: float = 1e-3,
            top: float = 0.1, progress: bool = True, chunk_entries: int = CHUNK_ENTRIES,
            compile: Optional[bool] = None) -> dict:
    """Run the three passes and return the report dictionary (see ``report``).
    ``compile``: fuse the per-chunk kernels with torch.compile (None: when the models
    hold at least ``COMPILE_FROM`` analyzed parameters)."""
    if not model_args:
        raise UserError("analyze needs at least one MODEL besides --base")
    duplicates = sorted({a for a in model_args if list(model_args).count(a) > 1})
    if duplicates:
        raise UserError(f"MODEL {duplicates[0]} is given twice")
    for label, value, low, high in (("--epsilon", epsilon, 0.0, math.inf), ("--eta", eta, 0.0, math.inf)):
        if not (low <= value < high):
            raise UserError(f"{label} must be a finite number >= 0, got {value}")
    if not (0.0 < top <= 1.0):
        raise UserError(f"--top must be in (0, 1], got {top}")
    base = Source(base_arg)
    models = [Source(a) for a in model_args]
    todo = plan(base, models)
    if not todo.names:
        raise UserError(f"no tensor of {base_arg} is present with the same shape in every MODEL")
    total = sum(math.prod(todo.shapes[n]) for n in todo.names)
    args = list(model_args)
    count = len(models)
    pairs = list(itertools.combinations(range(count), 2))

    if compile is None:  # fusing pays off once the elementwise work outweighs compiling (~20-60 s)
        compile = total >= COMPILE_FROM
    kernels = S.Kernels(bool(compile))

    # pass 1
    vectors = [S.VectorStats() for _ in range(count)]
    pair_stats = {p: S.PairStats() for p in pairs}
    cells = [B.VectorCells() for _ in range(count)]
    pair_cells = {p: B.PairCells() for p in pairs}
    with _progress(total, "analyze 1/3", progress) as bar:
        for name, b, ms in prefetch(chunks(todo, base, models, chunk_entries)):
            per_model, per_pair = kernels("pass1", ms, b, epsilon, eta)
            n = b.numel()
            for v, c, terms in zip(vectors, cells, per_model):
                v.add(name, n, terms)
                c.add(name, n, terms)
                if not math.isfinite(v.sumsq):  # a NaN/Inf input makes ||Delta|| non-finite
                    _check_finite(name, [b, *ms], [base_arg, *args])
                    raise UserError(f"tensor {name}: Delta overflows float32")
            for (i, j), terms in zip(pairs, per_pair):
                pair_stats[(i, j)].add(name, n, terms, per_model[i], per_model[j])
                pair_cells[(i, j)].add(name, terms)
            bar.update(n)

    # pass 2: exact global thresholds for every density and --top
    densities = sorted(set(S.DENSITIES) | {float(top)})
    boundaries = [{d: S.locate(v.coarse, v.parameters, d) for d in densities} for v in vectors]
    bins = [{bd.coarse_bin for bd in bs.values() if bd.coarse_bin is not None} for bs in boundaries]
    dump = max(len(b) for b in bins) * S.FINE_BINS
    fines = [S.FineHistograms(b, dump) for b in bins]
    if dump:
        tables = [f.offset_of for f in fines]
        with _progress(total, "analyze 2/3", progress) as bar:
            for name, b, ms in prefetch(chunks(todo, base, models, chunk_entries)):
                for f, key in zip(fines, kernels("pass2", ms, b, tables, dump)):
                    f.add(key)
                bar.update(b.numel())
    thresholds = []
    for bs, f in zip(boundaries, fines):
        by_density = {d: S.refine(bd, f.of(bd.coarse_bin) if bd.coarse_bin is not None else None)
                      for d, bd in bs.items()}
        thresholds.append(S.Thresholds(by_density))
    del fines

    # pass 3: counts under the global thresholds
    tops = [S.TopModuleStats(t.index[float(top)]) for t in thresholds]
    conflicts = {(i, j): S.DensityConflictStats(len(thresholds[i].values), len(thresholds[j].values))
                 for i, j in pairs}
    values = [t.values for t in thresholds]
    top_slots = [t.index[float(top)] for t in thresholds]
    with _progress(total, "analyze 3/3", progress) as bar:
        for name, b, ms in prefetch(chunks(todo, base, models, chunk_entries)):
            kept, codes = kernels("pass3", ms, b, values, top_slots, epsilon)
            for st, k in zip(tops, kept):
                st.add(name, k)
            for pair, code in zip(pairs, codes):
                conflicts[pair].add(code)
            bar.update(b.numel())

    report = assemble(base_arg, args, todo, vectors, pair_stats, thresholds, tops, conflicts,
                      dict(epsilon=epsilon, eta=eta, top=float(top), densities=list(S.DENSITIES)))
    for arg, c in zip(args, cells):
        report["vectors"][arg]["layer_sparsity"] = c.layer_sparsity()  # paper 001 Fig. 2
    for entry, (i, j) in zip(report["pairs"], pairs):  # paper 004 Table 5 and Fig. 3
        entry.update(B.pair_breakdown(cells[i], cells[j], pair_cells[(i, j)]))
    return report


def _ratio(num: float, den: float) -> Optional[float]:
    return num / den if den else None


def assemble(base_arg, args, todo, vectors, pair_stats, thresholds, tops, conflicts, settings) -> dict:
    """The report dictionary: keys of the issue plus extras."""
    top = settings["top"]
    out_vectors = {}
    for arg, v, t, tp in zip(args, vectors, thresholds, tops):
        kinds = [k for k in (*S.MODULE_KINDS, "other") if v.kind_parameters.get(k)]
        out_vectors[arg] = {
            "l2_norm": math.sqrt(v.sumsq),
            "sparsity": 1.0 - v.updated / v.parameters,
            "layer_l2_norms": {str(i): math.sqrt(s) for i, s in sorted(v.layer_sumsq.items())},
            "module_top_share": {k: tp.kind_kept.get(k, 0) / v.kind_parameters[k] for k in kinds},
            # extras
            "parameters": v.parameters,
            "updated": v.updated,
            "changed_share": v.changed / v.parameters,
            "module_parameters": {k: v.kind_parameters[k] for k in kinds},
            "module_l2_norms": {k: math.sqrt(v.kind_sumsq[k]) for k in kinds},
            "module_top_composition": {k: _ratio(tp.kind_kept.get(k, 0), tp.kept) for k in kinds},
            "top_threshold": t.by_density[top],
            "density_thresholds": {str(d): t.by_density[d] for d in settings["densities"]},
        }
    out_pairs = []
    for (i, j), st in pair_stats.items():
        a, b = vectors[i], vectors[j]
        n = st.parameters
        na, nb = math.sqrt(a.sumsq), math.sqrt(b.sumsq)
        pa, pb = a.changed / n, b.changed / n
        random = pa * pb / (pa + pb - pa * pb) if (pa + pb - pa * pb) > 0 else None
        layers = sorted(set(a.layer_sumsq) & set(b.layer_sumsq))
        by_density, kept_counts, a_sparsified, b_sparsified = {}, {}, {}, {}
        ti, tj = thresholds[i].index, thresholds[j].index
        for d in settings["densities"]:
            kept, conflict = conflicts[(i, j)].rate(ti[d], tj[d])
            by_density[str(d)] = _ratio(conflict, kept)
            kept_counts[str(d)] = kept
            # paper 000 Fig. 1b: one vector at density d, the other at its top --top
            a_sparsified[str(d)] = _ratio(*reversed(conflicts[(i, j)].rate(ti[d], tj[top])))
            b_sparsified[str(d)] = _ratio(*reversed(conflicts[(i, j)].rate(ti[top], tj[d])))
        out_pairs.append({
            "a": args[i],
            "b": args[j],
            "norm_ratio": _ratio(na, nb),
            "cosine": _ratio(st.dot, na * nb),
            "layer_cosine": {str(L): _ratio(st.layer_dot.get(L, 0.0),
                                            math.sqrt(a.layer_sumsq[L]) * math.sqrt(b.layer_sumsq[L]))
                             for L in layers},
            "sign_conflict": _ratio(st.conflict, st.overlap),
            "regions": {
                "overlap": st.overlap / n,
                "conflict": st.conflict / n,
                "private": st.private / n,
                "unchanged": (n - st.overlap - st.private) / n,
            },
            "jaccard": _ratio(st.changed_both, st.changed_either),
            "jaccard_random": random,
            "conflict_norm": math.sqrt(st.conflict_sumsq),
            "sign_conflict_by_density": by_density,
            # extras
            "co_updated_by_density": kept_counts,
            "sign_conflict_a_sparsified": a_sparsified,
            "sign_conflict_b_sparsified": b_sparsified,
        })
    return {
        "base": base_arg,
        "models": list(args),
        "settings": settings,
        "parameters": todo and sum(math.prod(todo.shapes[n]) for n in todo.names),
        "tensors": len(todo.names),
        "vectors": out_vectors,
        "pairs": out_pairs,
        "skipped": todo.skipped,
    }
