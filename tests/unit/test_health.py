"""The forwarder's health: a hint that KHEOPS is back brings the next probe forward."""

from __future__ import annotations

import threading

from orthanc_kheops.forwarding.health import Health, State, Turn

T0 = 1_000_000.0


def test_a_hint_that_kheops_is_back_makes_the_next_probe_go_now() -> None:
    health = Health(now=T0, probe_maximum=30.0)
    for _ in range(6):  # a long outage: the next probe is far away
        health.record_unavailable("503", T0)
    stopping = threading.Event()
    deadline = threading.Timer(5.0, stopping.set)  # without the hint: no turn, then None
    deadline.start()

    health.probe_now()

    try:
        assert health.wait_for_turn(lambda: T0, stopping) is Turn.PROBE
    finally:
        deadline.cancel()


def test_the_hint_changes_nothing_while_sending_is_paused_for_the_token() -> None:
    health = Health(now=T0, probe_maximum=30.0)
    health.record_refused("401", T0)

    health.probe_now()

    assert health.state is State.PAUSED
