"""GET /kheops/resources/...: forwarding status of studies and series, and the recent studies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from orthanc_kheops.orthanc_rest import OrthancNotFound, OrthancRest, OrthancUnavailable
from orthanc_kheops.state.outbox import SqliteOutbox
from orthanc_kheops.web.resources_api import ResourcesApi, summarise
from orthanc_kheops.web.routing import Request, Router

T0 = 1_700_000_000.0
STUDY = "aaaa1111-bbbb2222-cccc3333-dddd4444-eeee5555"
SERIES_A = "0000000a-00000000-00000000-00000000-00000000"
SERIES_B = "0000000b-00000000-00000000-00000000-00000000"


class FakeOrthanc(OrthancRest):
    """Orthanc's REST API from a dictionary of paths; any other call is not expected."""

    def __init__(self, documents: dict[str, object]) -> None:
        self.documents = documents
        self.down = False

    def get_json(self, path: str) -> object:
        if self.down:
            raise OrthancUnavailable(f"Orthanc REST {path}: ConnectionError")
        if path not in self.documents:
            raise OrthancNotFound(f"Orthanc REST {path}: not found")
        return self.documents[path]

    def _get(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(args)


def study_documents() -> dict[str, object]:
    instances = [
        {"ID": "i1", "ParentSeries": SERIES_A},
        {"ID": "i2", "ParentSeries": SERIES_A},
        {"ID": "i3", "ParentSeries": SERIES_B},
        {"ID": "i4", "ParentSeries": SERIES_B},
    ]
    series = [
        {
            "ID": SERIES_A,
            "MainDicomTags": {"SeriesNumber": "1", "Modality": "CT", "SeriesDescription": "AX"},
        },
        {"ID": SERIES_B, "MainDicomTags": {"Modality": "MR"}},
    ]
    return {
        f"/studies/{STUDY}": {"ID": STUDY},
        f"/studies/{STUDY}/instances": instances,
        f"/studies/{STUDY}/series": series,
        f"/series/{SERIES_B}": {"ID": SERIES_B, "ParentStudy": STUDY},
        f"/series/{SERIES_B}/instances": instances[2:],
    }


@pytest.fixture
def outbox(tmp_path: Path) -> SqliteOutbox:
    return SqliteOutbox(tmp_path / "outbox.sqlite3")


def router(outbox: SqliteOutbox, orthanc: FakeOrthanc) -> Router:
    routes = Router()
    ResourcesApi(outbox=outbox, orthanc=orthanc).register(routes)
    return routes


def get(routes: Router, path: str) -> tuple[int, Any]:
    response = routes.handle(Request(method="GET", path=path))
    return response.status, response.body


@pytest.mark.parametrize(
    ("states", "word"),
    [
        ([], "empty"),
        (["sent", "sent"], "sent"),
        (["sent", None], "not queued"),
        (["sent", "pending", None], "pending"),
        (["inflight", "sent"], "pending"),
        (["failed", "pending", "sent", None], "failed"),
    ],
)
def test_the_word_for_a_resource_is_its_most_urgent_state(
    outbox: SqliteOutbox, states: list[str | None], word: str
) -> None:
    ids = [f"i{n}" for n in range(len(states))]
    outbox.enqueue([(i, 1) for i, s in zip(ids, states, strict=True) if s], now=T0, requeue=True)
    for orthanc_id, state in zip(ids, states, strict=True):
        if state == "sent":
            outbox.mark_sent([orthanc_id], now=T0)
        elif state == "failed":
            outbox.mark_failed({orthanc_id: "292"}, now=T0)
        elif state == "inflight":
            outbox.claim(now=T0, lease=60, max_count=1, max_bytes=10)

    summary = summarise(ids, outbox.lookup(ids))

    assert summary["State"] == word
    assert summary["Instances"] == len(states)


def test_a_study_shows_its_counts_its_failures_and_each_series(outbox: SqliteOutbox) -> None:
    outbox.enqueue([("i1", 1), ("i2", 1), ("i3", 1)], now=T0, requeue=True)
    outbox.mark_sent(["i1", "i2"], now=T0)
    outbox.mark_failed({"i3": "KHEOPS refused it: 292 (series held by another album)"}, now=T0)

    status, body = get(router(outbox, FakeOrthanc(study_documents())), f"resources/studies/{STUDY}")

    assert status == 200
    assert body["Level"] == "Study"
    assert body["State"] == "failed"
    assert body["Counts"] == {"Sent": 2, "Pending": 0, "InFlight": 0, "Failed": 1, "NotQueued": 1}
    assert [f["ID"] for f in body["Failures"]] == ["i3"]
    assert "292" in body["Failures"][0]["LastError"]
    first, second = body["Series"]
    assert first["ID"] == SERIES_A and first["State"] == "sent"
    assert (first["SeriesNumber"], first["Modality"], first["SeriesDescription"]) == (
        "1",
        "CT",
        "AX",
    )
    assert second["State"] == "failed"
    assert second["Counts"]["NotQueued"] == 1


def test_a_series_shows_its_own_instances_and_its_study(outbox: SqliteOutbox) -> None:
    outbox.enqueue([("i3", 1), ("i4", 1)], now=T0, requeue=True)

    status, body = get(
        router(outbox, FakeOrthanc(study_documents())), f"resources/series/{SERIES_B}"
    )

    assert status == 200
    assert body["Level"] == "Series"
    assert body["State"] == "pending"
    assert body["Counts"]["Pending"] == 2
    assert body["StudyID"] == STUDY
    assert "Series" not in body


def test_an_unknown_resource_is_a_404_and_an_unreachable_orthanc_a_503(
    outbox: SqliteOutbox,
) -> None:
    orthanc = FakeOrthanc(study_documents())
    routes = router(outbox, orthanc)

    missing, body = get(routes, "resources/studies/0123-4567")
    orthanc.down = True
    down, _ = get(routes, f"resources/studies/{STUDY}")

    assert missing == 404
    assert "studies/0123-4567" in body["Message"]
    assert down == 503


def test_recent_studies_are_the_last_ones_orthanc_received_newest_first(
    outbox: SqliteOutbox,
) -> None:
    studies = [
        {
            "ID": f"s{n}",
            "MainDicomTags": {"StudyDate": "20240101", "StudyDescription": f"study {n}"},
            "PatientMainDicomTags": {"PatientName": "DOE^JANE", "PatientID": "P1"},
            "Series": ["a", "b"],
        }
        for n in range(3)
    ]
    orthanc = FakeOrthanc(
        {"/statistics": {"CountStudies": 53}, "/studies?expand&since=3&limit=50": studies}
    )

    status, body = get(router(outbox, orthanc), "resources/studies")

    assert status == 200
    assert [s["ID"] for s in body["Studies"]] == ["s2", "s1", "s0"]
    assert body["Studies"][0] == {
        "ID": "s2",
        "PatientName": "DOE^JANE",
        "PatientID": "P1",
        "StudyDate": "20240101",
        "StudyDescription": "study 2",
        "Series": 2,
    }
