"""Known answers for the pure merge math in mergekit_rlvr.methods."""

import math

import pytest
import torch

from mergekit_rlvr.methods.common import MergeInputError, SparseVector, combine, task_vector
from mergekit_rlvr.methods.dots import (
    check_density,
    dots_stats,
    dots_vector,
    gamma_from_norms,
    magnitude_threshold,
)
from mergekit_rlvr.methods.reasoning_interp import check_alpha, interp_vector
from mergekit_rlvr.methods.sar import (
    check_drop_rate,
    low_private,
    private_region,
    resolve_conflicts,
    sar_vector,
)


def test_dots_keeps_int_density_n_largest_and_rescales_per_tensor():
    base = torch.zeros(10)
    model = torch.tensor([5.0, -4.0, 3.0, -2.0, 1.0, 0.5, -0.25, 0.1, 0.0, 0.05])
    vector = dots_vector(base, model, density=0.3, rescale="tensor")  # int(0.3 * 10) = 3 kept
    assert vector.mask.tolist() == [True, True, True] + [False] * 7
    full = math.sqrt(float((model.double() ** 2).sum()))
    kept = math.sqrt(25 + 16 + 9)
    gamma = full / (kept + 1e-8)
    torch.testing.assert_close(vector.values, torch.tensor([5.0, -4.0, 3.0]) * gamma)


def test_dots_threshold_ties_are_kept_and_edge_densities():
    tau = torch.tensor([1.0, 1.0, 1.0, 0.5])
    assert magnitude_threshold(tau, 0.5) == 1.0  # k = 2, the tie of three is kept
    vector = dots_vector(torch.zeros(4), tau, 0.5, "none")
    assert int(vector.mask.sum()) == 3
    assert magnitude_threshold(tau, 1.0) == -math.inf
    assert magnitude_threshold(tau, 0.2) == math.inf  # int(0.8) = 0 kept
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(MergeInputError, match="density"):
            check_density(bad)


def test_dots_global_gamma_is_one_factor_over_all_tensors():
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(50, generator=g), "b": torch.randn(7, 3, generator=g)}
    model = {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
    stats = dots_stats(((k, base[k], [model[k]]) for k in base), [0.3])
    full = sum(float(((model[k] - base[k]).double() ** 2).sum()) for k in base)
    kept = 0.0
    for k in base:
        tau = (model[k] - base[k]).reshape(-1)
        top = tau.abs().sort(descending=True).values[: int(0.3 * tau.numel())]
        kept += float((top.double() ** 2).sum())
    assert stats.gamma(0, "global") == pytest.approx(math.sqrt(full) / (math.sqrt(kept) + 1e-8), rel=1e-12)
    for k in base:
        v = dots_vector(base[k], model[k], 0.3, "global", gamma=stats.gamma(0, "global"))
        w = dots_vector(base[k], model[k], 0.3, "global", gamma=stats.gamma(0, "global"),
                        threshold=stats.thresholds[0][k])
        assert torch.equal(v.mask, w.mask) and torch.equal(v.values, w.values)


def test_combine_is_base_plus_weighted_vectors_rounded_once():
    base = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
    dense = torch.tensor([0.5, 0.5, 0.5])
    sparse = SparseVector(torch.tensor([True, False, True]), torch.tensor([1.0, -1.0]))
    out = combine(base, [dense, sparse], [2.0, 0.25])
    assert out.dtype == torch.bfloat16
    expected = torch.tensor([1.0 + 1.0 + 0.25, 2.0 + 1.0, 3.0 + 1.0 - 0.25]).to(torch.bfloat16)
    assert torch.equal(out, expected)
    assert torch.equal(sparse.dense(), torch.tensor([1.0, 0.0, -1.0]))


def test_sar_conflicts_go_to_larger_fisher_ties_to_b():
    a = torch.tensor([1.0, 1.0, -2.0, 3.0, 0.0, 0.5])
    b = torch.tensor([2.0, -1.0, 1.0, -3.0, 4.0, 0.0])
    fa = torch.tensor([0.0, 5.0, 1.0, 2.0, 9.0, 9.0])
    fb = torch.tensor([0.0, 1.0, 3.0, 2.0, 0.0, 0.0])
    # agree -> sum; conflict -> larger Fisher (A, B); tie -> B; private -> sum
    assert resolve_conflicts([a, b], [fa, fb]).tolist() == [3.0, 1.0, 1.0, -3.0, 4.0, 0.5]


def test_sar_more_than_two_models_keeps_most_sensitive_nonzero_update():
    a = torch.tensor([1.0, 1.0])
    b = torch.tensor([-1.0, 2.0])
    c = torch.tensor([0.0, 3.0])
    s = [torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0]), torch.tensor([99.0, 0.0])]
    # entry 0: conflict among a, b (c has no update, its Fisher is ignored) -> b; entry 1: agree -> sum
    assert resolve_conflicts([a, b, c], s).tolist() == [-1.0, 6.0]


def test_sar_private_region_and_low_half():
    a = torch.tensor([1e-6, 0.5, 0.0, 0.2, 0.1, 0.4, 0.3])
    b = torch.tensor([0.0, 0.5, 0.3, 0.0, 0.0, 0.0, 0.0])
    private = private_region([a, b], 1e-5)
    assert private.tolist() == [False, False, True, True, True, True, True]
    resolved = a + b
    # private magnitudes 0.3, 0.2, 0.1, 0.4, 0.3 -> the floor(5/2) = 2 smallest: 0.1, 0.2
    assert low_private(resolved, private).tolist() == [False, False, False, True, True, False, False]


def test_sar_low_half_is_exactly_half_by_rank_with_ties():
    # ties at the median: the floor(n/2) smallest, ties by flat position
    resolved = torch.tensor([[0.3, 0.3, 0.3], [0.3, 0.1, 0.3]])
    private = torch.ones(2, 3, dtype=torch.bool)
    assert low_private(resolved, private).tolist() == [[True, True, False], [False, True, False]]
    # brute force on deltas of 1-3 ulps (few distinct magnitudes, as bf16 updates)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        mags = torch.randint(1, 4, (7, 9), generator=g).float() * 2.0 ** -20
        signs = torch.where(torch.rand(7, 9, generator=g) < 0.5, -1.0, 1.0)
        private = torch.rand(7, 9, generator=g) < 0.7
        flat, where = (mags * signs).reshape(-1), private.reshape(-1).nonzero().squeeze(1).tolist()
        expected = sorted(where, key=lambda i: (abs(float(flat[i])), i))[: len(where) // 2]
        got = low_private(mags * signs, private).reshape(-1).nonzero().squeeze(1).tolist()
        assert got == sorted(expected)
    assert not low_private(resolved, torch.zeros(2, 3, dtype=torch.bool)).any()


def test_sar_dropout_rate_scale_and_reproducibility():
    g = torch.Generator().manual_seed(1)
    base = torch.zeros(200_000)
    a = torch.randn(200_000, generator=g) * (torch.rand(200_000, generator=g) < 0.5)
    b = torch.randn(200_000, generator=g) * (torch.rand(200_000, generator=g) < 0.5)
    p = 0.2
    plain = sar_vector(base, [a, b], [None, None], drop_rate=0.0, name="w")
    out = sar_vector(base, [a, b], [None, None], drop_rate=p, seed=3, name="w")
    again = sar_vector(base, [a, b], [None, None], drop_rate=p, seed=3, name="w")
    assert torch.equal(out, again)
    low = low_private(plain, private_region([a, b], 1e-5))
    assert torch.equal(out[~low], plain[~low])  # nothing outside the low private half changes
    dropped = out[low] == 0
    assert abs(float(dropped.float().mean()) - p) < 0.01
    torch.testing.assert_close(out[low][~dropped], plain[low][~dropped] / (1 - p))
    unscaled = sar_vector(base, [a, b], [None, None], drop_rate=p, seed=3, name="w", rescale=False)
    assert torch.equal(unscaled == 0, out == 0)  # the same entries dropped; survivors not divided
    assert torch.equal(unscaled[low][~dropped], plain[low][~dropped])
    other = sar_vector(base, [a, b], [None, None], drop_rate=p, seed=3, name="other")
    assert not torch.equal(out, other)  # the seed is per tensor
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(MergeInputError, match="drop_rate"):
            check_drop_rate(bad)


def test_reasoning_interp_vector():
    m = torch.tensor([1.0, 2.0])
    s = torch.tensor([3.0, 0.0])
    out = combine(m, [interp_vector(m, s)], [0.25])
    torch.testing.assert_close(out, 0.75 * m + 0.25 * s)
    for bad in (-0.01, 1.01):
        with pytest.raises(MergeInputError, match="alpha"):
            check_alpha(bad)


def test_task_vector_is_float32():
    assert task_vector(torch.ones(2, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.bfloat16)).dtype == torch.float32
    assert gamma_from_norms(0.0, 0.0) == 0.0


@pytest.mark.parametrize("case", ["plain", "half_zeros", "ties", "tiny"])
def test_radix_threshold_equals_kthvalue(case):
    from mergekit_rlvr.methods.dots import kth_smallest

    g = torch.Generator().manual_seed(3)
    x = torch.randn(200_003, generator=g).abs()
    if case == "half_zeros":
        x[:100_000] = 0
    elif case == "ties":
        x = torch.round(x * 4) / 4
    elif case == "tiny":
        x = x * 1e-30
    for rank in (1, 17, 66_667, 100_001, 199_999, 200_003):
        assert float(kth_smallest(x, rank)) == float(torch.kthvalue(x, rank).values)


def test_masked_and_sparse_layouts_combine_bit_for_bit():
    from mergekit_rlvr.methods.dots import dots_masked_vector

    g = torch.Generator().manual_seed(4)
    base = torch.randn(300, 70, generator=g).to(torch.bfloat16)
    model = (base.float() + torch.randn(300, 70, generator=g) * 0.01).to(torch.bfloat16)
    masked = dots_masked_vector(base, model, 0.3, "tensor")
    sparse = dots_vector(base, model, 0.3, "tensor")
    assert torch.equal(masked.compact().values, sparse.values)
    for c in (0.0, 0.79, -1.3):
        a, b = combine(base, [masked], [c]), combine(base, [sparse], [c])
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_global_sparsify_threshold_is_the_exact_kth_over_all_tensors(dtype):
    from mergekit_rlvr.methods.dots_global import dots_global_stats

    g = torch.Generator().manual_seed(0)
    base = {f"t{i}": torch.zeros(shape, dtype=dtype) for i, shape in enumerate([(40, 30), (7,), (300, 5), (1,)])}
    # few distinct magnitudes (ties), both signs, and one model with a wide range
    models = [{k: (torch.randint(-3, 4, v.shape, generator=g) * 2.0 ** -12).to(dtype) for k, v in base.items()},
              {k: (torch.randn(v.shape, generator=g) * 10 ** torch.randint(-6, 2, v.shape, generator=g)).to(dtype)
               for k, v in base.items()}]
    triples = [(k, base[k], [m[k] for m in models]) for k in base]
    for densities in ([0.3, 0.3], [0.05, 0.999], [1.0, 1e-6]):
        stats = dots_global_stats(triples, densities)
        for i, (model, density) in enumerate(zip(models, densities)):
            flat = torch.cat([model[k].reshape(-1) for k in base]).double()
            k = int(density * flat.numel())
            expected = math.inf if k == 0 else float(flat.abs().sort(descending=True).values[k - 1])
            expected = -math.inf if k >= flat.numel() else expected  # keep all, as per tensor
            assert stats.global_thresholds[i] == expected
            kept = flat[flat.abs() >= expected]
            assert stats.full_sq[i] == pytest.approx(float((flat ** 2).sum()), rel=1e-12)
            assert stats.kept_sq[i] == pytest.approx(float((kept ** 2).sum()), rel=1e-12)
            assert all(stats.threshold(i, name) == expected for name in base)
