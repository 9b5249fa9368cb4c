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


def test_work_device_takes_the_accelerator_only_where_the_working_set_fits():
    """Known answers for parts.work_device: the host for a CPU engine whatever it has
    free; the accelerator exactly when entries * (12 + 16 * vectors) bytes + the margin
    fit in its free memory, and the host one byte short."""
    from vllm_plugins.parts import WORK_MARGIN, work_device

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 1)
    need = 1000 * (12 + 16 * 2) + WORK_MARGIN
    assert work_device(cpu, 1000, 2, lambda d: 1 << 60) is None
    assert work_device(None, 1000, 2, lambda d: 1 << 60) is None
    asked = []
    assert work_device(gpu, 1000, 2, lambda d: asked.append(d) or need) == gpu
    assert asked == [gpu]
    assert work_device(gpu, 1000, 2, lambda d: need - 1) is None


def test_parts_size_a_checkpoint_tensor_by_the_largest_parameter_it_fills():
    """A checkpoint tensor that fills a fused parameter (q of qkv) is sized by the
    parameter, which the build holds whole while it fills it."""
    from vllm_plugins.layout import Copy, Layout, ParamLayout
    from vllm_plugins.parts import Parts

    view = ((4, 8), (8, 1), 0)
    layout = Layout({"qkv": ParamLayout("qkv", (12, 8), [Copy("q", view, view), Copy("k", ((4, 8), (8, 1), 32), view),
                                                         Copy("v", ((4, 8), (8, 1), 64), view)]),
                     "o": ParamLayout("o", (8, 8), [Copy("o", ((8, 8), (8, 1), 0), ((8, 8), (8, 1), 0))])})
    infos = {name: ((4, 8), torch.float32) for name in "qkv"}
    infos["o"] = ((8, 8), torch.float32)
    parts = Parts.of(layout, infos)
    assert parts.entries == {"q": 96, "k": 96, "v": 96, "o": 64}
    assert parts.device is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("method", ["dots", "task_arithmetic", "reasoning_interp", "sar"])
def test_vectors_computed_on_the_device_pack_as_on_the_host(tiny_family, method):
    """An elementwise method's vectors computed on the engine's device (sources_part
    with a device), packed there, equal the host's bit for bit; sar (not elementwise)
    is computed on the host whatever device is asked."""
    from mergekit_rlvr.decompose import decompose
    from vllm_plugins import packed

    d = decompose(table(tiny_family)[method])
    cuda = torch.device("cuda")
    for task in d.tasks:
        base, vectors, _ = d.sources_part(task, None)
        base2, vectors2, _ = d.sources_part(task, None, cuda)
        assert base2.device.type == ("cpu" if method == "sar" else "cuda")
        host, device = packed.pack(base, vectors), packed.pack(base2, vectors2).to("cpu")
        assert host.nbytes == device.nbytes
        assert packed.same_bits(host.base, device.base)
        for a, b in zip(host.vectors, device.vectors):
            assert packed.same_bits(a.values, b.values) and a.scale == b.scale
            assert (a.bits is None) == (b.bits is None) and (a.bits is None or torch.equal(a.bits, b.bits))
