"""The one retry policy: exponential backoff with jitter between half and all of the ceiling."""

from __future__ import annotations

import pytest

from orthanc_kheops.kheops.backoff import next_delay


def _never_random() -> float:
    return 0.0


def _always_top() -> float:
    return 1.0


# attempt, shortest delay (rand 0), longest delay (rand 1); initial 2 s, maximum 300 s
TABLE = [
    (1, 1.0, 2.0),
    (2, 2.0, 4.0),
    (3, 4.0, 8.0),
    (4, 8.0, 16.0),
    (5, 16.0, 32.0),
    (6, 32.0, 64.0),
    (7, 64.0, 128.0),
    (8, 128.0, 256.0),
    (9, 150.0, 300.0),
    (10, 150.0, 300.0),
    (100, 150.0, 300.0),
    (10_000, 150.0, 300.0),
]


@pytest.mark.parametrize(("attempt", "shortest", "longest"), TABLE)
def test_delay_doubles_per_attempt_up_to_the_maximum(
    attempt: int, shortest: float, longest: float
) -> None:
    assert next_delay(attempt, initial=2, maximum=300, rand=_never_random) == shortest
    assert next_delay(attempt, initial=2, maximum=300, rand=_always_top) == longest


@pytest.mark.parametrize("rand_value", [0.0, 0.25, 0.5, 0.999])
def test_jitter_keeps_the_delay_between_half_and_all_of_the_ceiling(rand_value: float) -> None:
    delay = next_delay(3, initial=1, maximum=60, rand=lambda: rand_value)

    assert delay == 2.0 + rand_value * 2.0


def test_maximum_below_initial_caps_the_first_delay_too() -> None:
    assert next_delay(1, initial=10, maximum=4, rand=_always_top) == 4.0


def test_default_jitter_stays_within_the_bounds() -> None:
    delays = {next_delay(4, initial=2, maximum=300) for _ in range(200)}

    assert all(8.0 <= d <= 16.0 for d in delays)
    assert len(delays) > 1


@pytest.mark.parametrize("attempt", [0, -1])
def test_attempts_are_counted_from_one(attempt: int) -> None:
    with pytest.raises(ValueError, match=f"attempt must be 1 or more, not {attempt}"):
        next_delay(attempt, initial=2, maximum=300)
