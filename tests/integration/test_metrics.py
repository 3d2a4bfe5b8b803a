"""The plugin's metrics in /tools/metrics-prometheus, next to Orthanc's, moving as it works."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import requests

from tests.corpus import new_uid
from tests.orthanc_process import OrthancFactory, OrthancProcess
from tests.plugin_setup import Album, single_instance, write_corpus
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

CT = "tagValueIsPresent(#Tag.Modality, 'CT')"


def scrape(orthanc: OrthancProcess) -> dict[str, float]:
    """/tools/metrics-prometheus as {name with labels: value}; lines are `name value time`."""
    response = orthanc.get("/tools/metrics-prometheus")
    response.raise_for_status()
    metrics: dict[str, float] = {}
    for line in response.text.splitlines():
        if line.strip():
            name, value, _timestamp = line.rsplit(" ", 2)
            metrics[name] = float(value)
    return metrics


def await_metrics(orthanc: OrthancProcess, expected: dict[str, float]) -> dict[str, float]:
    """The metrics once each name in `expected` has its value (they are set every 5 s)."""

    def reached() -> dict[str, float]:
        metrics = scrape(orthanc)
        return metrics if all(metrics.get(k) == v for k, v in expected.items()) else {}

    return wait_until(reached, timeout=60, message=f"metrics {expected}")


def test_the_metrics_sit_next_to_orthancs_and_count_what_is_sent(
    orthanc_factory: OrthancFactory, album: Album, tmp_path: Path
) -> None:
    orthanc = orthanc_factory(kheops=album.section())
    before = await_metrics(
        orthanc, {'kheops_state{state="sending"}': 1, "kheops_token_accepted": 1}
    )
    assert "orthanc_count_instances" in before
    assert before["kheops_instances_sent_total"] == 0

    files = write_corpus(tmp_path / "corpus", studies=1, series=2, instances=3)
    orthanc.storescu([f.path for f in files])
    wait_until(lambda: album.holds([f.sop_uid for f in files]), message="corpus sent")

    after = await_metrics(
        orthanc,
        {
            "kheops_instances_sent_total": len(files),
            'kheops_queue_instances{state="pending"}': 0,
            'kheops_queue_instances{state="inflight"}': 0,
            'kheops_queue_instances{state="failed"}': 0,
        },
    )
    requests_ok = after['kheops_stow_requests_total{code="200"}']
    assert requests_ok >= 1
    assert after["kheops_stow_request_duration_seconds_count"] >= requests_ok
    assert after["kheops_stow_request_duration_seconds_sum"] > 0
    sizes = sum(f.path.stat().st_size for f in files)
    assert after["kheops_stow_sent_bytes_total"] >= sizes * 0.9  # Orthanc may rewrite headers
    assert after["kheops_last_send_age_seconds"] < 60


def test_failures_retries_refusals_and_shares_move_their_metrics(
    orthanc_factory: OrthancFactory, album: Album
) -> None:
    orthanc = orthanc_factory(kheops=album.section())
    destination_album = album.server.add_album()
    destination = album.server.add_token(album_id=destination_album, scope=("write",))
    rule = {"Name": "ct-research", "DestinationToken": destination, "Condition": CT}
    assert orthanc.post("/kheops/rules", json=rule).status_code == 201

    # A series another album holds: failed with 292.
    held_study, held_series = new_uid(), new_uid()
    _, first = single_instance(study_uid=held_study, series_uid=held_series)
    album.take_series(first)
    orthanc.upload(single_instance(study_uid=held_study, series_uid=held_series)[1])
    # A CT series the rule shares.
    sop_uid, data = single_instance()
    orthanc.upload(data)
    wait_until(lambda: album.holds([sop_uid]), message="CT instance sent")

    metrics = await_metrics(
        orthanc,
        {
            "kheops_instances_failed_total": 1,
            'kheops_queue_instances{state="failed"}': 1,
            'kheops_rule_shares{rule="ct-research",state="shared"}': 1,
        },
    )
    assert metrics['kheops_rule_failing{rule="ct-research"}'] == 0
    assert metrics['kheops_rule_shares{rule="ct-research",state="failed"}'] == 0

    # KHEOPS goes down: requests get 503 and instances wait for a retry.
    album.server.set_down(True)
    orthanc.upload(single_instance()[1])
    wait_until(
        lambda: (
            (m := scrape(orthanc)).get('kheops_stow_requests_total{code="503"}', 0) >= 1
            and m["kheops_instances_retried_total"] >= 1
            and m['kheops_state{state="unreachable"}'] == 1
        ),
        timeout=60,
        message="503s and retries counted",
    )
    album.server.set_down(False)

    # The token is revoked: sending pauses and the token counts as refused.
    album.server.revoke_token(album.token)
    orthanc.upload(single_instance()[1])
    await_metrics(orthanc, {"kheops_token_accepted": 0, 'kheops_state{state="paused"}': 1})


@pytest.mark.slow
def test_publishing_metrics_while_a_corpus_is_stored_does_not_stall_orthanc(
    orthanc_factory: OrthancFactory, album: Album, tmp_path: Path
) -> None:
    """SetMetricsValue runs on the plugin's own thread while store callbacks run: no deadlock.

    A second thread keeps waking the publisher (any POST to /kheops/... does) and scraping
    the metrics while storescu sends the corpus; everything must arrive and Orthanc answer.
    """
    files = write_corpus(tmp_path / "corpus", studies=4, series=3, instances=25)
    orthanc = orthanc_factory(kheops=album.section(Workers=4))
    stop = threading.Event()
    rounds: list[int] = []
    failures: list[BaseException] = []

    def churn() -> None:
        session = requests.Session()
        session.auth = orthanc.session.auth
        try:
            while not stop.is_set() and len(rounds) < 5000:
                session.post(f"{orthanc.url}/kheops/queue/retry", json={}, timeout=30)
                session.get(
                    f"{orthanc.url}/tools/metrics-prometheus", timeout=30
                ).raise_for_status()
                rounds.append(1)
        except BaseException as exc:  # noqa: BLE001 -- reported by the test below
            failures.append(exc)
        finally:
            session.close()

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        orthanc.storescu([f.path for f in files], timeout=300)
        wait_until(
            lambda: album.holds([f.sop_uid for f in files]), timeout=180, message="corpus sent"
        )
    finally:
        stop.set()
        churner.join(60)
    assert not churner.is_alive(), "the scraping thread hangs: Orthanc stopped answering"
    assert not failures, failures
    # Every POST woke the publisher: it ran many times while the store callbacks ran.
    assert len(rounds) > 10
    await_metrics(orthanc, {"kheops_instances_sent_total": len(files)})
