"""Pending shares follow the rule in force, UIDs never reach a URL unchecked, and a share 404
is explained: a real Orthanc with the plugin, and the KHEOPS test server."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.corpus import make_dataset, new_uid, to_bytes
from tests.integration.test_switching import CT, MR, Env, env, start, upload_series
from tests.orthanc_process import OrthancProcess
from tests.waiting import wait_until

pytestmark = pytest.mark.integration
__all__ = ["env", "start"]  # fixtures shared with test_switching


def _puts(env: Env) -> list[str]:
    return [r.path for r in env.kheops.requests if r.method == "PUT"]


def test_a_condition_narrowed_while_shares_wait_shares_only_what_it_still_matches(
    env: Env, start: Callable[..., OrthancProcess]
) -> None:
    album, token = env.album()
    start()
    env.create("r", token, f"{CT} || {MR}")
    env.kheops.fail_next(10_000, status=503, method="PUT")
    ct = upload_series(env, "CT")
    mr = upload_series(env, "MR")
    env.await_rule("r", lambda r: r["Counts"]["Pending"] == 2)

    env.ok("PUT", "/kheops/rules/r", json={"Condition": MR})
    env.kheops.reset_faults()
    mr_after = upload_series(env, "MR")

    env.await_rule("r", lambda r: r["Counts"]["Shared"] == 2 and r["Counts"]["Pending"] == 0)
    assert env.kheops.album_series(album) == {mr, mr_after}
    assert ct not in env.kheops.album_series(album)


def test_disable_edit_enable_does_not_share_on_the_old_decision(
    env: Env, start: Callable[..., OrthancProcess]
) -> None:
    album, token = env.album()
    start()
    env.create("r", token, CT)
    env.kheops.fail_next(10_000, status=503, method="PUT")
    ct = upload_series(env, "CT")
    env.await_rule("r", lambda r: r["Counts"]["Pending"] == 1)

    env.ok("PUT", "/kheops/rules/r", json={"Enabled": False})
    env.ok("PUT", "/kheops/rules/r", json={"Condition": MR})
    env.kheops.reset_faults()
    env.ok("PUT", "/kheops/rules/r", json={"Enabled": True})
    mr = upload_series(env, "MR")

    env.await_shared("r", 1)
    assert env.kheops.album_series(album) == {mr}
    assert env.shares_of(ct[1]) == [503] * len(env.shares_of(ct[1]))


def test_a_new_destination_token_drops_the_shares_decided_for_the_old_album(
    env: Env, start: Callable[..., OrthancProcess]
) -> None:
    old_album, old_token = env.album()
    new_album, new_token = env.album()
    start()
    env.create("r", old_token)
    env.kheops.fail_next(10_000, status=503, method="PUT")
    before = upload_series(env, "CT")
    env.await_rule("r", lambda r: r["Counts"]["Pending"] == 1)

    env.ok("PUT", "/kheops/rules/r", json={"DestinationToken": new_token})
    env.kheops.reset_faults()
    after = upload_series(env, "CT")

    env.await_shared("r", 1)
    assert env.kheops.album_series(new_album) == {after}
    assert env.kheops.album_series(old_album) == set()
    assert before not in env.kheops.album_series(new_album)


def test_a_configuration_rule_changed_at_start_does_not_share_what_it_no_longer_matches(
    env: Env, start: Callable[..., OrthancProcess]
) -> None:
    album, token = env.album()
    orthanc = start(SwitchingAlbums=[{"Name": "cfg", "DestinationToken": token, "Condition": CT}])
    env.kheops.fail_next(10_000, status=503, method="PUT")
    ct = upload_series(env, "CT")
    env.await_rule("cfg", lambda r: r["Counts"]["Pending"] == 1)
    orthanc.stop()

    env.kheops.reset_faults()
    orthanc.config["Kheops"]["SwitchingAlbums"][0]["Condition"] = MR
    orthanc.start()
    mr = upload_series(env, "MR")

    env.await_shared("cfg", 1)
    assert env.kheops.album_series(album) == {mr}
    assert ct not in env.kheops.album_series(album)


def _crafted(study: str, series: str, modality: str = "CT") -> bytes:
    return to_bytes(
        make_dataset(
            patient_id="P-SWITCH",
            patient_name="SWITCH^ONE",
            study_uid=study,
            series_uid=series,
            modality=modality,
        )
    )


# pydicom, here and in the KHEOPS test server, warns about the invalid UI values.
@pytest.mark.filterwarnings("ignore:.*Invalid value for VR UI")
def test_a_crafted_uid_shares_nothing_but_what_matches_and_fails_with_the_reason(
    env: Env, start: Callable[..., OrthancProcess]
) -> None:
    album, token = env.album()
    start()
    env.create("ct", token, CT)
    other = upload_series(env, "MR")  # a series the rule must never share
    env.orthanc.upload(_crafted(other[0], f"{other[1]}#x"))
    env.orthanc.upload(_crafted("1.2.3/../../../x", new_uid()))
    fence = upload_series(env, "CT")

    rule = env.await_rule("ct", lambda r: r["Counts"]["Shared"] == 1 and r["Counts"]["Failed"] == 2)
    assert env.kheops.album_series(album) == {fence}
    assert (
        "is not a DICOM UID" in rule["LastError"] and "KHEOPS cannot share it" in rule["LastError"]
    )
    assert _puts(env) == [f"/api/studies/{fence[0]}/series/{fence[1]}"]


def test_a_source_token_stripped_of_send_marks_the_rule_failing_naming_the_reason(
    env: Env, start: Callable[..., OrthancProcess]
) -> None:
    album, token = env.album()
    source = env.token(env.main_album, ("read", "send"))
    start()
    env.create("r", token, SourceToken=source)
    env.kheops.set_scope(source, ["read"])

    study, series = upload_series(env, "CT")

    failing = env.await_rule("r", lambda r: r["State"] == "failing")
    assert "SourceToken" in failing["StateDetail"] and "send" in failing["StateDetail"]
    assert failing["Counts"]["Pending"] == 1
    env.kheops.set_scope(source, ["read", "send"])
    env.await_shared("r", 1)
    assert env.kheops.album_series(album) == {(study, series)}
    wait_until(lambda: env.rule("r")["State"] == "active")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB file system for the plugin's state, to fill up (a tmpfs: needs root)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace')[:200]}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as out:  # unbuffered: closing has nothing left to write
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    return filler


def test_a_rule_saved_while_the_disk_is_full_is_a_503_with_the_cause_and_nothing_is_saved(
    small_disk: Path, env: Env, start: Callable[..., OrthancProcess]
) -> None:
    token = env.album()[1]
    start(StateDirectory=str(small_disk / "state"))
    filler = _fill(small_disk)

    full = env.call("POST", "/kheops/rules", json={"Name": "full", "DestinationToken": token})
    listed = env.call("GET", "/kheops/rules")
    filler.unlink()
    saved = env.call("POST", "/kheops/rules", json={"Name": "full", "DestinationToken": token})

    assert full.status_code == 503, full.text
    assert "disk is full" in full.json()["Message"]
    assert listed.status_code == 200 and listed.json() == []
    assert saved.status_code == 201, saved.text
