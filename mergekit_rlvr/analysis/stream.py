"""The driver of ``mergekit-rlvr analyze``: a row-sample pre-pass and two or three
streaming passes over the checkpoints (``reader``), the kernels on a chosen device
(``backend``: native C loops on CPU, torch kernels elsewhere), the statistics (``stats``, ``histograms``, ``breakdown``) and the report
dictionary (``assemble``).

The sample (every 64th row slice of each tensor) predicts where the global top-k
thresholds lie; pass 1 computes everything that needs no global threshold and the
|Delta| histograms, refined inside the predicted bins, which pins the thresholds
exactly; pass 2 only runs for a threshold whose bin the sample missed; pass 3 counts
what depends on the thresholds. Global, not per tensor: paper 000 Table 12's module
ratios only make sense globally (per-tensor top-10% would give 10% for every module),
and its Fig. 1b / paper 002 Fig. 8 keep "the top k% of the task vector". The dots
merge itself keeps the top k per tensor.
"""

from __future__ import annotations

import gc
import itertools
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from mergekit_rlvr.analysis import breakdown as B
from mergekit_rlvr.analysis import histograms as H
from mergekit_rlvr.analysis import stats as S
from mergekit_rlvr.analysis.assemble import assemble
from mergekit_rlvr.analysis.backend import COMPILE_FROM, select  # noqa: F401
from mergekit_rlvr.analysis.reader import CHUNK_ENTRIES, Plan, Source, chunks, plan, prefetch, resolve, sample  # noqa: F401
from mergekit_rlvr.errors import UserError

#: the pre-pass reads every SAMPLE_EVERY-th slice of SAMPLE_EVERY times smaller slices
SAMPLE_EVERY = 64
#: models of at most this many parameters are sampled whole (the prediction is then exact)
SAMPLE_ALL_UP_TO = 1 << 22
DEVICES = ("cpu", "cuda", "auto")


def resolve_device(device: str) -> torch.device:
    """cpu, cuda (an error line when no CUDA GPU is usable) or auto (cuda when present)."""
    if device not in DEVICES:
        raise UserError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device cuda: no CUDA GPU is available to torch {torch.__version__} "
                        "(use --device cpu or auto)")
    return torch.device(device)


@dataclass
class Run:
    base: Source
    models: List[Source]
    todo: Plan
    args: List[str]
    total: int
    device: torch.device
    kernels: object  # backend.TorchKernels or cpu_kernels.CpuKernels
    chunk_entries: int
    progress: bool

    def stream(self, desc: str):
        """(name, base chunk, [model chunks]) on the device, read one chunk ahead."""
        with _progress(self.total, desc, self.progress) as bar:
            for name, b, ms in prefetch(chunks(self.todo, self.base, self.models, self.chunk_entries)):
                yield name, *self.flat(b, ms)
                bar.update(b.numel())

    def flat(self, b: torch.Tensor, ms: Sequence[torch.Tensor]):
        """Chunks as 1-D tensors on the device: one compiled kernel serves every tensor
        (no recompiling for another rank or for rows == columns)."""
        return b.reshape(-1).to(self.device), [m.reshape(-1).to(self.device) for m in ms]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="param", unit_scale=True, disable=not enabled, leave=False)


def _check_finite(name: str, tensors: Sequence[torch.Tensor], args: Sequence[str]) -> None:
    for tensor, arg in zip(tensors, args):
        if not bool(torch.isfinite(tensor).all()):
            raise UserError(f"model {arg}: tensor {name} contains NaN or Inf")


def _validate(model_args: Sequence[str], epsilon: float, eta: float, top: float) -> None:
    if not model_args:
        raise UserError("analyze needs at least one MODEL besides --base")
    duplicates = sorted({a for a in model_args if list(model_args).count(a) > 1})
    if duplicates:
        raise UserError(f"MODEL {duplicates[0]} is given twice")
    for label, value in (("--epsilon", epsilon), ("--eta", eta)):
        if not (0.0 <= value < math.inf):
            raise UserError(f"{label} must be a finite number >= 0, got {value}")
    if not (0.0 < top <= 1.0):
        raise UserError(f"--top must be in (0, 1], got {top}")


def analyze(base_arg: str, model_args: Sequence[str], epsilon: float = 1e-5, eta: float = 1e-3,
            top: float = 0.1, progress: bool = True, chunk_entries: int = CHUNK_ENTRIES,
            compile: Optional[bool] = None, device: str = "cpu", predict: bool = True) -> dict:
    """Run the passes and return the report dictionary (see ``assemble``).
    ``compile``: None (default): the native kernels on CPU, elsewhere the torch kernels
    fused by torch.compile when the models hold ``COMPILE_FROM``+ parameters; True: the
    torch kernels fused (on CPU too); False: never torch.compile (``backend.select``).
    ``device``: where the kernels run (cpu, cuda, auto). ``predict``: the sample
    pre-pass (off: pass 2 always runs)."""
    _validate(model_args, epsilon, eta, top)
    where = resolve_device(device)
    base = Source(base_arg)
    models = [Source(a) for a in model_args]
    todo = plan(base, models)
    if not todo.names:
        raise UserError(f"no tensor of {base_arg} is present with the same shape in every MODEL")
    total = sum(math.prod(todo.shapes[n]) for n in todo.names)
    run = Run(base, models, todo, list(model_args), total, where, select(where, compile, total), chunk_entries,
              progress)
    threads = torch.get_num_threads()
    if getattr(run.kernels, "own_threads", False):  # torch's few small ops: its idle OpenMP pool would spin
        torch.set_num_threads(1)
    collecting = gc.isenabled()
    gc.disable()  # the passes allocate few objects that form cycles; the collector only spent time
    try:
        return _analyze(run, epsilon, eta, top, predict)
    finally:
        if collecting:
            gc.enable()
        torch.set_num_threads(threads)
        run.kernels.close()


def _analyze(run: Run, epsilon: float, eta: float, top: float, predict: bool) -> dict:
    base_arg, models, todo = run.base.arg, run.models, run.todo
    densities = sorted(set(S.DENSITIES) | {float(top)})
    refined = _predict(run, densities) if predict else [[] for _ in models]
    vectors, pair_stats, cells, pair_cells = _pass1(run, refined, epsilon, eta)
    thresholds = _thresholds(run, vectors, densities)
    tops, conflicts = _pass3(run, thresholds, float(top), epsilon)
    report = assemble(base_arg, run.args, todo, vectors, pair_stats, thresholds, tops, conflicts,
                      dict(epsilon=epsilon, eta=eta, top=float(top), densities=list(S.DENSITIES)))
    for arg, c in zip(run.args, cells):
        report["vectors"][arg]["layer_sparsity"] = c.layer_sparsity()  # paper 001 Fig. 2
    for entry, (i, j) in zip(report["pairs"], _pairs(run)):  # paper 004 Table 5 and Fig. 3
        entry.update(B.pair_breakdown(cells[i], cells[j], pair_cells[(i, j)]))
    return report


def _pairs(run: Run):
    return list(itertools.combinations(range(len(run.models)), 2))


def _predict(run: Run, densities: Sequence[float]) -> List[List[int]]:
    """Per model, the coarse bins to refine in pass 1, from a weighted row sample.
    On CPU in one thread: its eager ops on 1/64-size slices are too small for OpenMP
    (bench/analyze_speed.py's data: 0.4 s in one thread, 1.5 s in two on a loaded
    2-core machine); exact integer counts either way."""
    threads = torch.get_num_threads()
    if run.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        return _sample_bins(run, densities)
    finally:
        torch.set_num_threads(threads)


def _sample_bins(run: Run, densities: Sequence[float]) -> List[List[int]]:
    sampled = [torch.zeros(H.COARSE_BINS, dtype=torch.float64, device=run.device) for _ in run.models]
    entries = 0
    every = SAMPLE_EVERY if run.total > SAMPLE_ALL_UP_TO else 1
    size = max(1, run.chunk_entries // every)
    counts = [torch.zeros(H.COARSE_BINS, dtype=torch.int64, device=run.device) for _ in run.models]
    for name, b, ms, weight in prefetch(sample(run.todo, run.base, run.models, every, size)):
        b, ms = run.flat(b, ms)
        run.kernels.sample(ms, b, counts)  # eager or native: 1/64 of the work
        for hist, c in zip(sampled, counts):
            hist += c.to(torch.float64) * weight
        entries += b.numel()
    return [H.predict_bins(h.cpu(), entries, run.total, densities) for h in sampled]


def _pass1(run: Run, refined: List[List[int]], epsilon: float, eta: float):
    pairs = _pairs(run)
    width = H.refined_width([len(set(r)) for r in refined])
    vectors = [S.VectorStats(H.MagnitudeHistogram(r, run.device, width)) for r in refined]
    tables = [v.histogram.table for v in vectors]
    refined_bins = [v.histogram.refined for v in vectors]
    pair_stats = {p: S.PairStats() for p in pairs}
    cells = [B.VectorCells() for _ in run.models]
    pair_cells = {p: B.PairCells() for p in pairs}
    for name, b, ms in run.stream("analyze 1/3"):
        per_model, per_pair = run.kernels.pass1(ms, b, [v.histogram.counts for v in vectors], tables, refined_bins,
                                                epsilon, eta)
        n = b.numel()
        for v, c, terms in zip(vectors, cells, per_model):
            v.add(name, n, terms)
            c.add(name, n, terms)
            if not math.isfinite(v.sumsq):  # a NaN/Inf input makes ||Delta|| non-finite
                _check_finite(name, [b, *ms], [run.base.arg, *run.args])
                raise UserError(f"tensor {name}: Delta overflows float32")
        for (i, j), terms in zip(pairs, per_pair):
            pair_stats[(i, j)].add(name, n, terms, per_model[i], per_model[j])
            pair_cells[(i, j)].add(name, terms)
    run.kernels.flush()
    return vectors, pair_stats, cells, pair_cells


def _thresholds(run: Run, vectors: List[S.VectorStats], densities: Sequence[float]) -> List[S.Thresholds]:
    """Exact global thresholds for every density and --top: from pass 1 where the
    sample predicted the bin, else from a pass 2 over the bins it missed."""
    boundaries = [{d: H.locate(v.histogram.coarse(), v.parameters, d) for d in densities} for v in vectors]
    missing = [{bd.coarse_bin for bd in bs.values() if bd.coarse_bin is not None
                and v.histogram.fine(bd.coarse_bin) is None} for bs, v in zip(boundaries, vectors)]
    dump = max(len(m) for m in missing) * H.FINE_BINS
    fines = [H.FineHistograms(m, dump, run.device) for m in missing]
    if dump:
        tables = [f.offset_of for f in fines]
        for name, b, ms in run.stream("analyze 2/3"):
            run.kernels.pass2(ms, b, [f.counts if f.bins else None for f in fines], tables, dump)
        run.kernels.flush()
    out = []
    for bs, v, f in zip(boundaries, vectors, fines):
        fine = {c: v.histogram.fine(c) if c not in f.bins else f.of(c)
                for c in {bd.coarse_bin for bd in bs.values() if bd.coarse_bin is not None}}
        by_density = {d: H.refine(bd, fine.get(bd.coarse_bin)) for d, bd in bs.items()}
        out.append(S.Thresholds(by_density, run.device))
    return out


def _pass3(run: Run, thresholds: List[S.Thresholds], top: float, epsilon: float):
    pairs = _pairs(run)
    tops = [S.TopModuleStats(t.index[top]) for t in thresholds]
    conflicts = {(i, j): S.DensityConflictStats(len(thresholds[i].values), len(thresholds[j].values), run.device)
                 for i, j in pairs}
    values = [t.values for t in thresholds]
    top_slots = [t.index[top] for t in thresholds]
    for name, b, ms in run.stream("analyze 3/3"):
        kept = run.kernels.pass3(ms, b, values, top_slots, epsilon, [conflicts[pair].counts for pair in pairs])
        for st, k in zip(tops, kept):
            st.add(name, k)
    run.kernels.flush()
    return tops, conflicts
