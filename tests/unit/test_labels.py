"""The label keeper: kheops-failed and kheops-sent follow the outbox, study by study."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from orthanc_kheops.state.outbox import SqliteOutbox
from orthanc_kheops.web.labels import FAILED_LABEL, SENT_LABEL, LabelKeeper, LabelThread


class FakeOrthanc:
    """Studies of instances, and the labels on them, as Orthanc 1.12 would keep them."""

    def __init__(self, studies: dict[str, list[str]]) -> None:
        self.studies = studies
        self.labels: dict[str, set[str]] = {s: set() for s in studies}
        self.study_lookups = 0

    def has_labels(self) -> bool:
        raise NotImplementedError

    def study_of(self, instance_id: str) -> str | None:
        self.study_lookups += 1
        return next((s for s, ids in self.studies.items() if instance_id in ids), None)

    def instances_of_study(self, study_id: str) -> list[str]:
        return list(self.studies.get(study_id, []))

    def studies_labelled(self, label: str) -> set[str]:
        return {s for s, labels in self.labels.items() if label in labels}

    def add_label(self, study_id: str, label: str) -> None:
        self.labels[study_id].add(label)

    def remove_label(self, study_id: str, label: str) -> None:
        self.labels[study_id].discard(label)


@pytest.fixture
def outbox(tmp_path: Path) -> SqliteOutbox:
    return SqliteOutbox(tmp_path / "outbox.sqlite3")


@pytest.fixture
def orthanc() -> FakeOrthanc:
    return FakeOrthanc({"study-a": ["a1", "a2"], "study-b": ["b1"]})


def queue(outbox: SqliteOutbox, *ids: str) -> None:
    outbox.enqueue([(i, 100) for i in ids], now=1.0, requeue=True)


def test_a_study_carries_kheops_failed_while_one_of_its_instances_is_failed(
    outbox: SqliteOutbox, orthanc: FakeOrthanc
) -> None:
    keeper = LabelKeeper(outbox=outbox, orthanc=orthanc, sent_label=False)
    queue(outbox, "a1", "a2", "b1")
    outbox.mark_failed({"a1": "not authorized (292)"}, now=2.0)

    keeper.run_once()
    assert orthanc.labels == {"study-a": {FAILED_LABEL}, "study-b": set()}

    outbox.retry_failed(None, now=3.0)
    keeper.run_once()
    assert orthanc.labels == {"study-a": set(), "study-b": set()}


def test_the_keeper_takes_off_a_failed_label_it_finds_on_a_study_with_nothing_failed(
    outbox: SqliteOutbox, orthanc: FakeOrthanc
) -> None:
    """Labels left by an earlier run (the failed instances retried while Orthanc was down)."""
    orthanc.labels["study-b"].add(FAILED_LABEL)
    orthanc.labels["study-b"].add("teaching")  # a label of someone else's stays
    LabelKeeper(outbox=outbox, orthanc=orthanc, sent_label=False).run_once()
    assert orthanc.labels["study-b"] == {"teaching"}


def test_kheops_sent_comes_once_every_instance_is_sent_and_goes_when_one_is_not(
    outbox: SqliteOutbox, orthanc: FakeOrthanc
) -> None:
    clock = [10.0]
    keeper = LabelKeeper(outbox=outbox, orthanc=orthanc, sent_label=True, clock=lambda: clock[0])
    queue(outbox, "a1", "a2", "b1")
    outbox.mark_sent(["a1", "b1"], now=10.0)
    keeper.run_once()
    assert orthanc.labels == {"study-a": set(), "study-b": {SENT_LABEL}}

    clock[0] = 20.0
    outbox.mark_sent(["a2"], now=20.0)
    keeper.run_once()
    assert orthanc.labels == {"study-a": {SENT_LABEL}, "study-b": {SENT_LABEL}}

    # A new instance of study-b arrives: it is not all in KHEOPS any more.
    orthanc.studies["study-b"].append("b2")
    queue(outbox, "b2")
    clock[0] = 30.0
    keeper.run_once()
    assert orthanc.labels == {"study-a": {SENT_LABEL}, "study-b": set()}

    outbox.mark_failed({"b2": "not authorized (292)"}, now=30.0)
    keeper.run_once()
    assert orthanc.labels == {"study-a": {SENT_LABEL}, "study-b": {FAILED_LABEL}}


def test_each_instance_is_looked_up_in_orthanc_once(
    outbox: SqliteOutbox, orthanc: FakeOrthanc
) -> None:
    keeper = LabelKeeper(outbox=outbox, orthanc=orthanc, sent_label=False)
    queue(outbox, "a1", "a2")
    outbox.mark_failed({"a1": "x", "a2": "y"}, now=2.0)
    keeper.run_once()
    keeper.run_once()
    assert orthanc.study_lookups == 2


def test_without_the_setting_no_study_is_labelled_sent(
    outbox: SqliteOutbox, orthanc: FakeOrthanc
) -> None:
    queue(outbox, "b1")
    outbox.mark_sent(["b1"], now=2.0)
    LabelKeeper(outbox=outbox, orthanc=orthanc, sent_label=False).run_once()
    assert orthanc.labels["study-b"] == set()


class NoLabels(FakeOrthanc):
    """An Orthanc before 1.12, or one that cannot be asked."""

    def __init__(self, answer: bool | Exception) -> None:
        super().__init__({})
        self.answer = answer

    def has_labels(self) -> bool:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def studies_labelled(self, label: str) -> set[str]:
        raise AssertionError("an Orthanc without labels is never asked for them")


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (False, "this Orthanc has no labels (1.12+): studies are not labelled"),
        (OSError("refused"), "could not tell whether Orthanc has labels (refused)"),
    ],
)
def test_on_an_orthanc_without_labels_the_thread_says_so_and_ends(
    outbox: SqliteOutbox, answer: bool | Exception, said: str, caplog: pytest.LogCaptureFixture
) -> None:
    orthanc = NoLabels(answer)
    keeper = LabelKeeper(outbox=outbox, orthanc=orthanc, sent_label=True)
    labels = LabelThread(keeper, orthanc, interval=0.01)
    with caplog.at_level(logging.INFO, logger="orthanc_kheops"):
        labels.start()
        labels.stop(timeout=5)
    assert said in caplog.text
