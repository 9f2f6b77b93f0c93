import math

import pytest

from bigscience_train.data.sampling import micro_batch_indices
from bigscience_train.schedules import BatchSizeSchedule, LRSchedule, total_train_samples


def test_bloom_rampup_arithmetic():
    # BLOOM-176B: --rampup-batch-size 192 16 9_765_625 with a global batch of 2048.
    s = BatchSizeSchedule.from_config(2048, [192, 16, 9_765_625])
    per_increment = 9_765_625 / ((2048 - 192) // 16)
    assert s.at(0) == 192
    assert s.at(int(per_increment)) == 192
    assert s.at(int(per_increment) + 1) == 208
    assert s.at(int(5 * per_increment) + 1) == 192 + 5 * 16
    assert s.at(9_765_625) == 2048
    assert s.at(10**12) == 2048


def test_no_rampup_is_constant():
    s = BatchSizeSchedule.from_config(512, [])
    assert {s.at(c) for c in (0, 1, 10**9)} == {512}


def test_rampup_never_decreases_and_every_size_is_a_multiple_of_the_increment():
    s = BatchSizeSchedule.from_config(64, [8, 8, 1000])
    sizes = [s.at(c) for c in range(0, 1200, 7)]
    assert sizes == sorted(sizes) and sizes[0] == 8 and sizes[-1] == 64
    assert all(b % 8 == 0 for b in sizes)


def test_lr_warmup_then_cosine_to_floor():
    s = LRSchedule(max_lr=1.0, min_lr=0.1, warmup=100, decay=1100, style="cosine")
    assert s.at(0) == 0.0
    assert s.at(50) == pytest.approx(0.5)
    assert s.at(100) == pytest.approx(1.0)
    assert s.at(600) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s.at(1100) == pytest.approx(0.1)
    assert s.at(5000) == pytest.approx(0.1)
    values = [s.at(x) for x in range(100, 1101, 10)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_lr_linear_and_constant():
    lin = LRSchedule(max_lr=2.0, min_lr=0.0, warmup=0, decay=100, style="linear")
    assert [lin.at(x) for x in (0, 25, 50, 100, 200)] == pytest.approx([2.0, 1.5, 1.0, 0.0, 0.0])
    const = LRSchedule(max_lr=2.0, min_lr=0.0, warmup=10, decay=100, style="constant")
    assert [const.at(x) for x in (5, 10, 1000)] == pytest.approx([1.0, 2.0, 2.0])


def test_cosine_midpoint_formula():
    s = LRSchedule(max_lr=3e-4, min_lr=3e-5, warmup=0, decay=1000)
    ratio = 0.3
    assert s.at(300) == pytest.approx(3e-5 + 0.5 * (math.cos(math.pi * ratio) + 1) * (3e-4 - 3e-5))


def test_total_samples_with_rampup_and_token_limit():
    s = BatchSizeSchedule.from_config(16, [8, 8, 80])
    consumed, expected = 0, 0
    for _ in range(20):
        expected += s.at(consumed)
        consumed += s.at(consumed)
    assert total_train_samples(20, None, 64, s) == expected
    assert total_train_samples(None, 64 * 100, 64, s) == 100
    assert total_train_samples(1000, 64 * 100, 64, s) >= 100


def test_micro_batches_partition_the_global_batch_across_dp():
    single = micro_batch_indices(32, 8, 2, 0, 1)
    assert single == [[32, 33], [34, 35], [36, 37], [38, 39]]
    r0 = micro_batch_indices(32, 8, 2, 0, 2)
    r1 = micro_batch_indices(32, 8, 2, 1, 2)
    assert r0 == [[32, 33], [36, 37]] and r1 == [[34, 35], [38, 39]]
    assert sorted(sum(r0 + r1, [])) == sum(single, [])
    with pytest.raises(ValueError, match="not divisible"):
        micro_batch_indices(0, 6, 4, 0, 1)
