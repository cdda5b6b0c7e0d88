"""Snowflake ids: unique, increasing, and safe when the clock steps back."""

from __future__ import annotations

import pytest

from livecomments.model.ids import (
    EPOCH_MS,
    MAX_INSTANCE,
    SnowflakeGenerator,
    instance_of,
    timestamp_ms,
)


class FakeClock:
    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


def test_layout_carries_time_and_instance():
    clock = FakeClock(EPOCH_MS + 123_456)
    gen = SnowflakeGenerator(7, clock)
    first = gen.next_id()
    assert timestamp_ms(first) == EPOCH_MS + 123_456
    assert instance_of(first) == 7
    assert first < 2**63


def test_ids_increase_within_one_millisecond_and_roll_over():
    gen = SnowflakeGenerator(1, FakeClock(EPOCH_MS + 1000))
    ids = [gen.next_id() for _ in range(5000)]  # more than 4096 in one ms
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert timestamp_ms(ids[-1]) == EPOCH_MS + 1001  # borrowed the next millisecond


def test_clock_stepping_back_never_reissues_or_decreases():
    clock = FakeClock(EPOCH_MS + 10_000)
    gen = SnowflakeGenerator(3, clock)
    before = [gen.next_id() for _ in range(10)]
    clock.now_ms -= 5_000  # NTP step backwards
    after = [gen.next_id() for _ in range(10)]
    assert after[0] > before[-1]
    assert before + after == sorted(set(before + after))


def test_seed_moves_past_ids_issued_before_a_restart():
    clock = FakeClock(EPOCH_MS + 50_000)
    first_run = SnowflakeGenerator(2, clock)
    last = [first_run.next_id() for _ in range(3)][-1]
    clock.now_ms -= 10_000  # the restarted process sees an earlier clock
    second_run = SnowflakeGenerator(2, clock)
    second_run.seed(last)
    assert second_run.next_id() > last


def test_instances_never_collide_on_the_same_millisecond():
    clock = FakeClock(EPOCH_MS + 7)
    a, b = SnowflakeGenerator(0, clock), SnowflakeGenerator(MAX_INSTANCE, clock)
    ids_a = {a.next_id() for _ in range(100)}
    ids_b = {b.next_id() for _ in range(100)}
    assert not ids_a & ids_b


@pytest.mark.parametrize("bad", [-1, MAX_INSTANCE + 1])
def test_instance_id_out_of_range_is_refused(bad: int):
    with pytest.raises(ValueError, match="instance_id"):
        SnowflakeGenerator(bad)
