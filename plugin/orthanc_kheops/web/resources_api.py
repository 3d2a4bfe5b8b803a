"""The /kheops/resources/... REST routes: forwarding status of a study or series.

Orthanc Explorer shows them on its study and series pages; the recent-studies list feeds the
dry-run box of the rules page. Orthanc is read over loopback REST, like the other routes.

    GET /kheops/resources/studies               the 50 studies Orthanc received last
    GET /kheops/resources/studies/{id}          its instances by outbox state, per series too
    GET /kheops/resources/series/{id}           the same for one series
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from ..orthanc_rest import OrthancNotFound, OrthancRest, OrthancUnavailable
from ..state.outbox import Outbox, QueuedInstance
from .forwarding_api import iso
from .routing import ORTHANC_ID_PATTERN, HttpError, Request, Response, Router

_RECENT_STUDIES = 50
_FAILURES_SHOWN = 20
_ID = ORTHANC_ID_PATTERN  # checked before it goes into a loopback URL


@dataclass(frozen=True)
class _Instance:
    orthanc_id: str
    series_id: str


def summarise(instances: Sequence[str], queued: Mapping[str, QueuedInstance]) -> dict[str, object]:
    """Counts by outbox state, and one word for them all.

    The word is the most urgent one: failed (someone must act), then pending (on its way),
    then "not queued" (stored before the plugin ran: a backfill sends it), then sent.
    """
    counts = {"Sent": 0, "Pending": 0, "InFlight": 0, "Failed": 0, "NotQueued": 0}
    key = {"sent": "Sent", "pending": "Pending", "inflight": "InFlight", "failed": "Failed"}
    for orthanc_id in instances:
        entry = queued.get(orthanc_id)
        counts["NotQueued" if entry is None else key[entry.state]] += 1
    if not instances:
        state = "empty"
    elif counts["Failed"]:
        state = "failed"
    elif counts["Pending"] or counts["InFlight"]:
        state = "pending"
    elif counts["NotQueued"]:
        state = "not queued"
    else:
        state = "sent"
    return {"State": state, "Instances": len(instances), "Counts": counts}


class ResourcesApi:
    def __init__(self, *, outbox: Outbox, orthanc: OrthancRest) -> None:
        self._outbox = outbox
        self._orthanc = orthanc

    def register(self, router: Router) -> None:
        router.add("GET", "resources/studies", self.recent_studies)
        router.add("GET", f"resources/(studies|series)/{_ID}", self.resource)

    def recent_studies(self, request: Request, _: Sequence[str]) -> Response:
        """The studies stored last, newest first (Orthanc lists studies in the order received)."""
        statistics = cast(dict[str, object], self._read("/statistics"))
        total = int(cast(int, statistics.get("CountStudies", 0)))
        since = max(0, total - _RECENT_STUDIES)
        studies = self._read(f"/studies?expand&since={since}&limit={_RECENT_STUDIES}")
        listed = [_study_json(s) for s in cast(list[object], studies) if isinstance(s, dict)]
        return Response(200, {"Studies": listed[::-1]})

    def resource(self, request: Request, groups: Sequence[str]) -> Response:
        level, orthanc_id = groups
        document = cast(dict[str, object], self._read(f"/{level}/{orthanc_id}"))
        rows = cast(list[dict[str, object]], self._read(f"/{level}/{orthanc_id}/instances"))
        instances = [_Instance(str(r["ID"]), str(r.get("ParentSeries", ""))) for r in rows]
        queued = self._outbox.lookup([i.orthanc_id for i in instances])
        answer: dict[str, object] = {
            "Level": "Study" if level == "studies" else "Series",
            "ID": orthanc_id,
            **summarise([i.orthanc_id for i in instances], queued),
            "Failures": [
                {
                    "ID": entry.orthanc_id,
                    "SOPInstanceUID": entry.sop_uid,
                    "LastError": entry.last_error,
                    "FailedAt": iso(entry.done_at),
                }
                for entry in queued.values()
                if entry.state == "failed"
            ][:_FAILURES_SHOWN],
        }
        if level == "studies":
            series = cast(list[dict[str, object]], self._read(f"/studies/{orthanc_id}/series"))
            answer["Series"] = [
                {
                    **_series_json(s),
                    **summarise(
                        [i.orthanc_id for i in instances if i.series_id == s["ID"]], queued
                    ),
                }
                for s in series
            ]
        else:
            answer["StudyID"] = document.get("ParentStudy")
        return Response(200, answer)

    def _read(self, path: str) -> object:
        try:
            return self._orthanc.get_json(path)
        except OrthancNotFound:
            raise HttpError(404, f"Orthanc has no {path.lstrip('/')}", field="id") from None
        except OrthancUnavailable as exc:
            raise HttpError(503, f"Orthanc did not answer: {exc}") from None


def _tags(document: Mapping[str, object], key: str) -> Mapping[str, object]:
    tags = document.get(key)
    return tags if isinstance(tags, dict) else {}


def _study_json(study: Mapping[str, object]) -> dict[str, object]:
    study_tags = _tags(study, "MainDicomTags")
    patient_tags = _tags(study, "PatientMainDicomTags")
    return {
        "ID": study.get("ID"),
        "PatientName": patient_tags.get("PatientName", ""),
        "PatientID": patient_tags.get("PatientID", ""),
        "StudyDate": study_tags.get("StudyDate", ""),
        "StudyDescription": study_tags.get("StudyDescription", ""),
        "Series": len(cast(list[object], study.get("Series") or [])),
    }


def _series_json(series: Mapping[str, object]) -> dict[str, object]:
    tags = _tags(series, "MainDicomTags")
    return {
        "ID": series.get("ID"),
        "SeriesNumber": tags.get("SeriesNumber", ""),
        "Modality": tags.get("Modality", ""),
        "SeriesDescription": tags.get("SeriesDescription", ""),
    }
