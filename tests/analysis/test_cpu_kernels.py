"""analyze's native CPU kernels (analysis/cpu_kernels.c) against the torch kernels
(analysis/kernels.py, eager) on the same chunks: every count and histogram equal, the
double sums equal to a float64 reference of the same float32 deltas to 1e-9 (and to
the torch kernels' float32 reductions to 1e-5), on edge cases: unchanged entries,
signed zeros, subnormals, ties at the thresholds, bf16/f16/f32 mixed, lengths that
are no multiple of the vector width or block, one and two threads."""

from __future__ import annotations

import logging

import pytest
import torch

from mergekit_rlvr.analysis import cpu_kernels as C
from mergekit_rlvr.analysis import histograms as H
from mergekit_rlvr.analysis.backend import TorchKernels, select

LIB = C.library()
pytestmark = pytest.mark.skipif(LIB is None, reason="no C compiler for the native kernels")


def edge_chunk(n: int, dtypes, seed: int):
    """A base and len(dtypes) - 1 models: small dense and sparse updates, unchanged
    entries, signed zeros, subnormal deltas and repeated magnitudes."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.02
    base[: n // 16] = 0.0
    out = [base.to(dtypes[0])]
    for k, dtype in enumerate(dtypes[1:]):
        delta = torch.randn(n, generator=g) * (0.002 if k % 2 == 0 else 2e-4)
        delta = torch.where(torch.rand(n, generator=g) < 0.3 * (k + 1), torch.zeros(()), delta)
        model = base + delta
        model[: n // 32] = -0.0  # -0 against the base's +0: a signed-zero Delta
        model[n // 32: n // 16] = torch.randint(-3, 4, (n // 16 - n // 32,), generator=g) * 1e-40  # subnormals
        out.append(model.to(dtype))
    return out[0], out[1:]


def deltas(base, models):
    return [m.to(torch.float32) - base.to(torch.float32) for m in models]


def refined_bins(ds, count=6):
    """Coarse bins that hold entries (bin 0 of the zeros among them), as a prediction would pick."""
    out = []
    for d in ds:
        bins = torch.unique(d.abs().view(torch.int32) >> 16).tolist()
        out.append(sorted(set(bins[:: max(1, len(bins) // count)][:count]) | {0}))
    return out


def thresholds(ds):
    """Per model, 12 sorted thresholds: |Delta| values present (ties), one of them twice, 0, -inf, inf."""
    out = []
    for d in ds:
        values = torch.unique(d.abs())
        picks = values[torch.linspace(0, values.numel() - 1, 8).long()].tolist()
        out.append(torch.tensor(sorted(picks + [picks[3], 0.0, -float("inf"), float("inf")]), dtype=torch.float32))
    return out


def run_pass1(kernels, base, models, refined, epsilon, eta):
    width = H.refined_width([len(r) for r in refined])
    hists = [H.MagnitudeHistogram(r, "cpu", width) for r in refined]
    per_model, per_pair = kernels.pass1(models, base, [h.counts for h in hists], [h.table for h in hists],
                                        [h.refined for h in hists], epsilon, eta)
    kernels.flush()
    return [h.counts for h in hists], per_model, per_pair


def reference_sums(ds, epsilon, eta, base, models):
    """float64 sums over the float32 deltas, per model and per pair (pass 1's order),
    each with the sum of its terms' magnitudes (the scale of its rounding error)."""
    b = base.to(torch.float32).abs()
    changed = [d.abs() > torch.maximum(m.to(torch.float32).abs(), b) * eta for d, m in zip(ds, models)]
    per_model = [float((d.double() ** 2).sum()) for d in ds]
    per_pair = []
    for i in range(len(ds)):
        for j in range(i + 1, len(ds)):
            p = (ds[i] * ds[j]).double()
            both = changed[i] & changed[j]
            terms = [p, p.clamp(max=0) ** 2, p[both], ds[i].double()[both] ** 2, ds[j].double()[both] ** 2]
            per_pair.append([(float(t.sum()), float(t.abs().sum())) for t in terms])
    return per_model, per_pair


def close(a: float, b: float, scale: float, rel: float) -> bool:
    return abs(a - b) <= rel * scale


CASES = [  # (entries, dtypes: base first, threads, epsilon, eta)
    (1, (torch.bfloat16, torch.bfloat16, torch.bfloat16), 1, 1e-5, 1e-3),
    (1027, (torch.bfloat16, torch.float16, torch.float32), 1, 1e-5, 1e-3),
    (5003, (torch.float32, torch.float32, torch.bfloat16, torch.float16), 1, 0.0, 0.0),
    (3 * 65536 + 5, (torch.bfloat16, torch.bfloat16, torch.bfloat16), 2, 1e-5, 1e-3),
    (2 * 65536 + 3, (torch.float16, torch.bfloat16, torch.float32), 2, 1e-20, 1e-2),
]


@pytest.mark.parametrize("n,dtypes,threads,epsilon,eta", CASES)
def test_native_kernels_equal_torch_kernels(n, dtypes, threads, epsilon, eta):
    base, models = edge_chunk(n, dtypes, seed=n)
    ds = deltas(base, models)
    native, eager = C.CpuKernels(LIB, threads), TorchKernels(False, "cpu", threads)
    try:
        refined = refined_bins(ds)
        got, eager_got = run_pass1(native, base, models, refined, epsilon, eta), \
            run_pass1(eager, base, models, refined, epsilon, eta)
        for a, b in zip(got[0], eager_got[0]):
            assert torch.equal(a, b)  # pass 1 histograms
        ref_model, ref_pair = reference_sums(ds, epsilon, eta, base, models)
        for (norm, up, ch), (t_norm, t_up, t_ch), ref in zip(got[1], eager_got[1], ref_model):
            assert (up, ch) == (int(t_up), int(t_ch))
            assert close(norm ** 2, ref, ref, 1e-9) and close(norm, float(t_norm), norm, 1e-5)
        for terms, t_terms, ref in zip(got[2], eager_got[2], ref_pair):
            assert list(terms[1:4]) == [int(t) for t in t_terms[1:4]]
            sums = [terms[0], terms[4] ** 2, terms[5], terms[6], terms[7]]
            assert all(close(s, r, scale, 1e-9) for s, (r, scale) in zip(sums, ref)), (sums, ref)
            torch_sums = [float(t_terms[0]), float(t_terms[4]) ** 2] + [float(t) for t in t_terms[5:]]
            assert all(close(s, t, scale, 1e-5) for s, t, (_, scale) in zip(sums, torch_sums, ref)), (sums, torch_sums)

        values = thresholds(ds)
        slots = [3] * len(models)
        sizes = [(values[i].numel() + 1) * (values[j].numel() + 1) * 3
                 for i in range(len(models)) for j in range(i + 1, len(models))]
        joint = [[torch.zeros(s, dtype=torch.int64) for s in sizes] for _ in range(2)]
        tops = [k.pass3(models, base, values, slots, epsilon, h) for k, h in zip((native, eager), joint)]
        native.flush()
        assert tops[0] == [int(t) for t in tops[1]]
        assert all(torch.equal(a, b) for a, b in zip(*joint))

        fines = [[H.FineHistograms(r[1::2], 8 * H.FINE_BINS) for r in refined] for _ in range(2)]
        fines[0][0] = fines[1][0] = None  # a model without boundary bins is skipped
        for k, fs in zip((native, eager), fines):
            k.pass2(models, base, [f.counts if f else None for f in fs],
                    [(f or fines[1][1]).offset_of for f in fs], 8 * H.FINE_BINS)
        native.flush()
        assert all(torch.equal(a.counts, b.counts) for a, b in zip(fines[0][1:], fines[1][1:]))

        counts = [[torch.zeros(H.COARSE_BINS, dtype=torch.int64) for _ in models] for _ in range(2)]
        native.sample(models, base, counts[0])
        eager.sample(models, base, counts[1])
        assert all(torch.equal(a, b) for a, b in zip(*counts))
    finally:
        native.close()
        eager.close()


def test_other_dtypes_run_the_torch_kernels():
    """float64 chunks (Delta in float64, then float32) go to the torch kernels: the same results."""
    base, models = edge_chunk(3000, (torch.float64, torch.float64, torch.float32), seed=1)
    native, eager = C.CpuKernels(LIB, 1), TorchKernels(False, "cpu", 1)
    try:
        refined = [[0], [0]]
        a, b = run_pass1(native, base, models, refined, 1e-5, 1e-3), run_pass1(eager, base, models, refined, 1e-5, 1e-3)
        assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
        assert [t[1:] for t in a[1]] == [t[1:] for t in b[1]]
    finally:
        native.close()
        eager.close()


def test_native_switch_and_missing_compiler(monkeypatch, tmp_path, caplog):
    """MERGEKIT_RLVR_NATIVE=0 and compile=True select the torch kernels; without a C
    compiler the loader warns once and returns None (analyze then runs the torch kernels)."""
    from mergekit_rlvr import native

    cpu = torch.device("cpu")
    assert isinstance(select(cpu, None, 10), C.CpuKernels)
    assert isinstance(select(cpu, True, 10), TorchKernels)
    monkeypatch.setenv("MERGEKIT_RLVR_NATIVE", "0")
    assert isinstance(select(cpu, None, 10), TorchKernels)
    monkeypatch.delenv("MERGEKIT_RLVR_NATIVE")
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING):
        assert C.library() is None
        assert C.library() is None
        assert isinstance(select(cpu, None, 10), TorchKernels)
    warnings = [r for r in caplog.records if "native CPU kernels unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "running the torch kernels" in warnings[0].getMessage()
    assert not list((tmp_path / "cache").glob("*.so"))


def test_both_native_libraries_build_where_a_compiler_is_present():
    """The C sources (with the local headers they include) compile here: the skips above
    and in test_device_math only cover machines without a C compiler."""
    import os
    import shutil

    from vllm_plugins import cpu_kernel

    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler")
    assert C.library() is not None
    assert cpu_kernel._library() is not None
