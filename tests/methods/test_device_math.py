"""The merge math on a device equals the CPU's bit for bit (issue 15).

Each test runs on CPU tensors in every suite and, marked ``cuda``, on a CUDA device
where one is present. On CPU the device result is also checked against a brute
force (sorting, per-entry formulas), so the CPU run is a real known-answer test."""

from __future__ import annotations

import ctypes
import math
import os

import pytest
import torch

from mergekit_rlvr.methods.common import MaskedVector, combine, task_vector
from mergekit_rlvr.methods.dots import (
    dots_masked_vector,
    dots_stats,
    gamma_from_norms,
    kth_smallest,
    magnitude_threshold,
    squared_norms,
)
from mergekit_rlvr.methods.reasoning_interp import interp_vector
from mergekit_rlvr.methods.sar import resolve_conflicts, sar_vector

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device")])]
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float64: torch.int64}


def same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    got, want = got.cpu(), want.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.view(BITS[got.dtype]), want.view(BITS[want.dtype]))


def family(shape=(192, 320), models=3, seed=0):
    """bf16 checkpoints: a base and fine-tunes that move few bf16 steps (ties galore)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.05).to(torch.bfloat16)
    tuned = [(base.float() + torch.randn(shape, generator=g) * 10 ** -(2 + i % 2)).to(torch.bfloat16)
             for i in range(models)]
    return base, tuned


@pytest.mark.parametrize("device", DEVICES)
def test_selection_and_norms_do_not_depend_on_the_device(device):
    base, tuned = family()
    tau = task_vector(tuned[0], base)
    big = torch.randn(300_000, generator=torch.Generator().manual_seed(1)).abs()  # the radix-select path
    for values in (tau.reshape(-1).abs(), big):
        for rank in (1, 7, values.numel() // 3, values.numel()):
            got = kth_smallest(values.to(device), rank)
            assert float(got) == float(values.sort().values[rank - 1])  # brute force
    mask = tau.abs() >= magnitude_threshold(tau, 0.3)
    full, kept = squared_norms(tau.to(device), mask.to(device))
    assert (full, kept) == squared_norms(tau, mask)
    exact = [math.fsum(float(x) ** 2 for x in t.reshape(-1).tolist()) for t in (tau, tau[mask])]
    assert math.isclose(full, exact[0], rel_tol=1e-12) and math.isclose(kept, exact[1], rel_tol=1e-12)


def test_norms_do_not_depend_on_torchs_thread_count():
    """dots' gamma comes from these sums: a 1-thread process (a worker, a user's
    OMP_NUM_THREADS) and a 2-thread one (mergekit-yaml) must agree bit for bit."""
    big = (torch.randn(3_000_001, generator=torch.Generator().manual_seed(2)) * 0.01).to(torch.bfloat16)
    mask = big.float().abs() >= 0.01
    threads = torch.get_num_threads()
    try:
        got = []
        for count in (1, 2, 1):
            torch.set_num_threads(count)
            got.append(squared_norms(big.float(), mask))
    finally:
        torch.set_num_threads(threads)
    assert got[0] == got[1] == got[2]
    sample = big[:100_000].double()
    assert squared_norms(sample.float(), torch.ones(100_000, dtype=torch.bool))[0] == math.fsum((sample ** 2).tolist())


@pytest.mark.parametrize("rescale", ["global", "tensor", "none"])
@pytest.mark.parametrize("device", DEVICES)
def test_dots_vector_and_combine_on_a_device_equal_the_cpu(device, rescale):
    base, tuned = family(models=2)
    stats = dots_stats([("w", base, tuned)], [0.3, 0.3])
    vectors = {}
    for where in ("cpu", device):
        vs = [dots_masked_vector(base.to(where), m.to(where), 0.3, rescale, gamma=stats.gamma(i, rescale),
                                 threshold=stats.threshold(i, "w")) for i, m in enumerate(tuned)]
        vectors[where] = (vs, combine(base.to(where), vs, [0.79, 1.82], out_dtype=torch.bfloat16))
    (cpu_vs, cpu_merged), (dev_vs, dev_merged) = vectors["cpu"], vectors[device]
    for a, b in zip(dev_vs, cpu_vs):
        assert torch.equal(a.mask.cpu(), b.mask)
        same_bits(a.values, b.values)
    same_bits(dev_merged, cpu_merged)
    # brute force (per entry, the documented float32 order): base + sum c_j * (gamma_j * tau_j on the mask)
    want = base.float().clone()
    for i, (m, c) in enumerate(zip(tuned, [0.79, 1.82])):
        tau = task_vector(m, base)
        keep = tau.abs() >= float(tau.abs().reshape(-1).sort(descending=True).values[int(0.3 * tau.numel()) - 1])
        gamma = {"global": stats.gamma(i, "global"), "none": None,
                 "tensor": gamma_from_norms(float((tau.double() ** 2).sum()), float((tau[keep].double() ** 2).sum()))}
        scaled = tau * gamma[rescale] if gamma[rescale] is not None else tau
        want = torch.where(keep, want + scaled * c, want)
    if rescale == "tensor":  # this gamma sums in another order than squared_norms: its last bit may differ
        assert torch.allclose(cpu_merged.float(), want.to(torch.bfloat16).float(), rtol=1e-2)
    else:
        same_bits(cpu_merged, want.to(torch.bfloat16))


@pytest.mark.parametrize("fisher", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_sar_and_interpolation_on_a_device_equal_the_cpu(device, fisher):
    base, tuned = family(models=3)
    g = torch.Generator().manual_seed(2)
    fishers = [torch.rand(base.shape, generator=g) for _ in tuned] if fisher else [None] * 3
    got = {where: sar_vector(base.to(where), [m.to(where) for m in tuned],
                             [f.to(where) if f is not None else None for f in fishers],
                             drop_rate=0.5, epsilon=0.0, seed=3, name="model.layers.0.mlp.up_proj.weight")
           for where in ("cpu", device)}
    same_bits(got[device], got["cpu"])
    # the conflict-free entries are the left-fold sum of the deltas, on every device
    deltas = [task_vector(m, base) for m in tuned]
    resolved = resolve_conflicts(deltas, [d.abs() for d in deltas] if not fisher else fishers)
    agree = ~((torch.stack(deltas) > 0).any(0) & (torch.stack(deltas) < 0).any(0))
    same_bits(resolved[agree], ((deltas[0] + deltas[1]) + deltas[2])[agree])
    interp = {where: combine(tuned[0].to(where), [interp_vector(tuned[0].to(where), tuned[1].to(where))], [0.3],
                             out_dtype=torch.bfloat16) for where in ("cpu", device)}
    same_bits(interp[device], interp["cpu"])
    same_bits(interp["cpu"], (tuned[0].float() + (tuned[1].float() - tuned[0].float()) * 0.3).to(torch.bfloat16))



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_cpu_swap_kernel_writes_combines_bits(dtype, monkeypatch):
    """vllm_plugins.cpu_kernel (the C loop the CPU swap runs: its AVX2 part and its
    portable one) against combine and against torch's index ops, on every vector kind:
    signed zeros, subnormals, ties, an empty support, several blocks and a length that
    is no multiple of 8; the swap in place (packed.apply) writes the touched entries
    only, cast to the live tensor's dtype as mergekit's saved dtype would be."""
    from mergekit_rlvr.methods.common import RecomputedVector
    from vllm_plugins import cpu_kernel, packed

    if cpu_kernel._library() is None:
        pytest.skip("no C compiler: the swap uses torch's index ops (covered by test_decompose)")
    g = torch.Generator().manual_seed(4)
    n = 3 * 2048 + 13
    work = torch.float64 if dtype == torch.float64 else torch.float32
    base = (torch.randn(n, generator=g, dtype=torch.float64) * 0.05).to(dtype)
    base[:7], base[7:9] = -0.0, 0.0
    tiny = torch.finfo(dtype).tiny
    base[9:40] = torch.arange(31, dtype=torch.float64).to(dtype) * tiny / 8  # subnormals (bf16, f16, f32, f64)
    models = [base.clone() for _ in range(3)]
    for i, m in enumerate(models):  # few bf16 steps: ties and exact zeros galore
        m.view(-1)[i::2 + i] += (torch.randn(m[i::2 + i].shape, generator=g, dtype=torch.float64) * 10 ** -(2 + i)).to(dtype)
    models[0][9:40] = -models[0][9:40]
    masks = [torch.rand(n, generator=g) < d for d in (0.3, 0.6, 0.0)]
    explicit = torch.randn(n, generator=g, dtype=work)
    vectors = [RecomputedVector(models[0], masks[0], 1.37), RecomputedVector(models[1], None, 0.5),
               MaskedVector(masks[1], explicit), RecomputedVector(models[2]), RecomputedVector(models[1], masks[2], 2.0),
               explicit * 0.5]  # dense: every entry touched
    sparse = [RecomputedVector(models[0], masks[0], 1.1), MaskedVector(masks[1] & ~masks[0], explicit)]
    few = [vectors[0], vectors[2], vectors[5]]  # every entry touched, at most 4 vectors: the AVX2 loop writes out
    for vs in (vectors, few, sparse):
        store = packed.pack(base, vs)
        assert (store.touched is None) == (vs is not sparse)
        for coefficients in ([0.7, 1.3, 2.0, -0.5, 1.0, 0.3], [0.0] * 6, [-1.0, 3.0, 0.1, 1e-8, 7.0, -2.0], [3e38, 1e-45] * 3):
            c = coefficients[: len(vs)]
            want = combine(base, vs, c, out_dtype=dtype)
            touched = torch.ones(n, dtype=torch.bool) if store.touched is None else store.touched_mask()
            for mode in ("1", "portable", "0"):
                monkeypatch.setenv("MERGEKIT_RLVR_SWAP_KERNEL", mode)
                assert cpu_kernel.wanted(store.base, store.count) == (mode != "0")
                same_bits(packed.merge_dense(store, c, base), want)
                same_bits(packed.combine_packed(store, c), want[touched])
                for via, live in ((None, dtype), (dtype, torch.bfloat16), (torch.float16, torch.float32)):
                    out = torch.randn(n, generator=g, dtype=torch.float64).to(live)  # untouched: left as they are
                    expect = out.clone()
                    expect[touched] = (want if via is None else want.to(via)).to(live)[touched]
                    same_bits(packed.apply(store, c, out, via=via), expect)
    # every tensor of a swap in one call, split over threads across the tensors: those of torch's
    # OpenMP pool, or (built without OpenMP) threads of the kernel's own
    from mergekit_rlvr import native

    own = native.load(cpu_kernel.SOURCE, ("swap_init", "swap_apply_all"), "swap kernel without OpenMP", "-")
    own.swap_init()
    assert hasattr(cpu_kernel._library(), "omp_get_thread_num") and not hasattr(own, "omp_get_thread_num")
    torch_gomp = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
    if os.path.exists(torch_gomp):  # the kernel's OpenMP runtime is torch's: its threads are torch's pool

        def address(lib):
            return ctypes.cast(lib.omp_get_thread_num, ctypes.c_void_p).value

        assert address(cpu_kernel._library()) == address(ctypes.CDLL(torch_gomp))
    monkeypatch.setattr(cpu_kernel, "SPLIT", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for mode, lib in (("1", cpu_kernel._library()), ("portable", cpu_kernel._library()), ("1", own)):
            stores = [packed.pack(base, vs) for vs in (vectors, sparse, sparse[:1])]
            lives = [base.clone() for _ in stores]
            monkeypatch.setitem(cpu_kernel._lib, "lib", lib)
            monkeypatch.setenv("MERGEKIT_RLVR_SWAP_KERNEL", mode)
            packed.apply_all([(s, [1.5, -0.25, 2.0, 0.5, 1.0, -1.0][: len(s.vectors)], live, None)
                              for s, live in zip(stores, lives)])
            for s, vs, live in zip(stores, (vectors, sparse, sparse[:1]), lives):
                same_bits(live, combine(base, vs, [1.5, -0.25, 2.0, 0.5, 1.0, -1.0][: len(vs)], out_dtype=dtype))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("method", ["dots", "sar"])
def test_mergekit_yaml_cuda_writes_the_cpu_merge(method, tiny_family, tmp_path):
    from conftest import load_state, mergekit_yaml, write_recipe

    models = [{"model": tiny_family["sft"], "parameters": {"weight": 0.79}},
              {"model": tiny_family["rl"], "parameters": {"weight": 1.82}}]
    parameters = {"density": 0.3} if method == "dots" else {"drop_rate": 0.5, "scale": 1.2}
    if method == "sar":
        models = [{"model": m["model"]} for m in models]
    recipe = write_recipe(tmp_path / f"{method}.yml", {"merge_method": method, "base_model": tiny_family["base"],
                                                       "models": models, "parameters": parameters,
                                                       "dtype": "float32"})
    mergekit_yaml(recipe, tmp_path / "cpu")
    mergekit_yaml(recipe, tmp_path / "cuda", "--cuda")
    cpu, cuda = load_state(tmp_path / "cpu"), load_state(tmp_path / "cuda")
    assert sorted(cpu) == sorted(cuda)
    for name in cpu:
        same_bits(cuda[name], cpu[name])
