"""The forwarder against what real networks and archives produce: redirects, answers that are not
KHEOPS's, files pydicom cannot read, failure reasons of every class, Orthanc's own REST failing.

Same rig as test_forwarder.py: a real SqliteOutbox, fakes of KHEOPS and Orthanc, a frozen clock.
"""

from __future__ import annotations

import logging
import struct
import threading
from io import BytesIO

import pydicom
import pytest

from orthanc_kheops.forwarding.health import PROBE_MAXIMUM, State
from orthanc_kheops.kheops.client import (
    KheopsBadAnswer,
    KheopsRedirected,
    KheopsUnavailable,
)
from orthanc_kheops.kheops.stow import UNKNOWN_REASON_ATTEMPTS, StowAnswer
from orthanc_kheops.orthanc_rest import OrthancNotFound, OrthancUnavailable
from tests.unit import test_forwarder as rigs
from tests.unit.test_forwarder import (
    ALBUM_WRITE,
    INACTIVE,
    T0,
    TIMEOUT,
    Rig,
    RigFactory,
    dicom_file,
    orthanc_id,
    raising,
    refuse,
    sop_uid,
    started,
    store_all,
)
from tests.waiting import wait_until

make_rig = rigs.make_rig

REDIRECT = (
    "STOW-RS: http://kheops.example.org redirects (301) to https://kheops.example.org/api/studies;"
    " KHEOPS never redirects its API and the plugin does not follow:"
    " set Kheops.Url to https://kheops.example.org"
)
HTML = (
    "KHEOPS answered 200 text/html with a body that is not JSON, not a STOW-RS response:"
    " is Kheops.Url the KHEOPS root?"
)


def redirected(uids: list[str]) -> StowAnswer:
    raise KheopsRedirected(REDIRECT, status=301, location="https://kheops.example.org/api/studies")


def html_page(uids: list[str]) -> StowAnswer:
    raise KheopsBadAnswer(HTML, status=200)


# --- 1. a success is only what KHEOPS confirmed -------------------------------------------------


def test_a_redirect_pauses_sending_with_what_to_do_and_counts_nothing_as_sent(
    make_rig: RigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="orthanc_kheops.forwarding.forwarder")
    rig = started(make_rig())
    rig.kheops.script(redirected)
    rig.add(1, 2)

    rig.await_state(State.PAUSED)

    rig.await_counts("released", pending=2, inflight=0, sent=0)
    assert {rig.row(n).attempts for n in (1, 2)} == {0}
    health = rig.forwarder.health.snapshot()
    assert "set Kheops.Url to https://kheops.example.org" in health.detail
    assert "redirects" in health.detail
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "set Kheops.Url to https://kheops.example.org" in errors[0]


def test_a_redirect_at_start_up_pauses_before_anything_is_sent(make_rig: RigFactory) -> None:
    rig = started(make_rig(), KheopsRedirected(REDIRECT, status=301, location="x"))  # type: ignore[arg-type]

    rig.await_state(State.PAUSED)
    rig.add(1)
    assert "set Kheops.Url to" in rig.forwarder.health.snapshot().detail
    rig.forwarder.check_token_now()  # still redirected: still paused

    assert rig.forwarder.health.state is State.PAUSED
    assert rig.kheops.requests == []


def test_sending_resumes_once_what_redirected_answers_as_kheops(make_rig: RigFactory) -> None:
    rig = started(make_rig(token_recheck=5.0))
    rig.kheops.script(redirected)
    rig.kheops.then = store_all
    rig.add(1, 2)
    rig.await_state(State.PAUSED)

    rig.move_clock(6)  # the token check that runs while paused: it answers now

    rig.await_counts("sent", sent=2)
    assert rig.forwarder.health.state is State.SENDING


def test_an_answer_that_is_not_kheops_is_retried_with_backoff_and_the_status_says_what_came(
    make_rig: RigFactory,
) -> None:
    rig = started(make_rig())
    rig.kheops.script(html_page)
    rig.kheops.then = store_all
    rig.add(1)

    wait_until(lambda: rig.row(1).attempts == 1, timeout=TIMEOUT, message="retried")
    rig.await_state(State.UNREACHABLE)
    row = rig.row(1)
    assert (row.state, row.last_error) == ("pending", HTML)
    assert row.next_attempt > T0
    health = rig.forwarder.health.snapshot()
    assert health.state is State.UNREACHABLE
    assert health.detail == f"{HTML}; retrying"
    assert rig.outbox.counts()["sent"] == 0

    rig.move_clock(PROBE_MAXIMUM)
    rig.await_counts("sent once KHEOPS answers", sent=1)


def test_an_instance_a_200_answer_does_not_name_is_retried_not_sent(make_rig: RigFactory) -> None:
    def names_one(uids: list[str]) -> StowAnswer:
        return StowAnswer(status=200, stored=frozenset(uids[:1]), failed={}, other_failures=())

    rig = started(make_rig())
    rig.kheops.script(names_one)
    rig.add(1, 2)

    rig.await_counts("one sent, one waiting", sent=1, pending=1)
    assert rig.row(2).last_error == (
        "KHEOPS answered 200 without naming this instance among those it stored"
    )


# --- 2. each instance judged on its own ----------------------------------------------------------


def _meta_end(data: bytes) -> int:
    return 132 + 12 + int(struct.unpack("<I", data[140:144])[0])


def unknown_vr_file(n: int) -> bytes:
    """The unknown VR "ZZ" on the first element, in the long form: Orthanc (DCMTK) stores such a
    file, pydicom raises NotImplementedError."""
    data = dicom_file(n)
    end = _meta_end(data)
    tag, length = data[end : end + 4], int(struct.unpack("<H", data[end + 6 : end + 8])[0])
    value = data[end + 8 : end + 8 + length]
    return (
        data[:end]
        + tag
        + b"ZZ\x00\x00"
        + struct.pack("<I", length)
        + value
        + data[end + 8 + length :]
    )


def odd_group_length_file(n: int) -> bytes:
    """A 3-byte group length (UL): pydicom raises BytesLengthException when it reads it."""
    data = dicom_file(n)
    end = _meta_end(data)
    return data[:end] + b"\x08\x00\x00\x00UL" + struct.pack("<H", 3) + b"\x01\x02\x03" + data[end:]


def bare_dataset_file(n: int) -> bytes:
    """The data set alone, implicit VR little endian, with neither preamble nor file meta."""
    dataset = pydicom.dcmread(BytesIO(dicom_file(n)))
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, pydicom.Dataset(dataset), implicit_vr=True, little_endian=True)
    return buffer.getvalue()


def test_a_file_with_an_unknown_vr_fails_alone_in_words_and_the_others_are_sent(
    make_rig: RigFactory,
) -> None:
    rig = make_rig()
    rig.kheops.then = store_all
    rig.add(1, 3)
    rig.orthanc.files[orthanc_id(2)] = unknown_vr_file(2)
    rig.queue(2)

    started(rig)

    rig.await_counts("verdicts", sent=2, failed=1)
    reason = rig.row(2).last_error or ""
    assert reason == (
        "Orthanc's file cannot be read as DICOM: its header uses an encoding"
        " (a value representation) that cannot be read"
    )
    assert "force" not in reason
    assert sorted(rig.kheops.stored) == [sop_uid(1), sop_uid(3)]


def test_a_file_with_a_damaged_element_no_one_reads_is_sent_for_kheops_to_judge(
    make_rig: RigFactory,
) -> None:
    rig = make_rig()
    rig.kheops.then = store_all
    rig.add(1)
    rig.orthanc.files[orthanc_id(2)] = odd_group_length_file(2)
    rig.queue(2)

    started(rig)

    rig.await_counts("both sent", sent=2)
    assert [len(r) for r in rig.kheops.requests] == [2]
    assert [i.sop_uid for i in rig.after_store] == [sop_uid(1), sop_uid(2)]


def test_a_file_without_a_sop_instance_uid_fails_alone(make_rig: RigFactory) -> None:
    dataset = pydicom.dcmread(BytesIO(dicom_file(2)))
    del dataset.SOPInstanceUID
    buffer = BytesIO()
    dataset.save_as(buffer)
    rig = make_rig()
    rig.kheops.then = store_all
    rig.add(1)
    rig.orthanc.files[orthanc_id(2)] = buffer.getvalue()
    rig.queue(2)

    started(rig)

    rig.await_counts("verdicts", sent=1, failed=1)
    assert rig.row(2).last_error == "Orthanc's file has no SOP Instance UID"


def test_a_file_without_a_part_10_header_is_sent_with_one_added(make_rig: RigFactory) -> None:
    rig = make_rig()
    rig.kheops.then = store_all  # the fake reads each part as a Part-10 file, without force
    rig.orthanc.files[orthanc_id(1)] = bare_dataset_file(1)
    rig.queue(1)

    started(rig)

    rig.await_counts("sent", sent=1)
    assert rig.kheops.stored == [sop_uid(1)]
    assert rig.after_store[0].series_uid == "1.2.826.0.1.3680043.10.3.1"


def test_a_file_meta_group_without_its_preamble_gets_the_preamble(make_rig: RigFactory) -> None:
    rig = make_rig()
    rig.kheops.then = store_all
    rig.orthanc.files[orthanc_id(1)] = dicom_file(1)[132:]
    rig.queue(1)

    started(rig)

    rig.await_counts("sent", sent=1)


def test_an_unexpected_error_reading_one_file_does_not_hold_back_the_others(
    make_rig: RigFactory,
) -> None:
    rig = make_rig()
    rig.kheops.then = store_all
    rig.add(1, 2, 3)
    rig.orthanc.fail_reads(orthanc_id(2), RuntimeError("boom"))

    started(rig)

    rig.await_counts("the others sent", sent=2, pending=1)
    assert rig.row(2).last_error == "internal error: RuntimeError: boom"


def await_attempts(rig: Rig, attempts: int) -> None:
    wait_until(lambda: rig.row(1).attempts == attempts, timeout=TIMEOUT, message="retried")


# --- 3. failure reasons by class ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "words"),
    [
        (0xA900, "data set does not match SOP class (43264, 0xA900)"),
        (0xC000, "cannot understand (49152, 0xC000)"),
        (0xC122, "transfer syntax not supported (49442, 0xC122)"),
        (0x0122, "SOP class not supported (290, 0x0122)"),
        (262, "attributes differ (262, 0x0106)"),
        (272, "processing failure (272, 0x0110)"),
    ],
)
def test_a_reason_retrying_cannot_fix_fails_the_instance_at_once(
    make_rig: RigFactory, reason: int, words: str
) -> None:
    rig = started(make_rig())
    rig.kheops.script(refuse({sop_uid(1): reason}))
    rig.add(1)

    rig.await_counts("failed", failed=1)
    assert rig.row(1).attempts == 1
    assert (rig.row(1).last_error or "").startswith(words)


def test_a_reason_not_known_here_is_retried_a_bounded_number_of_times_then_failed_naming_it(
    make_rig: RigFactory,
) -> None:
    rig = started(make_rig(retry_initial=1.0, retry_maximum=1.0))
    rig.kheops.then = refuse({sop_uid(1): 12345})
    rig.add(1)

    for attempt in range(1, UNKNOWN_REASON_ATTEMPTS):
        await_attempts(rig, attempt)
        assert rig.row(1).state == "pending"
        rig.move_clock(1)

    rig.await_counts("failed", failed=1)
    assert rig.row(1).last_error == (
        "failure reason 12345 (0x3039), which this plugin does not know;"
        f" gave up after {UNKNOWN_REASON_ATTEMPTS} attempts"
    )


def test_out_of_resources_is_retried_past_the_bound_for_unknown_reasons(
    make_rig: RigFactory,
) -> None:
    rig = started(make_rig(retry_initial=1.0, retry_maximum=1.0))
    rig.kheops.then = refuse({sop_uid(1): 0xA700})
    rig.add(1)

    for attempt in range(1, UNKNOWN_REASON_ATTEMPTS + 2):
        await_attempts(rig, attempt)
        rig.move_clock(1)

    assert rig.row(1).state == "pending"
    assert (rig.row(1).last_error or "").startswith("out of resources (42752, 0xA700)")


def test_retry_after_is_honoured_for_the_instances_and_the_probe(make_rig: RigFactory) -> None:
    def busy(uids: list[str]) -> StowAnswer:
        raise KheopsUnavailable("STOW-RS: KHEOPS answered 429", status=429, retry_after=120)

    rig = started(make_rig(retry_initial=1.0, retry_maximum=300.0))
    rig.kheops.script(busy)
    rig.kheops.then = store_all
    rig.add(1)

    wait_until(lambda: rig.row(1).attempts == 1, timeout=TIMEOUT, message="rescheduled")
    rig.await_state(State.UNREACHABLE)
    assert rig.row(1).next_attempt >= T0 + 120
    introspections = rig.kheops.introspections

    rig.move_clock(60)
    assert rig.outbox.counts()["sent"] == 0
    assert rig.kheops.introspections == introspections  # no probe before Retry-After

    rig.move_clock(61)
    rig.await_counts("sent after Retry-After", sent=1)


def _two_series_refused_with_292() -> dict[str, int]:
    return {sop_uid(1): 292, sop_uid(2): 292, sop_uid(100): 292}


def test_292_on_every_instance_of_several_series_with_a_dead_token_pauses_and_fails_nothing(
    make_rig: RigFactory,
) -> None:
    rig = started(make_rig())
    rig.kheops.script(refuse(_two_series_refused_with_292()))
    rig.add(1, 2, 100)
    rig.kheops.introspection = INACTIVE

    rig.await_state(State.PAUSED)

    rig.await_counts("released", pending=3, failed=0, inflight=0)
    assert "not active" in rig.forwarder.health.snapshot().detail


def test_292_on_every_instance_of_several_series_with_a_valid_token_fails_them(
    make_rig: RigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="orthanc_kheops.forwarding.forwarder")
    rig = started(make_rig())
    rig.kheops.script(refuse(_two_series_refused_with_292()))
    rig.add(1, 2, 100)
    introspections = rig.kheops.introspections

    rig.await_counts("failed", failed=3)
    assert rig.kheops.introspections == introspections + 1
    rig.kheops.script(refuse({sop_uid(3): 292, sop_uid(101): 292}))
    rig.add(3, 101)
    rig.await_counts("failed again", failed=5)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("lost the album's admin rights" in m for m in messages) == 1


def test_292_on_one_series_alone_is_failed_without_asking_about_the_token(
    make_rig: RigFactory,
) -> None:
    rig = started(make_rig())
    rig.kheops.script(refuse({sop_uid(1): 292, sop_uid(2): 292}))
    rig.add(1, 2)
    introspections = rig.kheops.introspections

    rig.await_counts("failed", failed=2)
    assert rig.kheops.introspections == introspections


# --- 8. fast resume ----------------------------------------------------------------------------


def test_after_a_long_outage_a_probe_comes_at_most_every_few_seconds(make_rig: RigFactory) -> None:
    rig = started(make_rig(retry_initial=1.0, retry_maximum=300.0))
    rig.kheops.then = raising(KheopsUnavailable, "STOW-RS: KHEOPS answered 503", status=503)
    rig.kheops.introspection = KheopsUnavailable("introspection: KHEOPS answered 503", status=503)
    rig.add(1)
    rig.await_state(State.UNREACHABLE)

    for _ in range(12):  # an outage long enough for any backoff to reach its maximum
        before = rig.kheops.introspections
        rig.move_clock(PROBE_MAXIMUM)
        wait_until(lambda: rig.kheops.introspections > before, timeout=TIMEOUT)  # noqa: B023

    rig.kheops.introspection = ALBUM_WRITE
    rig.kheops.then = store_all
    rig.move_clock(PROBE_MAXIMUM)

    rig.await_counts("sent within one probe interval", sent=1)
    assert rig.forwarder.health.state is State.SENDING
    assert PROBE_MAXIMUM <= 5


def test_a_request_that_began_before_the_recovery_neither_restarts_the_outage_nor_waits_long(
    make_rig: RigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="orthanc_kheops.forwarding.forwarder")
    entered, release = threading.Event(), threading.Event()

    def slow_503(uids: list[str]) -> StowAnswer:
        entered.set()
        release.wait(TIMEOUT)
        raise KheopsUnavailable("STOW-RS: KHEOPS answered 503", status=503)

    rig = make_rig(workers=2, batch_max_instances=1, retry_initial=1.0, retry_maximum=300.0)
    rig.kheops.script(slow_503, raising(KheopsUnavailable, "STOW-RS: 503", status=503))
    rig.kheops.then = store_all
    rig.add(1, 2, 3)
    started(rig)
    entered.wait(TIMEOUT)
    rig.await_state(State.UNREACHABLE)  # the second request's 503 began the outage

    rig.move_clock(PROBE_MAXIMUM)  # the probe goes through: the outage is over
    rig.await_state(State.SENDING)
    release.set()  # ... and the request that began before it fails now

    wait_until(lambda: rig.outbox.counts()["inflight"] == 0, timeout=TIMEOUT, message="done")
    assert rig.forwarder.health.state is State.SENDING
    slow = next(n for n in (1, 2, 3) if rig.row(n).state == "pending")
    assert rig.row(slow).next_attempt <= T0 + PROBE_MAXIMUM + 1.0  # the first delay, not a backoff
    messages = [r.getMessage() for r in caplog.records]
    assert sum("KHEOPS is unreachable" in m for m in messages) == 1


# --- 9. Orthanc's own REST API -----------------------------------------------------------------


def test_orthanc_rest_failing_shows_as_its_own_state_and_fails_nothing(
    make_rig: RigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="orthanc_kheops.forwarding.forwarder")
    refused = OrthancUnavailable(
        "cannot reach Orthanc's REST API at http://127.0.0.1:9 (ConnectionRefusedError):"
        " check Kheops.OrthancUrl"
    )
    rig = make_rig()
    rig.kheops.then = store_all
    rig.add(1, 2)
    rig.orthanc.fail_reads(orthanc_id(1), refused, refused)
    rig.orthanc.fail_reads(orthanc_id(2), refused, refused)

    started(rig)

    rig.await_state(State.ORTHANC_UNAVAILABLE)
    assert rig.forwarder.health.snapshot().detail == f"Orthanc's own REST API fails: {refused}"
    assert rig.outbox.counts()["failed"] == 0
    rig.move_clock(2)
    wait_until(lambda: len(rig.orthanc.reads) == 4, timeout=TIMEOUT, message="read again")
    rig.move_clock(2)
    rig.await_counts("sent once Orthanc answers", sent=2)
    rig.await_state(State.SENDING)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot read instances from Orthanc" in m for m in messages) == 1
    assert sum("Orthanc's REST API answers again" in m for m in messages) == 1


def test_a_404_for_every_path_is_a_wrong_orthanc_url_not_deleted_instances(
    make_rig: RigFactory,
) -> None:
    rig = make_rig()
    rig.add(1, queue=False)
    rig.queue(1)
    del rig.orthanc.files[orthanc_id(1)]
    rig.orthanc.system_error = OrthancNotFound("Orthanc REST /system: not found")

    started(rig)

    rig.await_state(State.ORTHANC_UNAVAILABLE)
    assert rig.row(1).state in ("pending", "inflight")
    assert rig.outbox.counts()["failed"] == 0
    assert "/system answered 404" in rig.forwarder.health.snapshot().detail


def test_a_404_while_orthancs_api_answers_is_a_deleted_instance(make_rig: RigFactory) -> None:
    rig = make_rig()
    rig.orthanc.fail_reads(orthanc_id(1), OrthancNotFound("gone"))
    rig.add(1)

    started(rig)

    rig.await_counts("left the queue as deleted", deleted=1, failed=0, pending=0)
