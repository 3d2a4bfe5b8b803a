"""Forwarding end to end: a real Orthanc with the plugin, and the KHEOPS test server."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.corpus import CorpusFile, to_bytes
from tests.orthanc_process import OrthancFactory, OrthancProcess, OrthancStartError
from tests.plugin_setup import Album, queue, single_instance, status, write_corpus
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def corpus(tmp_path: Path) -> list[CorpusFile]:
    return write_corpus(tmp_path / "corpus", studies=2, series=2, instances=3, seed=7)


def queue_of_length(orthanc: OrthancProcess, state: str, length: int) -> list[dict[str, Any]]:
    """The queue when it has `length` entries, else an empty list (for wait_until)."""
    entries = queue(orthanc, state)
    return entries if len(entries) == length else []


def queued_while_kheops_is_down(
    orthanc_factory: OrthancFactory, album: Album, corpus: list[CorpusFile], **settings: Any
) -> OrthancProcess:
    """An Orthanc that stored the corpus while KHEOPS answered 503: all of it is queued."""
    album.server.set_down(True)
    orthanc = orthanc_factory(kheops=album.section(**settings))
    orthanc.storescu([f.path for f in corpus])
    wait_until(lambda: status(orthanc)["Counts"]["Queued"] == len(corpus))
    return orthanc


def uids(files: Sequence[CorpusFile]) -> list[str]:
    return [f.sop_uid for f in files]


def await_in_album(album: Album, sop_uids: Sequence[str], timeout: float = 60) -> None:
    wait_until(
        lambda: album.holds(sop_uids),
        timeout=timeout,
        message=f"{len(sop_uids)} instances in the album",
    )


def test_instances_stored_by_storescu_and_rest_arrive_in_the_album_of_the_token(
    orthanc_factory: OrthancFactory, album: Album, corpus: list[CorpusFile]
) -> None:
    orthanc = orthanc_factory(kheops=album.section())
    orthanc.storescu([f.path for f in corpus])
    uploaded = [single_instance() for _ in range(2)]
    for _, data in uploaded:
        orthanc.upload(data)

    expected = uids(corpus) + [uid for uid, _ in uploaded]
    await_in_album(album, expected)

    series = {(f.study_uid, f.series_uid) for f in corpus}
    assert series <= album.server.album_series(album.album_id)
    assert all(album.server.store_count(uid) == 1 for uid in expected)
    counts = wait_until(
        lambda: (c := status(orthanc)["Counts"])["Sent"] == len(expected) and c,
        message="status counts every instance as sent",
    )
    assert counts["Queued"] == 0 and counts["Failed"] == 0
    assert status(orthanc)["AlbumId"] == album.album_id


def test_a_file_stored_over_a_sent_instance_is_sent_again_when_orthanc_overwrites(
    orthanc_factory: OrthancFactory, album: Album
) -> None:
    orthanc = orthanc_factory(kheops=album.section(), extra_config={"OverwriteInstances": True})
    uid, data = single_instance()
    orthanc.upload(data)
    wait_until(lambda: album.server.store_count(uid) == 1, message="first upload stored")

    orthanc.upload(data)  # Orthanc logs no change for it: the store callback queues it

    wait_until(lambda: album.server.store_count(uid) == 2, message="the new file sent too")


def test_a_file_orthanc_already_has_is_not_sent_again(
    orthanc_factory: OrthancFactory, album: Album
) -> None:
    orthanc = orthanc_factory(kheops=album.section(Workers=1))
    uid, data = single_instance()
    orthanc.upload(data)
    wait_until(lambda: album.server.store_count(uid) == 1, message="first upload stored")

    orthanc.upload(data)  # AlreadyStored: the same file, nothing new to send
    later_uid, later = single_instance()
    orthanc.upload(later)

    wait_until(lambda: album.server.store_count(later_uid) == 1, message="the later one sent")
    assert album.server.store_count(uid) == 1


def test_several_instances_travel_in_one_stow_request(
    orthanc_factory: OrthancFactory, album: Album, corpus: list[CorpusFile]
) -> None:
    queued_while_kheops_is_down(orthanc_factory, album, corpus, Workers=1, BatchMaxInstances=5)
    album.server.clear_requests()
    album.server.set_down(False)

    await_in_album(album, uids(corpus))

    stows = [r for r in album.server.requests if r.method == "POST" and r.path == "/api/studies"]
    assert max(r.part_count for r in stows) == 5
    assert sum(r.part_count for r in stows if r.status == 200) == len(corpus)


def test_everything_arrives_once_kheops_is_back_up(
    orthanc_factory: OrthancFactory, album: Album, corpus: list[CorpusFile]
) -> None:
    album.server.set_down(True)
    orthanc = orthanc_factory(kheops=album.section())
    orthanc.storescu([f.path for f in corpus])

    down = wait_until(
        lambda: (s := status(orthanc))["State"] == "unreachable" and s,
        message="status says KHEOPS is unreachable",
    )
    assert "503" in down["LastError"]
    assert album.server.album_instances(album.album_id) == set()

    album.server.set_down(False)
    await_in_album(album, uids(corpus))
    wait_until(lambda: status(orthanc)["State"] == "sending")


def test_everything_arrives_once_kheops_accepts_connections_again(
    orthanc_factory: OrthancFactory, album: Album, corpus: list[CorpusFile]
) -> None:
    album.server.set_refusing(True)
    orthanc = orthanc_factory(kheops=album.section())
    orthanc.storescu([f.path for f in corpus])
    wait_until(lambda: status(orthanc)["State"] == "unreachable")

    album.server.set_refusing(False)
    await_in_album(album, uids(corpus))


def test_mixed_503s_and_dropped_connections_deliver_each_instance_exactly_once(
    orthanc_factory: OrthancFactory, album: Album, corpus: list[CorpusFile]
) -> None:
    album.server.fail_next(3, status=503, method="POST", path_prefix="/api/studies")
    album.server.drop_next(3, method="POST", path_prefix="/api/studies")
    orthanc = orthanc_factory(kheops=album.section(BatchMaxInstances=2))
    orthanc.storescu([f.path for f in corpus])

    await_in_album(album, uids(corpus))

    assert [album.server.store_count(uid) for uid in uids(corpus)] == [1] * len(corpus)
    counts = wait_until(lambda: (c := status(orthanc)["Counts"])["Sent"] == len(corpus) and c)
    assert counts["Failed"] == 0
    assert counts["Retries"] >= 1
    statuses = [r.status for r in album.server.requests if r.path == "/api/studies"]
    assert statuses.count(503) == 3


def test_nothing_is_missing_after_orthanc_is_killed_in_the_middle_of_forwarding(
    orthanc_factory: OrthancFactory, album: Album, tmp_path: Path
) -> None:
    files = write_corpus(tmp_path / "big", studies=3, series=2, instances=10, seed=11)
    album.server.set_latency(0.3)
    orthanc = orthanc_factory(kheops=album.section(BatchMaxInstances=2, Workers=1))
    orthanc.storescu([f.path for f in files])
    wait_until(
        lambda: 0 < len(album.server.album_instances(album.album_id)) < len(files),
        message="forwarding under way",
    )

    orthanc.kill()
    album.server.set_latency(0)
    orthanc.restart()

    await_in_album(album, uids(files))
    wait_until(lambda: status(orthanc)["Counts"]["Sent"] == len(files))


def test_an_instance_whose_queue_record_was_lost_is_found_again_in_orthancs_change_log(
    orthanc_factory: OrthancFactory, album: Album, corpus: list[CorpusFile]
) -> None:
    orthanc = queued_while_kheops_is_down(orthanc_factory, album, corpus)
    orthanc.stop()
    # What a power cut could do to the last commits: the outbox forgets two instances.
    outbox = orthanc.workdir / "kheops-state" / "outbox.sqlite3"
    with sqlite3.connect(outbox) as db:
        lost = db.execute("SELECT orthanc_id FROM instances LIMIT 2").fetchall()
        db.executemany("DELETE FROM instances WHERE orthanc_id = ?", lost)
        db.execute("DELETE FROM meta WHERE key = 'last_change'")
        db.execute("INSERT INTO meta (key, value) VALUES ('last_change', '0')")
    album.server.set_down(False)
    orthanc.restart()

    await_in_album(album, uids(corpus))
    assert "found 2 stored instances missing from the queue" in orthanc.log


def test_a_refused_token_pauses_sending_loses_nothing_and_says_why(
    orthanc_factory: OrthancFactory, album: Album, corpus: list[CorpusFile]
) -> None:
    orthanc = orthanc_factory(kheops=album.section())
    first, rest = corpus[:2], corpus[2:]
    orthanc.storescu([f.path for f in first])
    await_in_album(album, uids(first))

    # An album admin takes the write permission away: KHEOPS answers 403.
    album.server.set_scope(album.token, ("read",))
    orthanc.storescu([f.path for f in rest])
    paused = wait_until(
        lambda: (
            (s := status(orthanc))["State"] == "paused" and s["Counts"]["Queued"] == len(rest) and s
        ),
        message="status says sending is paused with everything queued",
    )
    assert "refuses the token" in paused["StateDetail"]
    assert "403" in paused["StateDetail"]
    assert paused["Counts"]["Failed"] == 0

    # ... and gives it back: the plugin notices by itself and resumes.
    album.server.set_scope(album.token, ("read", "write"))
    await_in_album(album, uids(corpus))
    wait_until(lambda: status(orthanc)["State"] == "sending")


def test_a_revoked_token_at_start_up_pauses_sending_and_says_why(
    orthanc_factory: OrthancFactory, album: Album
) -> None:
    album.server.revoke_token(album.token)
    orthanc = orthanc_factory(kheops=album.section())
    orthanc.upload(single_instance()[1])

    # The first STOW may meet the 401 before the start-up check answers: either way the
    # introspection that follows says why.
    # The instance is queued from Orthanc's change event, a moment after the upload answered.
    def paused_for_the_token() -> dict[str, Any]:
        now = status(orthanc)
        paused = now["State"] == "paused" and "not active" in now["StateDetail"]
        return now if paused and now["Counts"]["Queued"] == 1 else {}

    paused = wait_until(paused_for_the_token)
    assert paused["TokenActive"] is False


def test_an_instance_of_a_series_held_by_another_album_is_failed_and_the_others_go_on(
    orthanc_factory: OrthancFactory, album: Album, corpus: list[CorpusFile]
) -> None:
    # Another album already holds one series of the corpus: KHEOPS refuses it with 292.
    taken = [f for f in corpus if f.series_uid == corpus[0].series_uid]
    album.take_series(to_bytes(taken[0].dataset()))

    orthanc = orthanc_factory(kheops=album.section())
    orthanc.storescu([f.path for f in corpus])

    others = [f for f in corpus if f not in taken]
    await_in_album(album, uids(others))
    failed = wait_until(lambda: queue_of_length(orthanc, "failed", len(taken)))
    assert {entry["SOPInstanceUID"] for entry in failed} == set(uids(taken))
    assert all("292" in entry["LastError"] for entry in failed)
    assert status(orthanc)["Counts"]["Failed"] == len(taken)

    # Once the other album's owner lets go of the series, Retry sends them.
    retried = orthanc.post("/kheops/queue/retry", json={}).json()
    assert retried == {"Retried": len(taken)}
    wait_until(lambda: queue_of_length(orthanc, "failed", len(taken)), message="failed again")


def test_backfill_sends_what_orthanc_held_before_the_plugin_was_installed(
    orthanc_factory: OrthancFactory, album: Album, corpus: list[CorpusFile], tmp_path: Path
) -> None:
    workdir = tmp_path / "orthanc"
    plain = orthanc_factory(workdir)
    plain.storescu([f.path for f in corpus])
    plain.stop()

    orthanc = orthanc_factory(workdir, kheops=album.section())
    wait_until(lambda: status(orthanc)["State"] == "sending")
    assert status(orthanc)["Counts"]["Queued"] == 0
    study_ids = orthanc.get("/studies").json()
    series_id = orthanc.get(f"/studies/{study_ids[0]}/series").json()[0]["ID"]

    answer = orthanc.post("/kheops/send", json={"Resources": [study_ids[1], series_id]})
    assert answer.status_code == 200
    expected = [
        f
        for f in corpus
        if f.study_uid != orthanc_study_uid(orthanc, study_ids[0])
        or f.series_uid == orthanc_series_uid(orthanc, series_id)
    ]
    assert answer.json() == {"Queued": len(expected)}
    await_in_album(album, uids(expected))


def orthanc_study_uid(orthanc: OrthancProcess, study_id: str) -> str:
    return str(orthanc.get(f"/studies/{study_id}").json()["MainDicomTags"]["StudyInstanceUID"])


def orthanc_series_uid(orthanc: OrthancProcess, series_id: str) -> str:
    return str(orthanc.get(f"/series/{series_id}").json()["MainDicomTags"]["SeriesInstanceUID"])


def test_backfill_of_an_unknown_id_is_a_404_that_names_it(
    orthanc_factory: OrthancFactory, album: Album
) -> None:
    orthanc = orthanc_factory(kheops=album.section())
    unknown = "0123abcd-0123abcd-0123abcd-0123abcd-0123abcd"
    answer = orthanc.post("/kheops/send", json={"Resources": [unknown]})
    malformed = orthanc.post("/kheops/send", json={"Resources": ["no-such-id"]})
    assert answer.status_code == 404
    assert unknown in answer.json()["Message"]
    assert (malformed.status_code, malformed.json()["Field"]) == (400, "Resources")


def test_forwarding_works_with_orthanc_authentication_enabled(
    orthanc_factory: OrthancFactory, album: Album
) -> None:
    orthanc = orthanc_factory(kheops=album.section(), credentials=("admin", "s3cret"))
    anonymous = requests.get(f"{orthanc.url}/kheops/status", timeout=10)
    assert anonymous.status_code == 401
    sop_uid, data = single_instance()
    orthanc.upload(data)
    await_in_album(album, [sop_uid])


def test_unsent_instances_stay_queued_across_a_clean_shutdown(
    orthanc_factory: OrthancFactory, album: Album, corpus: list[CorpusFile]
) -> None:
    orthanc = queued_while_kheops_is_down(orthanc_factory, album, corpus)
    orthanc.stop()
    assert orthanc.returncode == 0

    album.server.set_down(False)
    orthanc.restart()
    await_in_album(album, uids(corpus))


def test_an_invalid_section_makes_orthanc_refuse_to_start_and_names_the_field(
    orthanc_factory: OrthancFactory, album: Album
) -> None:
    with pytest.raises(OrthancStartError) as error:
        orthanc_factory(kheops=album.section(Url="ftp://x"), verbose=False)
    assert "Kheops.Url: 'ftp://x' is not an http(s) URL" in str(error.value)


def test_no_token_appears_in_the_log_or_in_any_rest_answer(
    orthanc_factory: OrthancFactory, album: Album, corpus: list[CorpusFile]
) -> None:
    album.server.fail_next(1, status=503)
    orthanc = orthanc_factory(kheops=album.section())
    orthanc.storescu([f.path for f in corpus])
    await_in_album(album, uids(corpus))
    album.server.revoke_token(album.token)
    orthanc.upload(single_instance()[1])
    wait_until(lambda: status(orthanc)["State"] == "paused")

    answers = [
        orthanc.get("/kheops/status").text,
        orthanc.get("/kheops/queue", params={"state": "pending"}).text,
        orthanc.get("/kheops/queue", params={"state": "sent"}).text,
        orthanc.post("/kheops/queue/retry", json={}).text,
    ]
    for text in [*answers, orthanc.log]:
        assert album.token not in text
    assert album.token[:4] + "…" in json.loads(answers[0])["Token"]
