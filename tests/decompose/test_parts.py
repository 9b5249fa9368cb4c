"""A tensor-parallel rank reads only its box of each checkpoint tensor
(vllm_plugins.parts, mergekit_compat.read_tensor): inside the box the base and the
stored vectors equal those of whole-tensor reads bit for bit, for every method; the
methods whose vectors are elementwise given the pre-pass read about the box's share,
the others (sar, dots with per-tensor rescale) read whole tensors. No engine."""

from __future__ import annotations

import pytest
import torch

from support.recipes import dots, table


def _boxes(d, kind: str):
    """Per tensor: rows [0, n/2) ('rows', a column-parallel shard) or columns [n/2, n)
    ('cols', row-parallel) of 2-D tensors; 1-D tensors whole."""
    out = {}
    for task in d.tasks:
        shape, _ = d.base_info(task)
        if len(shape) != 2:
            out[task.name] = None
        elif kind == "rows":
            out[task.name] = (slice(0, shape[0] // 2), slice(0, shape[1]))
        else:
            out[task.name] = (slice(0, shape[0]), slice(shape[1] // 2, shape[1]))
    return out


def _fields(vector):
    from mergekit_rlvr.methods.common import RecomputedVector

    if isinstance(vector, RecomputedVector):
        return [vector.model, vector.mask, vector.scale]
    return [vector]


def _check_inside(part, whole, box):
    if part is None or isinstance(part, float):
        assert part == whole
        return
    assert part.shape == whole.shape and part.dtype == whole.dtype
    assert torch.equal(part[box], whole[box])


CASES = [(m, k) for m in ("dots", "dots_global", "sar", "reasoning_interp", "task_arithmetic") for k in ("rows", "cols")]


@pytest.mark.parametrize("method,kind", CASES)
def test_box_reads_equal_whole_reads_inside_the_box(tiny_family, method, kind):
    from mergekit_rlvr.decompose import decompose

    from vllm_plugins.parts import Parts

    whole = decompose(table(tiny_family)[method])
    d = decompose(table(tiny_family)[method])
    d.adopt(whole.prepared_state()) if whole.prepared_state() is not None else None
    boxes = _boxes(d, kind)
    parts = Parts(boxes, {t.name: d.base_info(t) for t in d.tasks})
    for task in d.tasks:
        box = boxes[task.name] or (slice(None),)
        base, vectors = parts.sources(d, task)
        full_base, full_vectors = whole.sources(task)
        _check_inside(base, full_base, box)
        assert len(vectors) == len(full_vectors)
        for v, w in zip(vectors, full_vectors):
            for a, b in zip(_fields(v), _fields(w)):
                _check_inside(a, b, box)
    read, full = d.read_bytes
    for task in d.tasks:  # the raw base, as the base check and the reload path read it
        box = boxes[task.name] or (slice(None),)
        assert torch.equal(parts.base(d, task)[box], whole.base_tensor(task)[box])
    if method == "sar":  # a per-tensor rank: whole tensors
        assert read == full
    else:  # about half of the 2-D tensors' bytes, all of the 1-D ones
        assert 0.4 * full < read < 0.6 * full, (read, full)


def test_dots_with_per_tensor_rescale_reads_whole_tensors(tiny_family):
    from mergekit_rlvr.decompose import decompose

    from vllm_plugins.parts import Parts

    d = decompose(dots(tiny_family, (0.7, 1.3), (0.3, 0.5), parameters={"rescale": "tensor"}))
    boxes = _boxes(d, "rows")
    parts = Parts(boxes, {t.name: d.base_info(t) for t in d.tasks})
    whole = decompose(dots(tiny_family, (0.7, 1.3), (0.3, 0.5), parameters={"rescale": "tensor"}))
    for task in d.tasks:
        _, vectors = parts.sources(d, task)
        _, full_vectors = whole.sources(task)
        for v, w in zip(vectors, full_vectors):
            assert torch.equal(v.mask, w.mask) and v.scale == w.scale  # the whole tensor's quantile and norms
    assert d.read_bytes[0] == d.read_bytes[1]


def test_read_box_of_a_layout():
    """The smallest box holding a rank's copies: rows of a column-parallel shard,
    columns of a row-parallel one, None for a replicated tensor."""
    from vllm_plugins.layout import Copy, Layout, ParamLayout, read_box

    def layout(src):
        return Layout({"p": ParamLayout("p", (2, 3), [Copy("w", ((2, 3), (3, 1), 0), src)])})

    assert read_box(layout(((2, 3), (3, 1), 6)), "w", (4, 3)) == (slice(2, 4), slice(0, 3))  # rows 2-3
    assert read_box(layout(((2, 3), (6, 1), 3)), "w", (2, 6)) == (slice(0, 2), slice(3, 6))  # columns 3-5
    assert read_box(layout(((2, 3), (3, 1), 0)), "w", (2, 3)) is None  # all of it
    assert read_box(Layout({}, error="failed"), "w", (2, 3)) is None
