"""Sharing after an outage of any length: it resumes within seconds, and logs the outage once."""

from __future__ import annotations

import logging

import pytest

from orthanc_kheops.forwarding.health import PROBE_MAXIMUM
from orthanc_kheops.kheops.client import KheopsUnavailable
from orthanc_kheops.state.rule_store import ShareCounts
from tests.unit import test_sharing as sharing
from tests.unit.test_sharing import T0, _instance, _World

world = sharing.world


def test_after_a_long_outage_shares_resume_within_one_probe_interval(
    world: _World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="orthanc_kheops.switching.sharing")
    world.add_rule("all")
    world.sharer.after_store([_instance("a")])
    world.kheops.answers = [KheopsUnavailable("share: KHEOPS answered 503")] * 30

    for _ in range(30):  # long enough for any backoff to reach RetryMaximumSeconds (300 s)
        world.sharer.step()
        world.clock.now += PROBE_MAXIMUM
    world.sharer.step()  # KHEOPS answers again

    assert world.counts("all") == ShareCounts(shared=1)
    assert len(world.kheops.shares) == 31
    assert world.clock.now == T0 + 30 * PROBE_MAXIMUM
    messages = [r.getMessage() for r in caplog.records]
    assert sum("sharing waits: KHEOPS is unavailable" in m for m in messages) == 1
    assert sum("KHEOPS answers again" in m for m in messages) == 1
