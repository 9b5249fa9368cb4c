"""The hot swap's driver sizes the swap in the pre-pass's own read (``swap_accumulator``):
the same bytes per rank as sizing by a second read of every tensor (``plan.swap_bytes``
on a prepared decomposition), and no tensor read again for it. Dots with ``sparsify:
global`` sizes in its radix select's last pass: exactly where a tensor has no entry in
the last 16 bits' range, else as an upper bound (checked against the exact bytes, and
that bound against packing every support within it). No engine."""

from __future__ import annotations

import pytest

from support.recipes import dots, table

ONE_READ = ("dots", "sar", "reasoning_interp", "task_arithmetic", "dots_rescale_tensor", "dots_rescale_none")


def _recipes(family):
    out = table(family)
    out["dots_rescale_tensor"] = dots(family, (0.7, 1.3), (0.3, 0.5), parameters={"rescale": "tensor"})
    out["dots_rescale_none"] = dots(family, (0.7, 1.3), (0.3, 0.5), parameters={"rescale": "none"})
    return out


@pytest.mark.parametrize("case", ["dots", "dots_global", "sar", "reasoning_interp", "task_arithmetic",
                                  "dots_rescale_tensor", "dots_rescale_none"])
def test_sizing_in_the_prepass_equals_sizing_by_a_second_read(tiny_family, case):
    from mergekit_rlvr.decompose import decompose

    from vllm_plugins.plan import swap_bytes

    recipe = _recipes(tiny_family)[case]
    separate = decompose(recipe)
    separate.prepare()
    expected = swap_bytes(separate, tensor_parallel_size=2)
    assert expected["sized_in_prepass"] == 0
    fused = decompose(recipe)
    got = swap_bytes(fused, tensor_parallel_size=2)
    assert got["sized_in_prepass"] == len(fused.tasks)
    # besides the pre-pass's stream, only the first tensor's group (its parameters) was read
    shape, dtype = fused.base_info(fused.tasks[0])
    assert fused.read_bytes[1] == (1 + len(fused.models)) * _numel(shape) * dtype.itemsize
    if case in ONE_READ:
        assert got["bounded"] == 0
        assert {k: got[k] for k in ("per_rank", "total", "weights")} == \
            {k: expected[k] for k in ("per_rank", "total", "weights")}
    else:  # dots' global quantile: sized in its radix select's last pass, some tensors as a bound
        assert 0 < got["bounded"] < len(fused.tasks)
        assert got["weights"] == expected["weights"]
        for key in ("per_rank", "total"):
            assert expected[key] <= got[key] <= 1.01 * expected[key]
    # the context is the method's own: the vectors it serves are the separately prepared ones
    task = fused.tasks[-1]
    base, vectors = fused.sources(task)
    base2, vectors2 = separate.sources(task)
    assert [type(v) for v in vectors] == [type(v) for v in vectors2]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def test_the_bound_holds_for_every_support_within():
    """``packed_nbytes(..., bound=True)`` is at least the packed bytes of smaller
    supports: random subsets of each vector's support, including the cases where the
    larger packing needs no bitmask (all touched, a support equal to the touched entries)."""
    import torch

    from mergekit_rlvr.methods.common import RecomputedVector
    from vllm_plugins import packed
    from vllm_plugins.plan import packed_nbytes

    torch.manual_seed(0)
    base = torch.randn(4096).to(torch.bfloat16).float()
    models = [base + torch.randn(4096).to(torch.bfloat16).float() for _ in range(2)]
    for density in (1.0, 0.6):
        masks = [torch.rand(4096) < density for _ in models]
        wide = [RecomputedVector(m, k, 1.5) for m, k in zip(models, masks)]
        bound = packed_nbytes(base, wide, bound=True)
        assert bound >= packed.pack(base, wide).nbytes
        for keep in (1.0, 0.999, 0.5):
            sub = [k & (torch.rand(4096) < keep) for k in masks]
            assert packed.pack(base, [RecomputedVector(m, k, 1.5) for m, k in zip(models, sub)]).nbytes <= bound
        if density == 1.0:  # all touched, every support whole: the bound adds every bitmask
            assert bound > packed.pack(base, wide).nbytes


@pytest.mark.parametrize("case", ["dots", "dots_global", "sar", "reasoning_interp", "task_arithmetic"])
def test_packed_nbytes_is_the_packings_bytes(tiny_family, case):
    """What the driver sizes with (plan.packed_nbytes: counts, no packing) equals
    packed.pack(...).nbytes on every tensor of every method."""
    from mergekit_rlvr.decompose import decompose
    from vllm_plugins import packed
    from vllm_plugins.plan import packed_nbytes

    d = decompose(table(tiny_family)[case])
    for task in d.tasks:
        base, vectors = d.sources(task)
        assert packed_nbytes(base, vectors) == packed.pack(base, vectors).nbytes, task.name


def test_packed_nbytes_on_the_edges():
    """The same on hand-made cases: every entry touched, a vector whose support is all
    the touched entries, no change at all, signed zeros in the base, float64 values that
    need float32 or themselves, float32 values that need float16 or themselves."""
    import torch

    from mergekit_rlvr.methods.common import MaskedVector, RecomputedVector
    from vllm_plugins import packed
    from vllm_plugins.plan import packed_nbytes

    g = torch.Generator().manual_seed(3)
    base = torch.randn(5000, generator=g).to(torch.bfloat16).float()
    base[:7] = -0.0
    model = base + torch.randn(5000, generator=g).to(torch.bfloat16).float()
    half = (torch.randn(5000, generator=g) * 0.01).to(torch.float16).float()
    mask = torch.rand(5000, generator=g) < 0.4
    cases = [
        [RecomputedVector(model, None, 1.5)],  # all touched
        [RecomputedVector(model, mask, 1.5), RecomputedVector(model, mask, None)],  # support == touched
        [RecomputedVector(base.clone(), mask, 2.0)],  # nothing changes
        [torch.zeros(5000), MaskedVector(mask, half)],  # zeros kept only at -0.0 bases; float16 values
        [MaskedVector(mask, torch.randn(5000, generator=g))],  # float32 values
    ]
    for vectors in cases:
        assert packed_nbytes(base, vectors) == packed.pack(base, vectors).nbytes
    wide = base.double()
    for values in (torch.randn(5000, generator=g).double(), torch.randn(5000, generator=g).float().double()):
        vectors = [MaskedVector(mask, values)]
        assert packed_nbytes(wide, vectors) == packed.pack(wide, vectors).nbytes
