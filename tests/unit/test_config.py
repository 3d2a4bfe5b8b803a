"""The "Kheops" section: defaults, derived values, and error messages that name the field."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from orthanc_kheops.config import ConfigError, KheopsConfig, PostgresSettings, load_config
from orthanc_kheops.observability.masking import Secret
from orthanc_kheops.schemas import SchemaError, validate

TOKEN = "KbSVRVsa0rTCh6D5l9JnAb"
OTHER_TOKEN = "See1fW5f2ZhxS6Q2nv0Xyz"
CONFIG_DIRECTORY = Path("/etc/orthanc")


def _load(section: object, **orthanc: Any) -> KheopsConfig:
    return load_config({"Kheops": section, **orthanc}, config_directory=CONFIG_DIRECTORY)


def _error(section: object, **orthanc: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        _load(section, **orthanc)
    return str(caught.value)


def _section(**fields: Any) -> dict[str, Any]:
    return {"Url": "https://kheops.example.org", "Token": TOKEN, **fields}


def _rule(**fields: Any) -> dict[str, Any]:
    return {"Name": "research", "DestinationToken": OTHER_TOKEN, **fields}


# --- valid sections ------------------------------------------------------------------------------


def test_a_minimal_section_gets_every_default() -> None:
    config = _load({"Url": "https://kheops.example.org/", "Token": TOKEN})

    assert config == KheopsConfig(
        url="https://kheops.example.org",
        token=Secret(TOKEN),
        state_directory=Path("/etc/orthanc/OrthancStorage/kheops"),
        storage_folder=Path("/etc/orthanc/OrthancStorage"),
        orthanc_url="http://127.0.0.1:8042",
        enabled=True,
        workers=4,
        batch_max_instances=500,
        batch_max_bytes=32 * 1024 * 1024,
        batch_linger=0.5,
        connect_timeout=10.0,
        request_timeout=130.0,
        retry_initial=2.0,
        retry_maximum=300.0,
        maximum_age=None,
        token_recheck=30.0,
        reconcile_interval=60.0,
        verify_tls=True,
        log_level="info",
        node_name=f"{socket.gethostname()}:8042",
        switching_albums=(),
    )


def test_every_field_is_read() -> None:
    config = _load(
        _section(
            Enabled=False,
            StateDirectory="/var/lib/kheops",
            Workers=8,
            BatchMaxInstances=20,
            BatchMaxMegabytes=1.5,
            BatchLingerMilliseconds=0,
            ConnectTimeoutSeconds=3,
            RequestTimeoutSeconds=60.5,
            RetryInitialSeconds=1,
            RetryMaximumSeconds=30,
            MaximumAgeHours=2,
            TokenRecheckSeconds=5,
            ReconcileSeconds=10,
            VerifyTls=False,
            OrthancUrl="https://localhost:8043/orthanc/",
            LogLevel="debug",
            SwitchingAlbums=[_rule()],
        )
    )

    assert config.enabled is False
    assert config.state_directory == Path("/var/lib/kheops")
    assert (config.workers, config.batch_max_instances) == (8, 20)
    assert config.batch_max_bytes == int(1.5 * 1024 * 1024)
    assert config.batch_linger == 0.0
    assert (config.connect_timeout, config.request_timeout) == (3.0, 60.5)
    assert (config.retry_initial, config.retry_maximum) == (1.0, 30.0)
    assert config.maximum_age == 7200.0
    assert (config.token_recheck, config.reconcile_interval) == (5.0, 10.0)
    assert config.verify_tls is False
    assert config.orthanc_url == "https://localhost:8043/orthanc"
    assert config.log_level == "debug"
    assert config.switching_albums == (_rule(),)


def test_a_maximum_age_of_zero_keeps_retrying_forever() -> None:
    assert _load(_section(MaximumAgeHours=0)).maximum_age is None


@pytest.mark.parametrize(
    ("orthanc", "section", "expected"),
    [
        ({}, {}, "/etc/orthanc/OrthancStorage/kheops"),
        ({"StorageDirectory": "db"}, {}, "/etc/orthanc/db/kheops"),
        ({"StorageDirectory": "../data/db"}, {}, "/etc/data/db/kheops"),
        ({"StorageDirectory": "/srv/orthanc"}, {}, "/srv/orthanc/kheops"),
        ({"StorageDirectory": "/srv/orthanc"}, {"StateDirectory": "state"}, "/etc/orthanc/state"),
        ({}, {"StateDirectory": "/var/lib/kheops"}, "/var/lib/kheops"),
    ],
    ids=[
        "default",
        "relative-storage",
        "parent-storage",
        "absolute-storage",
        "relative",
        "absolute",
    ],
)
def test_state_directory_is_resolved_against_the_configuration_folder(
    orthanc: dict[str, Any], section: dict[str, Any], expected: str
) -> None:
    config = _load(_section(**section), **orthanc)

    assert config.state_directory == Path(expected)


@pytest.mark.parametrize(
    ("orthanc", "expected"),
    [
        ({}, "http://127.0.0.1:8042"),
        ({"HttpPort": 9000}, "http://127.0.0.1:9000"),
        ({"HttpPort": 8443, "SslEnabled": True}, "https://127.0.0.1:8443"),
        ({"SslEnabled": False}, "http://127.0.0.1:8042"),
    ],
)
def test_orthanc_url_is_derived_from_the_http_port_and_ssl(
    orthanc: dict[str, Any], expected: str
) -> None:
    assert _load(_section(), **orthanc).orthanc_url == expected


def test_an_explicit_orthanc_url_wins() -> None:
    config = _load(_section(OrthancUrl="http://orthanc:8042/"), HttpPort=9000)

    assert config.orthanc_url == "http://orthanc:8042"


def test_a_relative_ca_bundle_is_resolved_against_the_configuration_folder() -> None:
    assert _load(_section(VerifyTls="certs/ca.pem")).verify_tls == "/etc/orthanc/certs/ca.pem"
    assert _load(_section(VerifyTls="/etc/ssl/ca.pem")).verify_tls == "/etc/ssl/ca.pem"


def test_the_configuration_never_shows_a_token_when_printed() -> None:
    config = _load(_section(SwitchingAlbums=[_rule(SourceToken=TOKEN)]))

    assert TOKEN not in repr(config)
    assert OTHER_TOKEN not in repr(config)
    assert TOKEN not in str(config)


# --- errors --------------------------------------------------------------------------------------


def test_a_missing_section_is_reported() -> None:
    with pytest.raises(ConfigError, match="^Kheops: the section is missing"):
        load_config({}, config_directory=CONFIG_DIRECTORY)


def test_a_url_that_is_not_http_is_named_with_its_value() -> None:
    assert (
        _error({"Url": "ftp://x", "Token": TOKEN}) == "Kheops.Url: 'ftp://x' is not an http(s) URL"
    )


def test_a_missing_token_is_required() -> None:
    assert _error({"Url": "https://k"}) == "Kheops.Token: is required"


def test_every_problem_is_listed_the_shallowest_first() -> None:
    message = _error({"Url": "ftp://x", "SwitchingAlbums": [{"Name": "a b"}]})

    assert message.split("; ") == [
        "Kheops.Token: is required",
        "Kheops.Url: 'ftp://x' is not an http(s) URL",
        "Kheops.SwitchingAlbums[0].DestinationToken: is required",
        (
            "Kheops.SwitchingAlbums[0].Name: 'a b' is not a rule name: use 1 to 64 letters, "
            "digits, '.', '_' or '-', starting with a letter or digit"
        ),
    ]


@pytest.mark.parametrize(
    ("key", "hint"),
    [("Wokers", "Workers"), ("token", "Token"), ("BatchMaxInstance", "BatchMaxInstances")],
)
def test_an_unknown_key_suggests_the_closest_known_one(key: str, hint: str) -> None:
    assert _error(_section(**{key: 3})) == f"Kheops: unknown key {key!r} (did you mean {hint!r}?)"


def test_an_unknown_key_unlike_any_other_gets_no_suggestion() -> None:
    assert _error(_section(Zzz=1)) == "Kheops: unknown key 'Zzz'"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"Workers": "3"}, "Kheops.Workers: '3' is not an integer"),
        ({"Workers": 2.5}, "Kheops.Workers: 2.5 is not an integer"),
        ({"Enabled": "yes"}, "Kheops.Enabled: 'yes' is not a boolean"),
        ({"BatchMaxMegabytes": "64"}, "Kheops.BatchMaxMegabytes: '64' is not a number"),
        ({"VerifyTls": 1}, "Kheops.VerifyTls: 1 is not a boolean or string"),
        (
            {"LogLevel": "loud"},
            "Kheops.LogLevel: 'loud' is not one of 'debug', 'info', 'warning', 'error'",
        ),
        ({"StateDirectory": ""}, "Kheops.StateDirectory: must not be empty"),
        ({"SwitchingAlbums": "x"}, "Kheops.SwitchingAlbums: 'x' is not an array"),
        ({"SwitchingAlbums": {"a": 1}}, "Kheops.SwitchingAlbums: must be an array, not an object"),
        ({"SwitchingAlbums": [[1]]}, "Kheops.SwitchingAlbums[0]: must be an object, not an array"),
        ({"Workers": 0}, "Kheops.Workers: 0 is less than the minimum of 1"),
    ],
)
def test_a_wrong_value_is_named_with_its_field(fields: dict[str, Any], message: str) -> None:
    assert _error(_section(**fields)) == message


def test_a_wrong_rule_is_named_by_its_position() -> None:
    section = _section(SwitchingAlbums=[_rule(), _rule(Name="no spaces allowed")])

    assert _error(section).startswith(
        "Kheops.SwitchingAlbums[1].Name: 'no spaces allowed' is not a rule name"
    )


def test_schema_errors_carry_the_first_field() -> None:
    with pytest.raises(SchemaError) as caught:
        validate(_section(Workers="x", Url="ftp://x"), "kheops.schema.json", root="Kheops")

    assert caught.value.field == "Kheops.Url"
    assert caught.value.problems == (
        "Kheops.Url: 'ftp://x' is not an http(s) URL",
        "Kheops.Workers: 'x' is not an integer",
    )


@pytest.mark.parametrize(
    ("section", "secret"),
    [
        (_section(Token="abc def"), "abc def"),
        (_section(Token="short"), "short"),
        (_section(Token=TOKEN + "!"), TOKEN),
        (_section(Token=12345678901), "12345678901"),
        (_section(Token=[TOKEN]), TOKEN),
        (_section(SwitchingAlbums=[_rule(DestinationToken="x y secret")]), "x y secret"),
        (_section(SwitchingAlbums=[_rule(SourceToken=1234567890123)]), "1234567890123"),
        (_section(SwitchingAlbums={"research": OTHER_TOKEN}), OTHER_TOKEN),
        (_section(SwitchingAlbums=[[OTHER_TOKEN]]), OTHER_TOKEN),
        (_section(SwitchingAlbums=[{"DestinationToken": OTHER_TOKEN}]), OTHER_TOKEN),
        (_section(SwitchingAlbums=[_rule(Tokn=OTHER_TOKEN)]), OTHER_TOKEN),
        ({"Url": 3, "Token": TOKEN, "Workers": -1}, TOKEN),
    ],
    ids=[
        "space",
        "too-short",
        "bad-character",
        "number",
        "list",
        "destination-space",
        "source-number",
        "rules-as-object",
        "rule-as-list",
        "rule-without-name",
        "rule-unknown-key",
        "other-fields-wrong",
    ],
)
def test_no_error_message_repeats_a_token(section: dict[str, Any], secret: str) -> None:
    message = _error(section)

    assert secret not in message
    assert message.startswith("Kheops")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            _section(Token="abc def"),
            (
                "Kheops.Token: is not a KHEOPS capability token (letters and digits, usually 22 "
                "of them); was the ${...} environment variable set?"
            ),
        ),
        (_section(Token=12345678901), "Kheops.Token: must be a string"),
        (
            _section(SwitchingAlbums=[_rule(DestinationToken="x y")]),
            (
                "Kheops.SwitchingAlbums[0].DestinationToken: is not a KHEOPS capability token "
                "(letters and digits, usually 22 of them)"
            ),
        ),
    ],
    ids=["pattern", "type", "rule-pattern"],
)
def test_a_bad_token_is_explained_without_its_value(section: dict[str, Any], message: str) -> None:
    assert _error(section) == message


# --- the state database --------------------------------------------------------------------------


def test_the_postgresql_state_database_connects_with_its_own_settings() -> None:
    config = _load(
        _section(
            StateDatabase="postgresql",
            NodeName="node-a",
            LeaseSeconds=5,
            PostgreSQL={"Host": "db", "Port": 5433, "Database": "pacs", "Username": "o",
                        "Password": "it's\\secret", "Schema": "kheops_a"},
        ),
        PostgreSQL={"Host": "elsewhere"},
    )  # fmt: skip

    assert (config.state_database, config.node_name, config.lease_seconds) == (
        "postgresql",
        "node-a",
        5.0,
    )
    assert config.postgres == PostgresSettings(
        conninfo=Secret("host='db' port='5433' dbname='pacs' user='o' password='it\\'s\\\\secret'"),
        schema="kheops_a",
        password=Secret("it's\\secret"),
    )


def test_the_database_password_never_shows_when_the_configuration_is_printed() -> None:
    config = _load(
        _section(StateDatabase="postgresql"),
        PostgreSQL={"Host": "db", "Password": "s3cretPassw0rd"},
    )

    assert "s3cretPassw0rd" not in repr(config) + str(config.postgres)


def test_without_its_own_settings_the_plugin_uses_orthancs_postgresql_section() -> None:
    config = _load(
        _section(StateDatabase="postgresql"),
        PostgreSQL={"EnableIndex": True, "ConnectionUri": "postgresql://o:pw@db/pacs"},
    )

    assert config.postgres == PostgresSettings(
        conninfo=Secret("postgresql://o:pw@db/pacs"), schema="kheops"
    )


def test_the_postgresql_state_database_needs_connection_settings() -> None:
    message = _error(_section(StateDatabase="postgresql"))

    assert message.startswith("Kheops.PostgreSQL: ")
    assert "Orthanc's PostgreSQL section" in message


def test_the_sqlite_state_database_ignores_postgresql_settings() -> None:
    config = _load(_section(), PostgreSQL={"Host": "db"})

    assert (config.state_database, config.postgres) == ("sqlite", None)


def test_sent_instances_are_kept_thirty_days_unless_told() -> None:
    assert _load(_section()).sent_retention == 30 * 86400
    assert _load(_section(SentRetentionDays=2)).sent_retention == 2 * 86400
    assert _load(_section(SentRetentionDays=0)).sent_retention is None
    assert "Kheops.SentRetentionDays" in _error(_section(SentRetentionDays=-1))


@pytest.mark.parametrize(
    ("orthanc", "expected"),
    [
        ({}, None),
        ({"MaximumPatientCount": 0, "MaximumStorageSize": 0}, None),
        ({"MaximumPatientCount": 5}, "MaximumPatientCount 5"),
        (
            {"MaximumPatientCount": 5, "MaximumStorageSize": 100},
            "MaximumPatientCount 5, MaximumStorageSize 100",
        ),
        ({"MaximumStorageSize": 100, "MaximumStorageMode": "Reject"}, None),
    ],
)
def test_storage_recycling_is_known_when_orthanc_may_delete_instances_by_itself(
    orthanc: dict[str, Any], expected: str | None
) -> None:
    assert _load(_section(), **orthanc).storage_recycling == expected
