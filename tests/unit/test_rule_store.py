"""The durable switching state: a real RuleStore in a temporary folder."""

from __future__ import annotations

import json
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orthanc_kheops.state.backend import RuleStoreApi
from orthanc_kheops.state.rule_store import (
    SCHEMA_VERSION,
    Decision,
    RuleStore,
    ShareCounts,
    ShareKey,
    StoredRule,
    destination_identity,
)

T0 = 1_000_000.0
TOKEN_A = "TokenAAAAAAAAAAAAAAAAAAA"
TOKEN_B = "TokenBBBBBBBBBBBBBBBBBBB"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "switching.sqlite3"


def _doc(name: str = "r", token: str = TOKEN_A, **fields: Any) -> dict[str, Any]:
    return {"Name": name, "DestinationToken": token, "Condition": "", "Enabled": True, **fields}


def _save(store: RuleStoreApi, name: str = "r", *, origin: str = "api", **fields: Any) -> None:
    store.save_rule(
        name, origin=origin, document=_doc(name, **fields), albums=("DEST", "MAIN"), now=T0
    )


def _stored(store: RuleStoreApi, name: str = "r") -> StoredRule:
    rule = store.rule(name)
    assert rule is not None, f"no rule {name!r}"
    return rule


def _key(series: str, rule: str = "r") -> ShareKey:
    return ShareKey(rule, "1.2.study", series)


def _decided(*keys: ShareKey) -> dict[ShareKey, Decision]:
    return {key: Decision("", "destination", f"instance-{key.series_uid}") for key in keys}


def _states(store: RuleStoreApi, rule: str = "r") -> dict[str, str]:
    return {
        job.key.series_uid: state
        for state in ("pending", "shared", "failed")
        for job in store.shares(rule, state=state, limit=100)
    }


# --- the file -----------------------------------------------------------------------------------


@pytest.fixture
def sqlite_store(path: Path) -> Iterator[RuleStore]:
    opened = RuleStore(path)
    yield opened
    opened.close()


def test_the_file_is_readable_by_its_owner_only(sqlite_store: RuleStore, path: Path) -> None:
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_rules_are_kept_as_json_and_survive_reopening(sqlite_store: RuleStore, path: Path) -> None:
    _save(sqlite_store, Condition="tagIsPresent('00100010')")
    sqlite_store.close()

    reopened = RuleStore(path)
    try:
        assert _stored(reopened).document["Condition"] == "tagIsPresent('00100010')"
    finally:
        reopened.close()
    raw = sqlite3.connect(path).execute("SELECT document FROM rules").fetchone()[0]
    assert json.loads(raw)["Name"] == "r"


def test_a_state_file_of_another_schema_version_is_refused(path: Path) -> None:
    RuleStore(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()

    with pytest.raises(RuntimeError, match="schema version"):
        RuleStore(path)


def test_a_stored_rule_does_not_show_its_tokens_in_its_repr(store: RuleStoreApi) -> None:
    _save(store)

    assert TOKEN_A not in repr(store.rule("r"))


# --- rules --------------------------------------------------------------------------------------


def test_a_saved_rule_has_its_origin_albums_and_times(store: RuleStoreApi) -> None:
    _save(store)

    rule = store.rule("r")
    assert rule is not None
    assert (rule.origin, rule.destination_album, rule.source_album) == ("api", "DEST", "MAIN")
    assert (rule.created_at, rule.updated_at, rule.failing) == (T0, T0, None)


def test_saving_a_rule_again_ends_its_failure(store: RuleStoreApi) -> None:
    _save(store)
    store.set_failing("r", "DestinationToken: is not active", now=T0)

    _save(store)

    assert _stored(store, "r").failing is None


def test_a_failing_rule_keeps_the_time_it_started_failing(store: RuleStoreApi) -> None:
    _save(store)
    store.set_failing("r", "first", now=T0)
    store.set_failing("r", "second", now=T0 + 10)

    rule = store.rule("r")
    assert rule is not None
    assert (rule.failing, rule.failing_since, rule.last_error_at) == ("second", T0, T0 + 10)


def test_deleting_a_rule_drops_its_shares(store: RuleStoreApi) -> None:
    _save(store)
    _save(store, "other")
    store.add_shares(_decided(_key("s1"), _key("s2", "other"), _key("s3")), now=T0)
    store.mark_shared(_key("s3"), now=T0)

    assert store.delete_rule("r") == 1  # the pending shares dropped

    assert store.rule("r") is None
    assert set(store.counts()) == {"other"}
    assert store.delete_rule("r") is None


def test_a_new_destination_forgets_every_share_pending_ones_included(store: RuleStoreApi) -> None:
    """A pending share was decided for the old album: the new one must not receive it."""
    _save(store)
    store.add_shares(_decided(_key("done"), _key("waiting")), now=T0)
    store.mark_shared(_key("done"), now=T0)

    dropped = store.save_rule(
        "r", origin="api", document=_doc(token=TOKEN_B), albums=("NEW", "MAIN"), now=T0
    )

    assert (dropped, _states(store)) == (1, {})


def test_a_new_token_of_the_same_album_keeps_the_pending_shares_for_it(store: RuleStoreApi) -> None:
    _save(store)
    store.add_shares({_key("waiting"): Decision("", destination_identity(TOKEN_A), "i")}, now=T0)

    dropped = store.save_rule(
        "r", origin="api", document=_doc(token=TOKEN_B), albums=("DEST", "MAIN"), now=T0
    )

    [job] = store.due_shares(["r"], now=T0, limit=10)
    assert dropped == 0
    assert job.decision == Decision("", destination_identity(TOKEN_B), "i")


def test_a_share_records_what_it_was_decided_under(store: RuleStoreApi) -> None:
    _save(store)
    store.add_shares(_decided(_key("s")), now=T0)

    [job] = store.due_shares(["r"], now=T0, limit=10)

    assert job.decision == Decision("", "destination", "instance-s")


def test_a_version_1_file_is_migrated_and_its_pending_shares_have_no_decision(
    path: Path,
) -> None:
    path.parent.mkdir(parents=True)
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        " INSERT INTO meta VALUES ('schema_version', '1');"
        " CREATE TABLE rules (name TEXT PRIMARY KEY, origin TEXT NOT NULL, document TEXT NOT NULL,"
        " destination_album TEXT, source_album TEXT, failing TEXT, failing_since REAL,"
        " last_error TEXT, last_error_at REAL, created_at REAL NOT NULL, updated_at REAL NOT NULL);"
        " CREATE TABLE shares (rule TEXT NOT NULL REFERENCES rules (name) ON DELETE CASCADE,"
        " study_uid TEXT NOT NULL, series_uid TEXT NOT NULL, state TEXT NOT NULL,"
        " attempts INTEGER NOT NULL DEFAULT 0, not_found INTEGER NOT NULL DEFAULT 0,"
        " queued_at REAL NOT NULL, next_attempt REAL NOT NULL, last_error TEXT, done_at REAL,"
        " PRIMARY KEY (rule, series_uid));"
        f" INSERT INTO rules VALUES ('r', 'api', '{json.dumps(_doc())}', 'D', 'M', NULL, NULL,"
        " NULL, NULL, 1, 1);"
        " INSERT INTO shares VALUES ('r', '1.2', '1.2.3', 'pending', 0, 0, 1, 1, NULL, NULL);"
    )
    old.close()

    store = RuleStore(path)
    try:
        [job] = store.due_shares(["r"], now=T0, limit=10)
        assert store.get_meta("schema_version") == SCHEMA_VERSION == 2
        assert (job.key, job.decision) == (ShareKey("r", "1.2", "1.2.3"), None)
    finally:
        store.close()


def test_saving_with_the_same_destination_keeps_finished_shares(store: RuleStoreApi) -> None:
    _save(store)
    store.add_shares(_decided(_key("done")), now=T0)
    store.mark_shared(_key("done"), now=T0)

    _save(store, Condition="tagIsPresent('00100010')")

    assert _states(store) == {"done": "shared"}


def test_saving_without_albums_keeps_them_while_the_tokens_stay(store: RuleStoreApi) -> None:
    _save(store)
    store.save_rule("r", origin="api", document=_doc(Enabled=False), albums=None, now=T0)

    assert _stored(store, "r").destination_album == "DEST"

    store.save_rule("r", origin="api", document=_doc(token=TOKEN_B), albums=None, now=T0)

    assert _stored(store, "r").destination_album is None


def test_config_rules_are_added_kept_and_removed_with_the_configuration(
    store: RuleStoreApi,
) -> None:
    store.sync_config({"a": _doc("a"), "b": _doc("b")}, now=T0)
    store.set_failing("a", "refused", now=T0)
    store.add_shares(_decided(_key("s", "b")), now=T0)

    replaced = store.sync_config({"a": _doc("a")}, now=T0 + 1)

    assert replaced == []
    assert [r.name for r in store.rules()] == ["a"]
    assert _stored(store, "a").failing == "refused"
    assert store.counts() == {}


def test_a_changed_config_rule_is_saved_again(store: RuleStoreApi) -> None:
    store.sync_config({"a": _doc("a")}, now=T0)

    store.sync_config({"a": _doc("a", Condition="tagIsPresent('00100010')")}, now=T0 + 1)

    rule = store.rule("a")
    assert rule is not None
    assert (rule.document["Condition"], rule.updated_at) == ("tagIsPresent('00100010')", T0 + 1)


def test_a_config_rule_replaces_a_rest_rule_of_the_same_name(store: RuleStoreApi) -> None:
    _save(store, "a")
    store.add_shares(_decided(_key("s", "a")), now=T0)

    replaced = store.sync_config({"a": _doc("a", token=TOKEN_B)}, now=T0)

    assert replaced == ["a"]
    rule = store.rule("a")
    assert rule is not None and rule.origin == "config"
    assert store.counts() == {}


def test_rest_rules_outlive_a_configuration_sync(store: RuleStoreApi) -> None:
    _save(store, "mine")

    store.sync_config({}, now=T0)

    assert [r.name for r in store.rules()] == ["mine"]


# --- shares -------------------------------------------------------------------------------------


def test_a_series_is_queued_once_per_rule(store: RuleStoreApi) -> None:
    _save(store)
    _save(store, "other")

    assert store.add_shares(_decided(_key("s1"), _key("s2"), _key("s1", "other")), now=T0) == 3
    assert store.add_shares(_decided(_key("s1"), _key("s3")), now=T0 + 1) == 1

    assert store.counts()["r"] == ShareCounts(pending=3)


def test_shares_of_an_unknown_rule_are_ignored(store: RuleStoreApi) -> None:
    assert store.add_shares(_decided(_key("s1", "gone")), now=T0) == 0


def test_due_shares_are_those_of_the_given_rules_whose_time_has_come(store: RuleStoreApi) -> None:
    _save(store)
    _save(store, "held")
    store.add_shares(_decided(_key("s1"), _key("s2"), _key("h", "held")), now=T0)
    store.reschedule(_key("s2"), delay=30, error="503", not_found=False, now=T0)

    due = store.due_shares(["r"], now=T0, limit=10)

    assert [job.key.series_uid for job in due] == ["s1"]
    assert store.due_shares([], now=T0, limit=10) == []
    assert store.next_due(["r"]) == T0
    assert store.next_due(["held"]) == T0
    assert store.next_due([]) is None


def test_a_rescheduled_share_counts_attempts_and_not_found_answers(store: RuleStoreApi) -> None:
    _save(store)
    store.add_shares(_decided(_key("s")), now=T0)

    store.reschedule(_key("s"), delay=2, error="503", not_found=False, now=T0)
    store.reschedule(_key("s"), delay=4, error="404", not_found=True, now=T0 + 2)

    [job] = store.shares("r", state="pending", limit=1)
    assert (job.attempts, job.not_found, job.next_attempt, job.last_error) == (
        2,
        1,
        T0 + 6,
        "404",
    )


def test_shared_and_failed_shares_are_counted_and_the_failure_noted(store: RuleStoreApi) -> None:
    _save(store)
    store.add_shares(_decided(_key("a"), _key("b"), _key("c")), now=T0)

    store.mark_shared(_key("a"), now=T0)
    store.mark_failed(_key("b"), reason="Series Not Found", now=T0)

    assert store.counts()["r"] == ShareCounts(pending=1, shared=1, failed=1)
    assert store.counts()["r"].matched == 3
    assert _stored(store, "r").last_error == "Series Not Found"


def test_retry_ends_the_failure_and_makes_failed_and_waiting_shares_due(
    store: RuleStoreApi,
) -> None:
    _save(store)
    store.add_shares(_decided(_key("a"), _key("b"), _key("c")), now=T0)
    store.mark_shared(_key("a"), now=T0)
    store.mark_failed(_key("b"), reason="404", now=T0)
    store.reschedule(_key("c"), delay=300, error="503", not_found=False, now=T0)
    store.set_failing("r", "refused", now=T0)

    assert store.retry("r", now=T0 + 1) == 2

    assert _stored(store, "r").failing is None
    assert _states(store) == {"a": "shared", "b": "pending", "c": "pending"}
    assert {j.key.series_uid for j in store.due_shares(["r"], now=T0 + 1, limit=10)} == {"b", "c"}


def test_requeue_queues_again_shares_already_done(store: RuleStoreApi) -> None:
    _save(store)
    store.add_shares(_decided(_key("a")), now=T0)
    store.mark_shared(_key("a"), now=T0)

    assert store.requeue_shares(_decided(_key("a"), _key("new")), now=T0 + 1) == 2

    assert _states(store) == {"a": "pending", "new": "pending"}


def test_make_due_brings_every_waiting_share_forward(store: RuleStoreApi) -> None:
    _save(store)
    store.add_shares(_decided(_key("a"), _key("b")), now=T0)
    store.reschedule(_key("a"), delay=300, error="503", not_found=False, now=T0)

    assert store.make_due(now=T0 + 1) == 1
    assert len(store.due_shares(["r"], now=T0 + 1, limit=10)) == 2


def test_meta_values_are_json_and_none_deletes_them(store: RuleStoreApi) -> None:
    store.set_meta("k", {"a": [1, 2]})
    assert store.get_meta("k") == {"a": [1, 2]}

    store.set_meta("k", None)
    assert store.get_meta("k") is None
