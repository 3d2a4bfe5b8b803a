"""Orthanc labels that show the forwarding state of a study in every Orthanc UI.

`kheops-failed` is on a study while one of its instances is on the failed list, and comes off
once none is; `kheops-sent` (setting `SentLabel`) is on a study once every instance of it is
in KHEOPS. Orthanc Explorer 2 lists and filters studies by label. Labels exist from Orthanc
1.12 on: the keeper probes for them once and does nothing on an Orthanc without them.

The labels are brought in line with the outbox every few seconds by one thread, rather than
at each verdict, so that forwarding never waits on a label and a missed change is made good at
the next pass.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from ..orthanc_rest import OrthancNotFound, OrthancRest
from ..state.outbox import Outbox

log = logging.getLogger(__name__)

FAILED_LABEL = "kheops-failed"
SENT_LABEL = "kheops-sent"
_PAGE = 1000
_STUDY_CACHE = 100_000


class LabelPort(Protocol):
    """What the keeper needs of Orthanc."""

    def has_labels(self) -> bool: ...

    def study_of(self, instance_id: str) -> str | None: ...

    def instances_of_study(self, study_id: str) -> list[str]: ...

    def studies_labelled(self, label: str) -> set[str]: ...

    def add_label(self, study_id: str, label: str) -> None: ...

    def remove_label(self, study_id: str, label: str) -> None: ...


class LabelKeeper:
    def __init__(
        self,
        *,
        outbox: Outbox,
        orthanc: LabelPort,
        sent_label: bool,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._outbox = outbox
        self._orthanc = orthanc
        self._sent_label = sent_label
        self._clock = clock
        self._studies: dict[str, str | None] = {}  # instance -> study; ids never change
        self._since: float | None = None  # time of the last pass that looked at sent instances

    def run_once(self) -> None:
        """Put each label where it belongs now, and take it off where it does not."""
        started = self._clock()
        failed = self._studies_of(self._ids("failed"))
        self._align(FAILED_LABEL, failed, self._orthanc.studies_labelled(FAILED_LABEL))
        if self._sent_label:
            self._align_sent(failed)
        self._since = started

    def _align(self, label: str, wanted: set[str], labelled: set[str]) -> None:
        for study in sorted(wanted - labelled):
            self._orthanc.add_label(study, label)
        for study in sorted(labelled - wanted):
            self._orthanc.remove_label(study, label)

    def _align_sent(self, failed: set[str]) -> None:
        """Look only at studies whose instances moved: sent since the last pass, or waiting."""
        labelled = self._orthanc.studies_labelled(SENT_LABEL)
        moved = self._studies_of(self._recently_sent()) | self._studies_of(self._ids("pending"))
        candidates = moved | failed | labelled if self._since is None else moved | failed
        wanted = {s for s in candidates if s not in failed and self._all_sent(s)}
        self._align(SENT_LABEL, wanted | (labelled - candidates), labelled)

    def _all_sent(self, study: str) -> bool:
        instances = self._orthanc.instances_of_study(study)
        queued = self._outbox.lookup(instances)
        return bool(instances) and all(i in queued and queued[i].state == "sent" for i in instances)

    def _ids(self, state: str) -> list[str]:
        ids: list[str] = []
        while True:
            page = self._outbox.entries(state, limit=_PAGE, offset=len(ids))
            ids.extend(e.orthanc_id for e in page)
            if len(page) < _PAGE:
                return ids

    def _recently_sent(self) -> Iterable[str]:
        """Sent instances newest first, down to the last pass (all of them on the first)."""
        offset = 0
        while True:
            page = self._outbox.entries("sent", limit=_PAGE, offset=offset)
            for entry in page:
                if self._since is not None and (entry.done_at or 0) < self._since - 1:
                    return
                yield entry.orthanc_id
            if len(page) < _PAGE:
                return
            offset += _PAGE

    def _studies_of(self, instances: Iterable[str]) -> set[str]:
        if len(self._studies) > _STUDY_CACHE:
            self._studies.clear()
        studies: set[str] = set()
        for instance in instances:
            if instance not in self._studies:
                self._studies[instance] = self._orthanc.study_of(instance)
            study = self._studies[instance]
            if study is not None:
                studies.add(study)
        return studies


class LabelThread:
    """Runs the keeper every `interval` seconds, where Orthanc has labels."""

    def __init__(self, keeper: LabelKeeper, orthanc: LabelPort, *, interval: float) -> None:
        self._keeper = keeper
        self._orthanc = orthanc
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kheops-labels", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            available = self._orthanc.has_labels()
        except Exception as exc:  # noqa: BLE001 -- no labels is never a reason to fail
            log.warning("could not tell whether Orthanc has labels (%s); no study is labelled", exc)
            return
        if not available:
            log.info("this Orthanc has no labels (1.12+): studies are not labelled")
            return
        log.info("labelling studies: %s", FAILED_LABEL)
        while not self._stop.is_set():
            try:
                self._keeper.run_once()
            except Exception:  # the next pass tries again
                log.warning("could not update the KHEOPS labels; trying again", exc_info=True)
            self._stop.wait(self._interval)


class OrthancLabels:
    """The keeper's view of Orthanc, over its REST API (worker threads must not use the SDK)."""

    def __init__(self, orthanc: OrthancRest) -> None:
        self._orthanc = orthanc

    def has_labels(self) -> bool:
        try:
            self._orthanc.get_json("/tools/labels")
        except OrthancNotFound:
            return False
        return True

    def study_of(self, instance_id: str) -> str | None:
        try:
            study = self._orthanc.get_json(f"/instances/{instance_id}/study")
        except OrthancNotFound:
            return None  # deleted since
        return str(study["ID"]) if isinstance(study, dict) and "ID" in study else None

    def instances_of_study(self, study_id: str) -> list[str]:
        try:
            return [i.orthanc_id for i in self._orthanc.instances_of("studies", study_id)]
        except OrthancNotFound:
            return []

    def studies_labelled(self, label: str) -> set[str]:
        found = self._orthanc.write(
            "POST",
            "/tools/find",
            {"Level": "Study", "Query": {}, "Labels": [label], "LabelsConstraint": "All"},
        )
        return {str(s) for s in found} if isinstance(found, list) else set()

    def add_label(self, study_id: str, label: str) -> None:
        with contextlib.suppress(OrthancNotFound):  # deleted since: nothing to label
            self._orthanc.write("PUT", f"/studies/{study_id}/labels/{label}")

    def remove_label(self, study_id: str, label: str) -> None:
        with contextlib.suppress(OrthancNotFound):
            self._orthanc.write("DELETE", f"/studies/{study_id}/labels/{label}")
