"""Configuration mistakes a person makes, each named by its field, none showing a password."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from orthanc_kheops.config import ConfigError, KheopsConfig, check_environment, load_config
from orthanc_kheops.switching.rules import config_rules

TOKEN = "KbSVRVsa0rTCh6D5l9JnAb"
PASSWORD = "hunter2secret"


def _section(**fields: Any) -> dict[str, Any]:
    return {"Url": "https://kheops.example.org", "Token": TOKEN, **fields}


def _error(section: dict[str, Any], directory: Path = Path("/etc/orthanc")) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config({"Kheops": section}, config_directory=directory)
    return str(caught.value)


def _environment_error(section: dict[str, Any], directory: Path) -> str:
    configuration = {"Kheops": section, "StorageDirectory": str(directory / "storage")}
    config = load_config(configuration, config_directory=directory)
    with pytest.raises(ConfigError) as caught:
        check_environment(config, configuration)
    return str(caught.value)


def _checked(section: dict[str, Any], directory: Path) -> KheopsConfig:
    configuration = {"Kheops": section, "StorageDirectory": str(directory / "storage")}
    config = load_config(configuration, config_directory=directory)
    check_environment(config, configuration)
    return config


# --- values that only make sense together --------------------------------------------------------


def test_a_longest_delay_shorter_than_the_first_is_refused() -> None:
    message = _error(_section(RetryInitialSeconds=10, RetryMaximumSeconds=5))

    assert message == (
        "Kheops.RetryMaximumSeconds: 5 is less than Kheops.RetryInitialSeconds (10); the longest"
        " delay between two attempts cannot be shorter than the first"
    )


def test_a_longest_delay_shorter_than_the_default_first_one_is_refused() -> None:
    assert _error(_section(RetryMaximumSeconds=1)).startswith("Kheops.RetryMaximumSeconds: 1 ")


@pytest.mark.parametrize(
    ("field", "value", "minimum"),
    [
        ("TokenRecheckSeconds", 0.001, "0.1"),
        ("ReconcileSeconds", 0.0001, "0.1"),
        ("ConnectTimeoutSeconds", 0.001, "0.1"),
        ("RequestTimeoutSeconds", 0.5, "1"),
        ("RetryInitialSeconds", 0.0001, "0.01"),
    ],
)
def test_absurdly_short_intervals_are_refused(field: str, value: float, minimum: str) -> None:
    assert _error(_section(**{field: value})) == (
        f"Kheops.{field}: {value} is less than the minimum of {minimum}"
    )


def test_an_absurdly_long_maximum_age_is_refused() -> None:
    assert _error(_section(MaximumAgeHours=1e300)).startswith("Kheops.MaximumAgeHours: ")


# --- passwords in URLs -------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["Url", "OrthancUrl"])
def test_a_url_with_a_user_and_password_is_refused_without_showing_them(field: str) -> None:
    message = _error(_section(**{field: f"https://admin:{PASSWORD}@host.example.org"}))

    assert message.startswith(f"Kheops.{field}: must not hold a user name or password")
    assert PASSWORD not in message
    assert "admin" not in message


def test_a_malformed_url_with_a_password_is_shown_masked() -> None:
    message = _error(_section(Url=f"ftp://admin:{PASSWORD}@host.example.org"))

    assert message == "Kheops.Url: 'ftp://…@host.example.org' is not an http(s) URL"


def test_a_password_in_a_switching_rule_url_is_not_shown() -> None:
    rule = {
        "Name": "r",
        "DestinationToken": "See1fW5f2ZhxS6Q2nv0Xyz",
        "Url": f"ftp://u:{PASSWORD}@x",
    }
    config = load_config({"Kheops": _section(SwitchingAlbums=[rule])}, config_directory=Path("/"))
    with pytest.raises(ConfigError) as caught:
        config_rules(config)
    message = str(caught.value)

    assert message.startswith("Kheops.SwitchingAlbums[0].Url: 'ftp://…@x' is not Kheops.Url")
    assert PASSWORD not in message
    assert TOKEN not in message


# --- paths -------------------------------------------------------------------------------------


def test_a_state_directory_that_is_a_file_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("not a folder")

    assert _environment_error(_section(StateDirectory=str(state)), tmp_path) == (
        f"Kheops.StateDirectory: {str(state)!r} is a file, not a folder"
    )


def test_a_state_directory_whose_folder_is_missing_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "no-such-folder" / "kheops"

    message = _environment_error(_section(StateDirectory=str(state)), tmp_path)

    assert message == (
        f"Kheops.StateDirectory: {str(state)!r} does not exist, nor does its folder"
        f" {str(state.parent)!r}; create it or correct the path"
    )
    assert not state.parent.exists()


def test_a_state_directory_orthanc_cannot_write_in_is_refused(tmp_path: Path) -> None:
    # /proc refuses new files to every user, root included.
    message = _environment_error(_section(StateDirectory="/proc"), tmp_path)

    assert message.startswith("Kheops.StateDirectory: Orthanc cannot write in '/proc' (")


def test_a_missing_state_directory_in_an_existing_folder_is_created(tmp_path: Path) -> None:
    config = _checked(_section(StateDirectory="state"), tmp_path)

    assert config.state_directory == tmp_path / "state"
    assert config.state_directory.is_dir()


def test_the_default_state_directory_is_created_with_its_parents(tmp_path: Path) -> None:
    config = _checked(_section(), tmp_path)

    assert config.state_directory == tmp_path / "storage" / "kheops"
    assert config.state_directory.is_dir()


def test_verify_tls_naming_a_missing_file_is_refused(tmp_path: Path) -> None:
    assert _environment_error(_section(VerifyTls="ca.pem"), tmp_path) == (
        f"Kheops.VerifyTls: {str(tmp_path / 'ca.pem')!r} does not exist; give the path of a CA"
        " bundle (a PEM file or a folder of certificates), true or false"
    )


def test_verify_tls_naming_an_existing_bundle_is_kept(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")

    assert _checked(_section(VerifyTls="ca.pem"), tmp_path).verify_tls == str(tmp_path / "ca.pem")
