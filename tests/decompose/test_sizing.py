"""The hot swap's driver sizes the swap in the pre-pass's own read where the method's
pre-pass is incremental (``swap_accumulator``): the same bytes per rank as sizing by a
second read of every tensor (``plan.swap_bytes`` on a prepared decomposition), and no
tensor read again for it. No engine."""

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
    assert {k: got[k] for k in ("per_rank", "total", "weights")} == \
        {k: expected[k] for k in ("per_rank", "total", "weights")}
    if case in ONE_READ:
        assert got["sized_in_prepass"] == len(fused.tasks)
        # besides the pre-pass's stream, only the first tensor's group (its parameters) was read
        shape, dtype = fused.base_info(fused.tasks[0])
        assert fused.read_bytes[1] == (1 + len(fused.models)) * _numel(shape) * dtype.itemsize
    else:  # dots' global quantile: the whole model first, then a second read
        assert got["sized_in_prepass"] == 0
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
