"""analyze's histogram counting (histograms.count_into / Counting) against torch.bincount:
in one thread, in parallel threads, and with small histograms split into pieces."""

from __future__ import annotations

import pytest
import torch

from mergekit_rlvr.analysis.histograms import Counting, count_into


def keys(seed: int, n: int, bins: int) -> torch.Tensor:
    return torch.randint(0, bins, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)


def test_count_into_adds_a_histogram():
    counts = torch.tensor([5, 0, 0, 1], dtype=torch.int64)
    count_into(counts, torch.tensor([[3, 1], [3, 3]], dtype=torch.int32))
    assert counts.tolist() == [5, 1, 0, 4]


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_counting_equals_bincount(threads):
    small, large = keys(0, 10_001, 7), keys(1, 20_003, Counting.SPLIT_UP_TO + 3)  # large: never split
    jobs = [(torch.ones(7, dtype=torch.int64), small),
            (torch.zeros(Counting.SPLIT_UP_TO + 3, dtype=torch.int64), large)]
    count = Counting("cpu", threads)
    try:
        count(jobs)
        count(jobs[:1])  # one job, split in `threads` pieces
    finally:
        count.close()
    assert torch.equal(jobs[0][0], 1 + 2 * torch.bincount(small, minlength=7))
    assert torch.equal(jobs[1][0], torch.bincount(large, minlength=Counting.SPLIT_UP_TO + 3))
