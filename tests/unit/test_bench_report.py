"""The ingest verdict compares each contender with plain Orthanc within each round."""

from __future__ import annotations

import pytest

from bench.report import round_ratios


def test_a_slow_round_for_both_contenders_does_not_move_the_ratio() -> None:
    plain = [10.0, 10.0, 20.0, 10.0, 10.0]
    live = [11.0, 11.0, 22.0, 11.0, 11.0]

    ratios = round_ratios(plain, live)

    assert ratios.median == pytest.approx(10 / 11)
    assert ratios.extremes == pytest.approx((10 / 11, 10 / 11))


def test_each_round_compares_the_contenders_that_ran_in_it() -> None:
    # Round 3 was slow for both; in round 2, only the Orthanc with the plugin was.
    plain = [10.0, 10.0, 20.0]
    live = [11.0, 22.0, 22.0]

    ratios = round_ratios(plain, live)

    assert ratios.median == pytest.approx(10 / 11)  # the medians of the times: 10 / 22


def test_the_spread_is_the_middle_half_and_the_extremes_of_the_rounds_ratios() -> None:
    plain = [10.0] * 5
    live = [8.0, 9.0, 10.0, 11.0, 12.5]

    ratios = round_ratios(plain, live)

    assert ratios.rounds == 5
    assert ratios.median == pytest.approx(1.0)
    assert ratios.quartiles == pytest.approx((10 / 11, 10 / 9))
    assert ratios.extremes == pytest.approx((0.8, 1.25))


def test_one_round_is_its_own_spread() -> None:
    ratios = round_ratios([10.0], [12.5])

    assert ratios.median == ratios.quartiles[0] == ratios.quartiles[1] == pytest.approx(0.8)


def test_rounds_that_do_not_pair_are_refused() -> None:
    with pytest.raises(ValueError):
        round_ratios([10.0, 10.0], [10.0])
