"""Switching albums end to end: a real Orthanc with the plugin, and the KHEOPS test server.

Every test goes through `Env`, which records each REST answer; at teardown no clear token may
appear in any of them, nor in Orthanc's log.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.corpus import CorpusFile, make_dataset, new_uid, plan_corpus, to_bytes
from tests.kheops_server import KheopsTestServer
from tests.orthanc_process import OrthancFactory, OrthancProcess, OrthancStartError
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

FAST = {
    "Workers": 1,  # one sender: a later series shared proves an earlier one was evaluated
    "BatchLingerMilliseconds": 20,
    "RetryInitialSeconds": 0.05,
    "RetryMaximumSeconds": 0.3,
    "TokenRecheckSeconds": 0.3,
    "ConnectTimeoutSeconds": 2,
    "RequestTimeoutSeconds": 10,
}
CT = "tagValueIsPresent(#Tag.Modality, 'CT')"
MR = "tagValueIsPresent(#Tag.Modality, 'MR')"
Series = tuple[str, str]  # (study uid, series uid), as the test server lists them


class Env:
    """The KHEOPS test server with a main album, an Orthanc using it, and every answer seen."""

    def __init__(self, kheops: KheopsTestServer) -> None:
        self.kheops = kheops
        self.main_album = kheops.add_album()
        self.main_token = kheops.add_token(
            album_id=self.main_album, scope=("read", "write", "send")
        )
        self.tokens = [self.main_token]
        self.answers: list[str] = []
        self.orthancs: list[OrthancProcess] = []

    @property
    def orthanc(self) -> OrthancProcess:
        return self.orthancs[-1]

    def section(self, **fields: Any) -> dict[str, Any]:
        return {"Url": self.kheops.url, "Token": self.main_token, **FAST, **fields}

    def album(self, scope: Sequence[str] = ("write",)) -> tuple[str, str]:
        """A new destination album and a token of it."""
        album_id = self.kheops.add_album()
        return album_id, self.token(album_id, scope)

    def token(self, album_id: str | None, scope: Sequence[str] = ("write",)) -> str:
        token = self.kheops.add_token(album_id=album_id, scope=scope)
        self.tokens.append(token)
        return token

    # REST, recorded

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        response = self.orthanc.request(method, path, **kwargs)
        self.answers.append(response.text)
        return response

    def ok(self, method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
        response = self.call(method, path, **kwargs)
        assert response.status_code == status, response.text
        return response.json()

    def create(self, name: str, destination: str, condition: str = "", **fields: Any) -> Any:
        body = {"Name": name, "DestinationToken": destination, "Condition": condition, **fields}
        return self.ok("POST", "/kheops/rules", 201, json=body)

    def rule(self, name: str) -> dict[str, Any]:
        document: dict[str, Any] = self.ok("GET", f"/kheops/rules/{name}")
        return document

    def await_rule(self, name: str, predicate: Callable[[dict[str, Any]], object]) -> Any:
        def ready() -> dict[str, Any] | None:
            rule = self.rule(name)
            return rule if predicate(rule) else None

        return wait_until(ready, message=f"rule {name}")

    def await_shared(self, name: str, count: int) -> Any:
        """The rule once it has shared `count` series and has nothing pending."""
        return self.await_rule(
            name, lambda r: r["Counts"]["Shared"] == count and r["Counts"]["Pending"] == 0
        )

    def shares_of(self, series_uid: str) -> list[int | None]:
        """The statuses of the share requests KHEOPS received for a series."""
        return [
            r.status
            for r in self.kheops.requests
            if r.method == "PUT" and r.path.endswith(f"/series/{series_uid}")
        ]

    def sent(self, count: int) -> bool:
        return bool(self.ok("GET", "/kheops/status")["Counts"]["Sent"] >= count)

    def assert_no_token_shown(self) -> None:
        log = "".join(orthanc.log for orthanc in self.orthancs)
        for token in self.tokens:
            assert token not in log, "a token is in Orthanc's log"
            assert not [a for a in self.answers if token in a], "a token is in a REST answer"


@pytest.fixture
def env() -> Iterator[Env]:
    with KheopsTestServer() as kheops:
        made = Env(kheops)
        yield made
        made.assert_no_token_shown()


@pytest.fixture
def start(env: Env, orthanc_factory: OrthancFactory) -> Callable[..., OrthancProcess]:
    """Start an Orthanc with the plugin; keyword arguments go to the "Kheops" section."""

    def starting(**fields: Any) -> OrthancProcess:
        env.orthancs.append(orthanc_factory(kheops=env.section(**fields)))
        return env.orthanc

    return starting


def instance(study: str, series: str, modality: str = "CT", **attributes: Any) -> bytes:
    return to_bytes(
        make_dataset(
            patient_id="P-SWITCH",
            patient_name="SWITCH^ONE",
            study_uid=study,
            series_uid=series,
            modality=modality,
            **attributes,
        )
    )


def upload_series(env: Env, modality: str, *, count: int = 1, study: str | None = None) -> Series:
    study, series = study or new_uid(), new_uid()
    for number in range(1, count + 1):
        env.orthanc.upload(instance(study, series, modality, instance_number=number))
    return study, series


# --- sharing the right series -------------------------------------------------------------------


@pytest.fixture
def corpus(tmp_path: Path) -> list[CorpusFile]:
    files = plan_corpus(tmp_path / "corpus", studies=5, series_per_study=3, instances_per_series=2)
    for item in files:
        item.path.parent.mkdir(parents=True, exist_ok=True)
        item.path.write_bytes(to_bytes(item.dataset()))
    return files


def series_where(
    files: Sequence[CorpusFile], keep: Callable[[dict[str, Any]], bool]
) -> set[Series]:
    return {(f.study_uid, f.series_uid) for f in files if keep(dict(f.attributes))}


def test_several_rules_share_exactly_the_matching_series_into_each_album(
    env: Env, start: Callable[..., OrthancProcess], corpus: list[CorpusFile]
) -> None:
    albums = {name: env.album() for name in ("ct", "neuro", "mr-not-chest", "all", "off")}
    start(SwitchingAlbums=[{"Name": "all", "DestinationToken": albums["all"][1]}])
    env.create("ct", albums["ct"][1], CT)
    env.create(
        "neuro",
        albums["neuro"][1],
        "tagValueContains(#Tag.StudyDescription, 'CEREBRALE')"
        " || tagValueIsPresent(#Tag.StationName, 'CT5678')",
    )
    env.create(
        "mr-not-chest",
        albums["mr-not-chest"][1],
        f"{MR} and not tagValueIsPresent(#Tag.BodyPartExamined, 'CHEST')",
    )
    env.create("off", albums["off"][1], Enabled=False)

    env.orthanc.storescu([f.path for f in corpus])

    expected = {
        "ct": series_where(corpus, lambda a: a["modality"] == "CT"),
        "neuro": series_where(
            corpus,
            lambda a: "CEREBRALE" in a["study_description"] or a["StationName"] == "CT5678",
        ),
        "mr-not-chest": series_where(
            corpus, lambda a: a["modality"] == "MR" and a["BodyPartExamined"] != "CHEST"
        ),
        "all": series_where(corpus, lambda a: True),
        "off": set(),
    }
    assert all(0 < len(expected[name]) < 15 for name in ("ct", "neuro", "mr-not-chest"))
    for name, series in expected.items():
        rule = env.await_shared(name, len(series))
        assert env.kheops.album_series(albums[name][0]) == series, name
        assert rule["Counts"] == {
            "SeriesMatched": len(series),
            "Shared": len(series),
            "Pending": 0,
            "Failed": 0,
        }
    assert env.kheops.album_series(env.main_album) == expected["all"]


def test_a_series_is_shared_once_its_first_matching_instance_is_stored_and_only_once(
    env: Env, start: Callable[..., OrthancProcess]
) -> None:
    album, token = env.album()
    start()
    env.create("derived", token, "tagValueContains(#Tag.ImageType, 'DERIVED')")
    study, series = new_uid(), new_uid()
    fence = upload_series(env, "CT")  # an instance alone in its series, matching nothing

    env.orthanc.upload(instance(study, series, instance_number=1))
    wait_until(lambda: env.sent(2))
    assert env.rule("derived")["Counts"]["SeriesMatched"] == 0

    derived = ["DERIVED", "SECONDARY"]
    env.orthanc.upload(instance(study, series, instance_number=2, ImageType=derived))
    env.await_rule("derived", lambda r: r["Counts"]["Shared"] == 1)
    third = make_dataset(
        patient_id="P-SWITCH",
        patient_name="SWITCH^ONE",
        study_uid=study,
        series_uid=series,
        instance_number=3,
        ImageType=derived,
    )
    env.orthanc.upload(to_bytes(third))

    wait_until(lambda: third.SOPInstanceUID in env.kheops.album_instances(album))
    wait_until(lambda: env.sent(4))
    assert env.kheops.album_series(album) == {(study, series)}
    assert fence not in env.kheops.album_series(album)
    assert env.shares_of(series) == [201]
    assert env.rule("derived")["Counts"]["SeriesMatched"] == 1


# --- saving rules -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def validating(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """One Orthanc for the tests that only save rules (or fail to)."""
    with KheopsTestServer() as kheops:
        made = Env(kheops)
        orthanc = OrthancProcess(
            tmp_path_factory.mktemp("switching-validation"), kheops=made.section()
        )
        made.orthancs.append(orthanc)
        with orthanc:
            yield made
        made.assert_no_token_shown()


def _revoked(env: Env) -> str:
    token = env.album()[1]
    env.kheops.revoke_token(token)
    return token


INVALID: dict[str, tuple[Callable[[Env], dict[str, Any]], str, str]] = {
    "name that is not url-safe": (
        lambda env: {"Name": "cardio cohort", "DestinationToken": env.album()[1]},
        "Name",
        "is not a rule name",
    ),
    "condition with an unknown keyword": (
        lambda env: {
            "Name": "bad-condition",
            "DestinationToken": env.album()[1],
            "Condition": "tagValueIsPresent(#Tag.Modalityy, 'CT')",
        },
        "Condition",
        "unknown DICOM keyword 'Modalityy' at column 24",
    ),
    "inactive destination token": (
        lambda env: {"Name": "inactive", "DestinationToken": _revoked(env)},
        "DestinationToken",
        "is not active",
    ),
    "user token as destination": (
        lambda env: {"Name": "user", "DestinationToken": env.token(None, ("read", "write"))},
        "DestinationToken",
        "is a user token",
    ),
    "destination token without write": (
        lambda env: {"Name": "no-write", "DestinationToken": env.album(("read", "send"))[1]},
        "DestinationToken",
        "lacks the write permission",
    ),
    "source token without send": (
        lambda env: {
            "Name": "no-send",
            "DestinationToken": env.album()[1],
            "SourceToken": env.token(env.main_album, ("read", "write")),
        },
        "SourceToken",
        "lacks the send permission",
    ),
    "destination in the source album": (
        lambda env: {"Name": "same", "DestinationToken": env.token(env.main_album, ("write",))},
        "DestinationToken",
        "the source album itself",
    ),
    "url of another kheops": (
        lambda env: {
            "Name": "elsewhere",
            "DestinationToken": env.album()[1],
            "Url": "https://kheops.elsewhere.example.org",
        },
        "Url",
        "sharing only works within one KHEOPS",
    ),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_an_invalid_rule_is_refused_with_400_naming_its_field(validating: Env, case: str) -> None:
    make, field, words = INVALID[case]
    body = make(validating)

    response = validating.call("POST", "/kheops/rules", json=body)

    assert response.status_code == 400, response.text
    answer = response.json()
    assert answer["Field"] == field
    assert answer["Message"].startswith(f"{field}: ")
    assert words in answer["Message"]
    assert body["Name"] not in [r["Name"] for r in validating.ok("GET", "/kheops/rules")]


def test_a_rule_is_not_saved_and_502_says_why_while_kheops_cannot_be_asked(
    validating: Env,
) -> None:
    token = validating.album()[1]
    validating.kheops.set_down(True)
    try:
        response = validating.call(
            "POST", "/kheops/rules", json={"Name": "while-down", "DestinationToken": token}
        )
    finally:
        validating.kheops.set_down(False)

    assert response.status_code == 502, response.text
    assert "nothing was saved" in response.json()["Message"]
    assert validating.call("GET", "/kheops/rules/while-down").status_code == 404


def test_a_second_rule_with_the_same_name_is_refused_with_409(validating: Env) -> None:
    token = validating.album()[1]
    validating.create("twice", token)

    response = validating.call(
        "POST", "/kheops/rules", json={"Name": "twice", "DestinationToken": token}
    )

    assert response.status_code == 409
    assert response.json()["Field"] == "Name"


def test_a_saved_rule_shows_its_album_and_masked_tokens(validating: Env) -> None:
    album, token = validating.album()

    created = validating.create("shown", token, CT)

    assert created["Source"] == "api" and not created["ReadOnly"]
    assert created["DestinationAlbumId"] == album
    assert created["SourceAlbumId"] == validating.main_album
    assert created["DestinationToken"] == f"{token[:4]}…{token[-2:]}"
    assert created["SourceIsMainToken"]
    assert created["State"] == "active"
    assert validating.rule("shown") == created


def test_put_changes_only_the_fields_given_and_checks_the_rule_again(validating: Env) -> None:
    album, token = validating.album()
    validating.create("changing", token, CT)

    changed = validating.ok("PUT", "/kheops/rules/changing", json={"Condition": MR})
    refused = validating.call("PUT", "/kheops/rules/changing", json={"Condition": "nope"})
    renamed = validating.call("PUT", "/kheops/rules/changing", json={"Name": "other"})

    assert (changed["Condition"], changed["DestinationAlbumId"]) == (MR, album)
    assert (refused.status_code, refused.json()["Field"]) == (400, "Condition")
    assert (renamed.status_code, renamed.json()["Field"]) == (400, "Name")
    assert validating.rule("changing")["Condition"] == MR


def test_a_rule_can_be_disabled_while_kheops_cannot_be_asked(validating: Env) -> None:
    validating.create("switch-off", validating.album()[1])
    validating.kheops.set_down(True)
    try:
        disabled = validating.ok("PUT", "/kheops/rules/switch-off", json={"Enabled": False})
    finally:
        validating.kheops.set_down(False)

    assert (disabled["Enabled"], disabled["State"]) == (False, "disabled")


def test_unknown_rules_answer_404(validating: Env) -> None:
    for method in ("GET", "PUT", "DELETE"):
        assert validating.call(method, "/kheops/rules/nobody", json={}).status_code == 404


# --- configuration rules ------------------------------------------------------------------------


def test_configured_rules_are_listed_as_such_and_are_read_only(
    env: Env, start: Callable[..., OrthancProcess]
) -> None:
    album, token = env.album()
    start(SwitchingAlbums=[{"Name": "from-config", "DestinationToken": token, "Condition": CT}])

    rule = env.await_rule("from-config", lambda r: r["DestinationAlbumId"] == album)
    put = env.call("PUT", "/kheops/rules/from-config", json={"Enabled": False})
    delete = env.call("DELETE", "/kheops/rules/from-config")

    assert (rule["Source"], rule["ReadOnly"]) == ("config", True)
    assert put.status_code == delete.status_code == 403
    assert "Kheops.SwitchingAlbums" in put.json()["Message"]
    study, series = upload_series(env, "CT")
    env.await_rule("from-config", lambda r: r["Counts"]["Shared"] == 1)
    assert env.kheops.album_series(album) == {(study, series)}


def test_an_invalid_configured_rule_stops_orthanc_naming_the_field(
    env: Env, orthanc_factory: OrthancFactory
) -> None:
    token = env.album()[1]
    rules = [
        {"Name": "a", "DestinationToken": token},
        {"Name": "b", "DestinationToken": token},
        {"Name": "c", "DestinationToken": token, "Condition": "tagValueIsPresent(Tag.Modality)"},
    ]
    orthanc = orthanc_factory(kheops=env.section(SwitchingAlbums=rules), start=False)
    env.orthancs.append(orthanc)

    with pytest.raises(OrthancStartError):
        orthanc.start(timeout=30)

    assert "Kheops.SwitchingAlbums[2].Condition: " in orthanc.log


# --- failures and recovery ----------------------------------------------------------------------


def test_shares_refused_with_503_are_retried_until_kheops_answers(
    env: Env, start: Callable[..., OrthancProcess]
) -> None:
    album, token = env.album()
    start()
    env.create("r", token)
    env.kheops.fail_next(3, status=503, method="PUT")

    study, series = upload_series(env, "CT")

    env.await_shared("r", 1)
    assert env.shares_of(series) == [503, 503, 503, 201]
    assert env.kheops.album_series(album) == {(study, series)}


def test_a_series_not_found_at_first_is_shared_once_kheops_finds_it(
    env: Env, start: Callable[..., OrthancProcess]
) -> None:
    album, token = env.album()
    start()
    env.create("r", token)
    env.kheops.fail_next(2, status=404, method="PUT")

    study, series = upload_series(env, "CT")

    env.await_shared("r", 1)
    assert env.shares_of(series) == [404, 404, 201]
    assert env.kheops.album_series(album) == {(study, series)}


def test_a_series_never_found_fails_with_the_reason_and_retry_shares_it(
    env: Env, start: Callable[..., OrthancProcess]
) -> None:
    album, token = env.album()
    start()
    env.create("r", token)
    env.kheops.fail_next(100, status=404, method="PUT")

    study, series = upload_series(env, "CT")
    failed = env.await_rule("r", lambda r: r["Counts"]["Failed"] == 1)
    env.kheops.reset_faults()
    retried = env.ok("POST", "/kheops/rules/r/retry")

    assert "404" in failed["LastError"] and "tries" in failed["LastError"]
    assert retried["Retried"] == 1
    env.await_shared("r", 1)
    assert env.kheops.album_series(album) == {(study, series)}


def test_a_rule_refused_with_403_waits_until_its_token_is_fixed(
    env: Env, start: Callable[..., OrthancProcess]
) -> None:
    album, token = env.album()
    start()
    env.create("r", token)
    env.kheops.set_scope(token, ["read"])

    study, series = upload_series(env, "CT")
    failing = env.await_rule("r", lambda r: r["State"] == "failing")
    assert "DestinationToken: lacks the write permission" in failing["StateDetail"]
    assert failing["Counts"]["Pending"] == 1
    assert env.ok("GET", "/kheops/status")["SwitchingAlbums"]["Failing"] == ["r"]

    env.kheops.set_scope(token, ["write"])

    fixed = env.await_shared("r", 1)
    assert fixed["State"] == "active"
    assert env.kheops.album_series(album) == {(study, series)}


def test_a_rule_refused_although_its_tokens_look_valid_resumes_with_a_new_token(
    env: Env, start: Callable[..., OrthancProcess]
) -> None:
    album, token = env.album()
    start()
    env.create("r", token)
    env.kheops.deny_token(token)

    study, series = upload_series(env, "CT")
    failing = env.await_rule("r", lambda r: r["State"] == "failing")
    assert "admin rights" in failing["StateDetail"]

    replacement = env.token(album)
    env.ok("PUT", "/kheops/rules/r", json={"DestinationToken": replacement})

    env.await_shared("r", 1)
    assert env.kheops.album_series(album) == {(study, series)}


# --- changing rules -----------------------------------------------------------------------------


def test_a_changed_condition_applies_to_instances_stored_from_then_on(
    env: Env, start: Callable[..., OrthancProcess]
) -> None:
    album, token = env.album()
    start()
    env.create("r", token, CT)
    before = upload_series(env, "CT")
    env.await_shared("r", 1)

    env.ok("PUT", "/kheops/rules/r", json={"Condition": MR})
    ct_after = upload_series(env, "CT")
    mr_after = upload_series(env, "MR")

    env.await_shared("r", 2)
    wait_until(lambda: env.sent(3))
    assert env.kheops.album_series(album) == {before, mr_after}
    assert ct_after not in env.kheops.album_series(album)


def test_a_disabled_rule_shares_nothing_new(env: Env, start: Callable[..., OrthancProcess]) -> None:
    off_album, off_token = env.album()
    fence_album, fence_token = env.album()
    start()
    env.create("off", off_token)
    env.create("fence", fence_token)
    env.ok("PUT", "/kheops/rules/off", json={"Enabled": False})

    series = upload_series(env, "CT")

    env.await_shared("fence", 1)
    assert env.kheops.album_series(fence_album) == {series}
    assert env.kheops.album_series(off_album) == set()
    assert env.rule("off")["Counts"]["SeriesMatched"] == 0


def test_deleting_a_rule_drops_its_pending_shares(
    env: Env, start: Callable[..., OrthancProcess]
) -> None:
    gone_album, gone_token = env.album()
    fence_album, fence_token = env.album()
    start()
    env.create("gone", gone_token)
    env.kheops.fail_next(1000, status=503, method="PUT")
    upload_series(env, "CT")
    env.await_rule("gone", lambda r: r["Counts"]["Pending"] == 1)

    deleted = env.ok("DELETE", "/kheops/rules/gone")
    env.kheops.reset_faults()
    env.create("fence", fence_token)
    fence = upload_series(env, "MR")

    assert deleted == {"Deleted": "gone", "DroppedPendingShares": 1}
    env.await_shared("fence", 1)
    assert env.kheops.album_series(fence_album) == {fence}
    assert env.kheops.album_series(gone_album) == set()
    assert env.call("GET", "/kheops/rules/gone").status_code == 404


# --- restarts -----------------------------------------------------------------------------------


def test_rules_and_pending_shares_survive_a_restart(
    env: Env, start: Callable[..., OrthancProcess]
) -> None:
    album, token = env.album()
    orthanc = start()
    created = env.create("kept", token, CT)
    env.kheops.fail_next(10_000, status=503, method="PUT")
    study, series = upload_series(env, "CT")
    env.await_rule("kept", lambda r: r["Counts"]["Pending"] == 1)

    orthanc.stop()
    env.kheops.reset_faults()
    orthanc.start()

    rule = env.await_shared("kept", 1)
    assert {k: rule[k] for k in ("Source", "Condition", "DestinationToken", "CreatedAt")} == {
        k: created[k] for k in ("Source", "Condition", "DestinationToken", "CreatedAt")
    }
    assert env.kheops.album_series(album) == {(study, series)}


def test_shares_pending_when_orthanc_is_killed_are_made_after_it_starts_again(
    env: Env, start: Callable[..., OrthancProcess]
) -> None:
    album, token = env.album()
    orthanc = start()
    env.create("kept", token)
    env.kheops.fail_next(10_000, status=503, method="PUT")
    study, series = upload_series(env, "MR")
    env.await_rule("kept", lambda r: r["Counts"]["Pending"] == 1)

    orthanc.kill()
    env.kheops.reset_faults()
    orthanc.start()

    env.await_shared("kept", 1)
    assert env.kheops.album_series(album) == {(study, series)}


# --- dry run and apply --------------------------------------------------------------------------


def _study_of(env: Env, study_uid: str) -> str:
    found = env.ok("POST", "/tools/lookup", data=study_uid)
    return str(found[0]["ID"])


def test_the_dry_run_reports_each_series_with_the_values_read_and_shares_nothing(
    env: Env, start: Callable[..., OrthancProcess]
) -> None:
    start()
    study = new_uid()
    ct = upload_series(env, "CT", count=2, study=study)
    mr = upload_series(env, "MR", study=study)
    condition = f"{CT} && tagIsPresent(#Tag.StationName)"

    answer = env.ok(
        "POST",
        "/kheops/rules/test",
        json={"Condition": condition, "Resources": [_study_of(env, study)]},
    )

    assert answer["Tags"] == ["Modality", "StationName"]
    assert answer["Matched"] == 1
    by_series = {s["SeriesInstanceUID"]: s for s in answer["Series"]}
    assert set(by_series) == {ct[1], mr[1]}
    assert by_series[ct[1]]["Matches"] and by_series[ct[1]]["InstancesRead"] == 1
    assert by_series[ct[1]]["Instances"] == 2
    assert by_series[ct[1]]["Values"] == {"Modality": "CT", "StationName": "CT01"}
    assert not by_series[mr[1]]["Matches"]
    assert by_series[mr[1]]["Values"] == {"Modality": "MR", "StationName": "MR01"}
    assert [r for r in env.kheops.requests if r.method == "PUT"] == []


def test_the_dry_run_refuses_a_bad_condition_and_an_unknown_resource(
    env: Env, start: Callable[..., OrthancProcess]
) -> None:
    start()

    some_id = "0123abcd-0123abcd-0123abcd-0123abcd-0123abcd"
    bad = env.call("POST", "/kheops/rules/test", json={"Condition": "x(", "Resources": [some_id]})
    unknown = env.call("POST", "/kheops/rules/test", json={"Condition": "", "Resources": [some_id]})
    not_an_id = env.call("POST", "/kheops/rules/test", json={"Resources": ["../nope"]})

    assert (bad.status_code, bad.json()["Field"]) == (400, "Condition")
    assert (unknown.status_code, unknown.json()["Field"]) == (404, "Resources")
    assert (not_an_id.status_code, not_an_id.json()["Field"]) == (400, "Resources")


def test_apply_shares_the_matching_series_already_in_the_main_album(
    env: Env, start: Callable[..., OrthancProcess]
) -> None:
    album, token = env.album()
    start()
    study = new_uid()
    ct = upload_series(env, "CT", count=2, study=study)
    mr = upload_series(env, "MR", study=study)
    other_ct = upload_series(env, "CT")
    wait_until(lambda: env.sent(4))
    env.create("late", token, CT)

    applied = env.ok(
        "POST", "/kheops/rules/late/apply", json={"Resources": [_study_of(env, study)]}
    )

    assert applied == {
        "Rule": "late",
        "Series": 2,
        "NotInMainAlbum": 0,
        "Matched": 1,
        "Queued": 1,
        "NotShareable": 0,
    }
    env.await_shared("late", 1)
    assert env.kheops.album_series(album) == {ct}
    assert mr not in env.kheops.album_series(album) and other_ct not in env.kheops.album_series(
        album
    )


def test_status_summarises_the_rules(env: Env, start: Callable[..., OrthancProcess]) -> None:
    start(SwitchingAlbums=[{"Name": "cfg", "DestinationToken": env.album()[1]}])
    env.create("api", env.album()[1], Enabled=False)
    upload_series(env, "CT")
    env.await_shared("cfg", 1)

    summary = env.ok("GET", "/kheops/status")["SwitchingAlbums"]

    assert summary == {
        "Rules": 2,
        "Enabled": 1,
        "Failing": [],
        "Shares": {"Pending": 0, "Shared": 1, "Failed": 0},
    }
