"""Share jobs from stored instances, and the share worker's outcomes, driven step by step."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from orthanc_kheops.config import KheopsConfig, load_config
from orthanc_kheops.forwarding.forwarder import SentInstance
from orthanc_kheops.kheops.client import (
    Introspection,
    KheopsError,
    KheopsNotFound,
    KheopsRejected,
    KheopsUnauthorized,
    KheopsUnavailable,
)
from orthanc_kheops.kheops.stow import StowAnswer
from orthanc_kheops.observability.masking import Secret
from orthanc_kheops.orthanc_rest import ChangePage, OrthancNotFound, OrthancRest, StoredInstance
from orthanc_kheops.state.backend import RuleStoreApi
from orthanc_kheops.state.rule_store import (
    ShareCounts,
    ShareJob,
    ShareKey,
    StoredRule,
)
from orthanc_kheops.switching.conditions import Condition
from orthanc_kheops.switching.rules import Rule, parse_rule
from orthanc_kheops.switching.sharing import (
    NOT_FOUND_ATTEMPTS,
    OrthancSeries,
    Sharer,
    decision,
    evaluate_series,
    matching_shares,
    read_instance,
    series_of,
)
from tests.corpus import make_dataset, to_bytes
from tests.waiting import wait_until

T0 = 1_000_000.0
URL = "https://kheops.example.org"
MAIN = "MainToken0123456789abcd"
DESTINATION = "DestToken0123456789abcd"
CT = "tagValueIsPresent(#Tag.Modality, 'CT')"
MR = "tagValueIsPresent(#Tag.Modality, 'MR')"


class _Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class _Share:
    destination: str
    source: str
    study_uid: str
    series_uid: str


class _Kheops:
    """KheopsApi with scripted introspection and share answers; STOW is not expected."""

    def __init__(self) -> None:
        self.tokens: dict[str, Introspection] = {
            DESTINATION: Introspection(True, frozenset({"write"}), "DEST"),
            MAIN: Introspection(True, frozenset({"read", "write", "send"}), "MAIN"),
        }
        self.answers: list[KheopsError] = []
        self.shares: list[_Share] = []
        self.reachable = True

    def introspect(self, token: Secret) -> Introspection:
        if not self.reachable:
            raise KheopsUnavailable("token introspection: cannot reach KHEOPS")
        return self.tokens.get(token.reveal(), Introspection(False, frozenset(), None))

    def stow(self, token: Secret, parts: Sequence[bytes]) -> StowAnswer:
        raise NotImplementedError

    def share_series(
        self, *, destination: Secret, source: Secret, study_uid: str, series_uid: str
    ) -> None:
        self.shares.append(_Share(destination.reveal(), source.reveal(), study_uid, series_uid))
        if self.answers:
            raise self.answers.pop(0)


class _Orthanc(OrthancRest):
    """Orthanc's REST API from dictionaries; the other calls are not expected.

    __init__ does not call OrthancRest's: there is no session, so no request can go out.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.documents: dict[str, object] = {}
        self.levels: dict[str, str] = {}
        self.reads: list[str] = []

    def read_file(self, orthanc_id: str, *, size: int = 0, file_uuid: str | None = None) -> bytes:
        self.reads.append(orthanc_id)
        if orthanc_id not in self.files:
            raise OrthancNotFound(orthanc_id)
        return self.files[orthanc_id]

    def get_json(self, path: str) -> object:
        return self.documents[path]

    def resource_level(self, orthanc_id: str) -> str:
        if orthanc_id not in self.levels:
            raise OrthancNotFound(f"no resource {orthanc_id!r}")
        return self.levels[orthanc_id]

    def instances_of(self, level: str, orthanc_id: str) -> list[StoredInstance]:
        raise NotImplementedError

    def changes(self, since: int, *, limit: int = 1000) -> ChangePage:
        raise NotImplementedError

    def last_change(self) -> int:
        raise NotImplementedError


def _config(**fields: Any) -> KheopsConfig:
    section = {
        "Url": URL,
        "Token": MAIN,
        "RetryInitialSeconds": 2,
        "RetryMaximumSeconds": 300,
        "TokenRecheckSeconds": 30,
        **fields,
    }
    return load_config({"Kheops": section}, config_directory=Path("/"))


@dataclass
class _World:
    sharer: Sharer
    store: RuleStoreApi
    kheops: _Kheops
    orthanc: _Orthanc
    clock: _Clock
    config: KheopsConfig

    def add_rule(self, name: str, condition: str = "", **fields: Any) -> Rule:
        document = {"Name": name, "DestinationToken": DESTINATION, "Condition": condition}
        rule = parse_rule({**document, **fields}, self.config, origin="api")
        self.store.save_rule(
            name, origin="api", document=rule.document(), albums=("DEST", "MAIN"), now=T0
        )
        self.sharer.reload()
        return rule

    def stored(self, name: str) -> StoredRule:
        rule = self.store.rule(name)
        assert rule is not None, f"no rule {name!r}"
        return rule

    def counts(self, name: str) -> ShareCounts:
        return self.store.counts().get(name, ShareCounts())


def _make_world(store: RuleStoreApi, **config_fields: Any) -> _World:
    config = _config(**config_fields)
    kheops, orthanc, clock = _Kheops(), _Orthanc(), _Clock()
    sharer = Sharer(config, store=store, kheops=kheops, orthanc=orthanc, clock=clock)
    return _World(sharer, store, kheops, orthanc, clock, config)


@pytest.fixture
def world(store: RuleStoreApi) -> Iterator[_World]:
    made = _make_world(store)
    yield made
    made.sharer.stop(timeout=5)


def _uid(name: str) -> str:
    """A DICOM UID for a short name, so that tests can speak of series "a" and "ct1"."""
    return f"1.2.9.{int.from_bytes(name.encode(), 'big')}" if name else ""


def _instance(
    series: str, modality: str = "CT", *, study: str = "1.2.3", n: int = 1
) -> SentInstance:
    dataset = Dataset()  # the uids travel in SentInstance, as the forwarder gives them
    dataset.Modality = modality
    return SentInstance(f"{series}-{n}", f"{series}.{n}", study, _uid(series), dataset)


def _rule(name: str, condition: str) -> Rule:
    document = {"Name": name, "DestinationToken": DESTINATION, "Condition": condition}
    return parse_rule(document, _config(), origin="api")


# --- matching_shares ----------------------------------------------------------------------------


def test_each_rule_queues_the_series_its_condition_matches() -> None:
    instances = [_instance("ct1"), _instance("mr1", "MR"), _instance("ct2")]

    found, errors = matching_shares([_rule("ct", CT), _rule("mr", MR)], instances)

    assert set(found) == {
        ShareKey("ct", "1.2.3", _uid("ct1")),
        ShareKey("ct", "1.2.3", _uid("ct2")),
        ShareKey("mr", "1.2.3", _uid("mr1")),
    }
    assert errors == []


def test_a_series_matches_when_any_of_its_instances_does() -> None:
    instances = [_instance("s", "MR", n=1), _instance("s", "CT", n=2)]

    found, _ = matching_shares([_rule("ct", CT)], instances)

    assert set(found) == {ShareKey("ct", "1.2.3", _uid("s"))}


def test_instances_without_series_or_study_uid_are_skipped() -> None:
    found, _ = matching_shares([_rule("all", "")], [_instance(""), _instance("s", study="")])

    assert found == {}


class _Boom:
    def evaluate(self, dataset: Dataset) -> bool:
        raise ValueError("cannot decode")

    def tags(self) -> Iterator[BaseTag]:
        return iter(())


def test_a_condition_that_raises_is_reported_and_does_not_stop_the_other_rules() -> None:
    broken = Rule(
        name="broken",
        destination=Secret(DESTINATION),
        source=Secret(MAIN),
        source_given=False,
        condition=Condition("x", (), _Boom()),
        enabled=True,
        url=None,
        origin="api",
    )

    found, errors = matching_shares([broken, _rule("all", "")], [_instance("s")])

    assert set(found) == {ShareKey("all", "1.2.3", _uid("s"))}
    assert [(rule.name, instance.series_uid) for rule, instance, _ in errors] == [
        ("broken", _uid("s"))
    ]


# --- after_store --------------------------------------------------------------------------------


def test_stored_instances_become_one_pending_share_per_rule_and_series(world: _World) -> None:
    world.add_rule("ct", CT)
    world.add_rule("all")

    world.sharer.after_store([_instance("a", n=1), _instance("a", n=2), _instance("b", "MR")])
    world.sharer.after_store([_instance("a", n=3)])

    assert world.counts("ct") == ShareCounts(pending=1)
    assert world.counts("all") == ShareCounts(pending=2)


def test_a_disabled_rule_queues_nothing(world: _World) -> None:
    world.add_rule("off", Enabled=False)

    world.sharer.after_store([_instance("a")])

    assert world.counts("off") == ShareCounts()


def test_after_store_raises_when_the_shares_cannot_be_saved(
    world: _World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forwarder then retries the instances, so their shares are evaluated again."""
    world.add_rule("all")

    def failing(*args: Any, **kwargs: Any) -> int:
        raise OSError("disk full")

    monkeypatch.setattr(world.store, "add_shares", failing)

    with pytest.raises(OSError, match="disk full"):
        world.sharer.after_store([_instance("a")])


def test_after_store_saves_nothing_when_no_rule_matches(
    world: _World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.add_rule("ct", CT)
    monkeypatch.setattr(world.store, "add_shares", lambda *a, **k: pytest.fail("saved"))

    world.sharer.after_store([_instance("a", modality="MR")])


# --- the worker: outcomes -----------------------------------------------------------------------


def test_a_due_share_is_made_with_the_destination_and_source_tokens(world: _World) -> None:
    world.add_rule("all")
    world.sharer.after_store([_instance("a", study="9.8")])

    assert world.sharer.step()

    assert world.kheops.shares == [_Share(DESTINATION, MAIN, "9.8", _uid("a"))]
    assert world.counts("all") == ShareCounts(shared=1)
    assert not world.sharer.step()


def test_an_unavailable_kheops_delays_the_share_and_pauses_the_worker(world: _World) -> None:
    world.add_rule("all")
    world.sharer.after_store([_instance("a"), _instance("b")])
    world.kheops.answers = [KheopsUnavailable("share: KHEOPS answered 503")]

    world.sharer.step()

    assert len(world.kheops.shares) == 1  # the pause starts at once: b is not tried
    assert world.counts("all") == ShareCounts(pending=2)
    assert not world.sharer.step()

    world.clock.now = T0 + 2
    world.sharer.step()  # the probe: one share, the oldest
    world.sharer.step()
    assert world.counts("all") == ShareCounts(shared=2)


def test_shares_waiting_for_their_backoff_are_due_once_kheops_answers_again(
    world: _World,
) -> None:
    world.add_rule("all")
    world.sharer.after_store([_instance("waiting")])
    world.store.reschedule(
        ShareKey("all", "1.2.3", _uid("waiting")), delay=250, error="503", not_found=False, now=T0
    )
    world.sharer.after_store([_instance("new")])
    world.kheops.answers = [KheopsUnavailable("503")]
    world.sharer.step()

    world.clock.now = T0 + 2
    world.sharer.step()  # "new" goes through: KHEOPS is back
    world.sharer.step()

    assert world.counts("all") == ShareCounts(shared=2)


def test_a_series_not_found_is_tried_a_few_times_then_failed_with_the_reason(
    world: _World,
) -> None:
    world.add_rule("all")
    world.sharer.after_store([_instance("a")])
    world.kheops.answers = [KheopsNotFound("share: KHEOPS answered 404 (Series Not Found)")] * 10

    for _ in range(NOT_FOUND_ATTEMPTS):
        world.sharer.step()
        world.clock.now += 300

    assert len(world.kheops.shares) == NOT_FOUND_ATTEMPTS
    assert world.counts("all") == ShareCounts(failed=1)
    rule = world.store.rule("all")
    assert rule is not None and rule.last_error is not None
    assert "Series Not Found" in rule.last_error
    assert f"after {NOT_FOUND_ATTEMPTS} tries" in rule.last_error


def test_a_series_not_found_then_found_is_shared(world: _World) -> None:
    world.add_rule("all")
    world.sharer.after_store([_instance("a")])
    world.kheops.answers = [KheopsNotFound("404")]

    world.sharer.step()
    assert world.counts("all") == ShareCounts(pending=1)
    world.clock.now += 2
    world.sharer.step()

    assert world.counts("all") == ShareCounts(shared=1)


def test_a_refused_share_marks_the_rule_failing_with_what_introspection_says(
    world: _World,
) -> None:
    world.add_rule("all")
    world.sharer.after_store([_instance("a"), _instance("b")])
    world.kheops.tokens[DESTINATION] = Introspection(True, frozenset({"read"}), "DEST")
    world.kheops.answers = [KheopsUnauthorized("share: KHEOPS answered 403")]

    world.sharer.step()

    assert len(world.kheops.shares) == 1
    assert world.counts("all") == ShareCounts(pending=2)
    reason = world.sharer.failing()["all"]
    assert "DestinationToken: lacks the write permission" in reason
    assert world.stored("all").failing == reason
    world.clock.now += 10
    assert not world.sharer.step()


def test_a_failing_rule_resumes_once_its_tokens_look_valid_again(world: _World) -> None:
    world.add_rule("all")
    world.sharer.prepare()
    world.sharer.after_store([_instance("a")])
    world.kheops.tokens[DESTINATION] = Introspection(True, frozenset({"read"}), "DEST")
    world.kheops.answers = [KheopsUnauthorized("403")]
    world.sharer.step()

    world.kheops.tokens[DESTINATION] = Introspection(True, frozenset({"write"}), "DEST")
    world.clock.now += 10
    world.sharer.step()
    assert world.counts("all") == ShareCounts(pending=1)  # not before the recheck

    world.clock.now += 30
    world.sharer.step()

    assert world.counts("all") == ShareCounts(shared=1)
    assert world.sharer.failing() == {}
    assert world.stored("all").failing is None


def test_a_refusal_with_valid_looking_tokens_points_at_admin_rights(world: _World) -> None:
    world.add_rule("all")
    world.sharer.after_store([_instance("a")])
    world.kheops.answers = [KheopsUnauthorized("share: KHEOPS answered 403")]

    world.sharer.step()

    assert "admin rights" in world.sharer.failing()["all"]


def test_another_refusal_fails_the_share_at_once(world: _World) -> None:
    world.add_rule("all")
    world.sharer.after_store([_instance("a")])
    world.kheops.answers = [KheopsRejected("share: KHEOPS answered 400")]

    world.sharer.step()

    assert world.counts("all") == ShareCounts(failed=1)


def test_a_share_older_than_the_maximum_age_fails_instead_of_waiting(
    store: RuleStoreApi,
) -> None:
    world = _make_world(store, MaximumAgeHours=1)
    world.add_rule("all")
    world.sharer.after_store([_instance("a")])
    world.kheops.answers = [KheopsUnavailable("503")]
    world.clock.now += 3600

    world.sharer.step()

    assert world.counts("all") == ShareCounts(failed=1)


def test_the_shares_of_a_disabled_rule_wait_until_it_is_enabled(world: _World) -> None:
    world.add_rule("r")
    world.sharer.after_store([_instance("a")])
    world.add_rule("r", Enabled=False)

    assert not world.sharer.step()
    assert world.counts("r") == ShareCounts(pending=1)

    world.add_rule("r", Enabled=True)
    world.sharer.step()
    assert world.counts("r") == ShareCounts(shared=1)


def test_the_shares_of_a_deleted_rule_are_never_made(world: _World) -> None:
    world.add_rule("r")
    world.sharer.after_store([_instance("a")])
    world.store.delete_rule("r")
    world.sharer.reload()

    world.sharer.step()

    assert world.kheops.shares == []


def test_a_rule_deleted_after_its_shares_were_claimed_is_never_shared_under(
    world: _World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another node deleted it, or the REST call is between its deletion and the reload."""
    world.add_rule("r")
    world.sharer.after_store([_instance("a")])
    claim = world.store.due_shares

    def claimed_then_deleted(*args: Any, **kwargs: Any) -> list[ShareJob]:
        jobs = claim(*args, **kwargs)
        world.store.delete_rule("r")
        return jobs

    monkeypatch.setattr(world.store, "due_shares", claimed_then_deleted)

    assert world.sharer.step()

    assert world.kheops.shares == []
    assert "r" not in world.sharer.rules


def test_a_condition_changed_in_the_state_before_the_worker_reloads_decides_the_share(
    world: _World,
) -> None:
    world.add_rule("r", CT)
    ct = _instance("a")
    _in_orthanc(world, ct, "CT")
    world.sharer.after_store([ct])
    rule = parse_rule(
        {"Name": "r", "DestinationToken": DESTINATION, "Condition": MR}, world.config, origin="api"
    )
    world.store.save_rule("r", origin="api", document=rule.document(), albums=None, now=T0)

    world.sharer.step()
    world.sharer.step()

    assert world.kheops.shares == []
    assert world.counts("r") == ShareCounts()


def test_a_rule_marked_failing_by_another_node_holds_its_shares_here_too(world: _World) -> None:
    world.add_rule("r")
    world.sharer.after_store([_instance("a")])
    world.store.set_failing("r", "DestinationToken is expired", now=T0)

    world.sharer.step()

    assert world.kheops.shares == []
    assert world.sharer.failing() == {"r": "DestinationToken is expired"}


def test_the_worker_thread_shares_what_after_store_queues(world: _World) -> None:
    world.add_rule("all")
    world.sharer.start()

    world.sharer.after_store([_instance("a")])

    wait_until(lambda: world.counts("all").shared == 1, timeout=10)
    world.sharer.stop(timeout=5)


# --- start-up -----------------------------------------------------------------------------------


def test_start_up_records_the_albums_and_marks_rules_whose_tokens_cannot_share(
    world: _World,
) -> None:
    world.add_rule("good")
    world.add_rule("bad", SourceToken="Revoked0123456789abcdef")
    world.store.set_albums("good", ("?", "?"))

    world.sharer.prepare()

    good = world.store.rule("good")
    assert good is not None
    assert (good.destination_album, good.source_album, good.failing) == ("DEST", "MAIN", None)
    assert "SourceToken: is not active" in world.sharer.failing()["bad"]


def test_start_up_leaves_rules_unchecked_while_kheops_is_unreachable(world: _World) -> None:
    world.add_rule("r", SourceToken="Revoked0123456789abcdef")
    world.kheops.reachable = False

    world.sharer.prepare()

    assert world.sharer.failing() == {}


def test_config_rules_replace_rest_rules_of_the_same_name(world: _World) -> None:
    world.add_rule("shared-name")
    world.sharer.after_store([_instance("a")])

    world.sharer.install_config_rules(
        [
            parse_rule(
                {"Name": "shared-name", "DestinationToken": DESTINATION, "Condition": MR},
                world.config,
                origin="config",
            )
        ]
    )

    rule = world.sharer.rules["shared-name"]
    assert (rule.origin, rule.condition.text) == ("config", MR)
    assert world.counts("shared-name") == ShareCounts()


# --- reading series back from Orthanc -----------------------------------------------------------


class _Loader:
    """Gives the instances by Orthanc id and remembers which were read."""

    def __init__(self, instances: dict[str, SentInstance | None]) -> None:
        self.instances = instances
        self.read: list[str] = []

    def __call__(self, orthanc_id: str) -> SentInstance | None:
        self.read.append(orthanc_id)
        return self.instances[orthanc_id]


def test_a_series_matches_at_its_first_matching_instance() -> None:
    load = _Loader(
        {"1": _instance("s", "MR"), "2": _instance("s", "CT", n=2), "3": _instance("s", n=3)}
    )

    verdict = evaluate_series(_rule("ct", CT).condition, OrthancSeries("S", ("1", "2", "3")), load)

    assert verdict.matches
    assert verdict.instance is not None and verdict.instance.orthanc_id == "s-2"
    assert verdict.read == 2
    assert load.read == ["1", "2"]


def test_a_series_without_a_match_is_described_by_its_first_instance() -> None:
    load = _Loader({"1": None, "2": _instance("s", "MR", n=2), "3": _instance("s", "MR", n=3)})

    verdict = evaluate_series(_rule("ct", CT).condition, OrthancSeries("S", ("1", "2", "3")), load)

    assert not verdict.matches
    assert verdict.instance is not None and verdict.instance.orthanc_id == "s-2"
    assert verdict.read == 2


def test_a_series_with_no_instance_to_read_does_not_match() -> None:
    verdict = evaluate_series(_rule("all", "").condition, OrthancSeries("S", ()), _Loader({}))

    assert (verdict.matches, verdict.instance, verdict.read) == (False, None, 0)


def test_resources_of_every_level_give_their_series_once_each() -> None:
    orthanc = _Orthanc()
    orthanc.levels = {"P": "patients", "St": "studies", "Se": "series", "I": "instances"}
    one = {"ID": "s1", "Instances": ["i1", "i2"]}
    two = {"ID": "s2", "Instances": ["i3"]}
    orthanc.documents = {
        "/patients/P/series": [one, two],
        "/studies/St/series": [two],
        "/series/Se": one,
        "/series/s2": two,
        "/instances/I": {"ParentSeries": "s2"},
    }

    found = series_of(orthanc, ["St", "I", "P", "Se"])

    assert found == [OrthancSeries("s2", ("i3",)), OrthancSeries("s1", ("i1", "i2"))]


def test_an_unknown_resource_is_reported() -> None:
    with pytest.raises(OrthancNotFound):
        series_of(_Orthanc(), ["nope"])


def test_an_instance_is_read_with_its_uids() -> None:
    orthanc = _Orthanc()
    orthanc.files["i"] = to_bytes(
        make_dataset(patient_id="P", patient_name="A^B", study_uid="1.2", series_uid="1.2.3")
    )

    instance = read_instance(orthanc, "i")

    assert instance is not None
    assert (instance.study_uid, instance.series_uid) == ("1.2", "1.2.3")
    assert instance.dataset.Modality == "CT"


def test_a_deleted_or_unreadable_instance_reads_as_none() -> None:
    orthanc = _Orthanc()
    orthanc.files["junk"] = b"not dicom"

    assert read_instance(orthanc, "deleted") is None
    assert read_instance(orthanc, "junk") is None


# --- the rule in force --------------------------------------------------------------------------


def _in_orthanc(world: _World, instance: SentInstance, modality: str) -> None:
    """Orthanc holds the instance, so that its series can be evaluated again."""
    world.orthanc.levels[instance.orthanc_id] = "instances"
    world.orthanc.documents[f"/instances/{instance.orthanc_id}"] = {"ParentSeries": "S"}
    world.orthanc.documents["/series/S"] = {"ID": "S", "Instances": [instance.orthanc_id]}
    world.orthanc.files[instance.orthanc_id] = to_bytes(
        make_dataset(
            patient_id="P",
            patient_name="A^B",
            study_uid=instance.study_uid,
            series_uid=instance.series_uid,
            modality=modality,
        )
    )


def test_a_pending_share_the_changed_condition_refuses_is_dropped_not_made(world: _World) -> None:
    world.add_rule("r", CT)
    ct = _instance("a")
    _in_orthanc(world, ct, "CT")
    world.sharer.after_store([ct])

    world.add_rule("r", MR)
    world.sharer.step()

    assert world.kheops.shares == []
    assert world.counts("r") == ShareCounts()


def test_a_pending_share_the_changed_condition_still_matches_is_made(world: _World) -> None:
    world.add_rule("r", CT)
    ct = _instance("a")
    _in_orthanc(world, ct, "CT")
    world.sharer.after_store([ct])

    world.add_rule("r", f"{CT} || {MR}")
    world.sharer.step()

    assert world.counts("r") == ShareCounts(shared=1)


def test_a_share_queued_from_an_older_snapshot_of_the_rules_is_evaluated_again(
    world: _World,
) -> None:
    """after_store evaluated rules read before a PUT; the PUT's condition decides."""
    world.add_rule("r", CT)
    snapshot = world.sharer.rules
    world.add_rule("r", MR)  # the PUT lands while after_store runs on the older snapshot
    ct = _instance("a")
    _in_orthanc(world, ct, "CT")
    keys, _ = matching_shares(snapshot.values(), [ct])
    world.store.add_shares(keys, now=T0)

    world.sharer.step()

    assert world.kheops.shares == []


def test_a_series_with_a_uid_kheops_cannot_carry_fails_at_once_with_the_reason(
    world: _World,
) -> None:
    world.add_rule("all")
    crafted = SentInstance("x-1", "1.2.3.4", "1.2.3", "1.2.3.4#x", Dataset())

    world.sharer.after_store([crafted])
    world.sharer.step()

    assert world.kheops.shares == []
    assert world.counts("all") == ShareCounts(failed=1)
    error = world.stored("all").last_error
    assert error is not None and "is not a DICOM UID" in error


def test_a_queued_share_with_a_uid_kheops_cannot_carry_fails_when_its_turn_comes(
    world: _World,
) -> None:
    """Queued by a version that did not check UIDs: the worker checks them again."""
    rule = world.add_rule("all")
    key = ShareKey("all", "1.2.3", "1.2.3.4#x")
    world.store.add_shares({key: decision(rule, "x-1")}, now=T0)

    world.sharer.step()

    assert world.kheops.shares == []
    assert world.counts("all") == ShareCounts(failed=1)
    error = world.stored("all").last_error
    assert error is not None and "is not a DICOM UID" in error


def test_a_404_while_the_source_token_cannot_send_marks_the_rule_failing(world: _World) -> None:
    world.add_rule("all")
    world.sharer.after_store([_instance("a")])
    world.kheops.tokens[MAIN] = Introspection(True, frozenset({"read", "write"}), "MAIN")
    world.kheops.answers = [KheopsNotFound("share: KHEOPS answered 404")]

    world.sharer.step()

    reason = world.sharer.failing()["all"]
    assert "lacks the send permission" in reason and "404" in reason
    assert world.counts("all") == ShareCounts(pending=1)
