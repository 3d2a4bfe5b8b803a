"""The "Kheops" section of Orthanc's configuration, validated once at load.

After `load_config` the plugin only holds the frozen `KheopsConfig`, never
raw dictionaries; an invalid section raises `ConfigError`, whose message
names the field and the problem, and Orthanc refuses to start.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .observability.masking import Secret
from .schemas import SchemaError, defaults, validate

SECTION = "Kheops"
_MEGABYTE = 1024 * 1024
_DAY = 86400
# The schema's defaults, which the fields below and load_config take: no default is written twice.
DEFAULTS = defaults("kheops.schema.json")
_POSTGRES_DEFAULTS = defaults("kheops.schema.json", "PostgreSQL")


class ConfigError(ValueError):
    """The "Kheops" section is invalid; the message says where and why."""


@dataclass(frozen=True)
class PostgresSettings:
    """How to reach the shared state database: a conninfo string or URI, and the schema."""

    conninfo: Secret  # may hold a password
    schema: str = _POSTGRES_DEFAULTS["Schema"]
    password: Secret | None = None  # also masked on its own in the log


def _fields(given: Mapping[str, Any]) -> dict[str, Any]:
    """The plain settings as KheopsConfig's fields, in its units: for the defaults and for a
    section alike."""
    return {
        "enabled": given["Enabled"],
        "workers": given["Workers"],
        "batch_max_instances": given["BatchMaxInstances"],
        "batch_max_bytes": int(given["BatchMaxMegabytes"] * _MEGABYTE),
        "batch_linger": given["BatchLingerMilliseconds"] / 1000,
        "connect_timeout": float(given["ConnectTimeoutSeconds"]),
        "request_timeout": float(given["RequestTimeoutSeconds"]),
        "retry_initial": float(given["RetryInitialSeconds"]),
        "retry_maximum": float(given["RetryMaximumSeconds"]),
        "maximum_age": (given["MaximumAgeHours"] * 3600) or None,
        "sent_retention": (given["SentRetentionDays"] * _DAY) or None,
        "token_recheck": float(given["TokenRecheckSeconds"]),
        "reconcile_interval": float(given["ReconcileSeconds"]),
        "log_level": given["LogLevel"],
        "state_database": given["StateDatabase"],
        "lease_seconds": float(given["LeaseSeconds"]),
        "sent_label": given["SentLabel"],
    }


_DEFAULT = _fields(DEFAULTS)


@dataclass(frozen=True)
class KheopsConfig:
    url: str
    token: Secret
    state_directory: Path
    orthanc_url: str
    enabled: bool = _DEFAULT["enabled"]
    workers: int = _DEFAULT["workers"]
    batch_max_instances: int = _DEFAULT["batch_max_instances"]
    batch_max_bytes: int = _DEFAULT["batch_max_bytes"]
    batch_linger: float = _DEFAULT["batch_linger"]
    connect_timeout: float = _DEFAULT["connect_timeout"]
    request_timeout: float = _DEFAULT["request_timeout"]
    retry_initial: float = _DEFAULT["retry_initial"]
    retry_maximum: float = _DEFAULT["retry_maximum"]
    maximum_age: float | None = _DEFAULT["maximum_age"]
    sent_retention: float | None = _DEFAULT["sent_retention"]
    storage_recycling: str | None = None
    # Orthanc's storage folder, where large files are read (None: StorageCompression is on).
    storage_folder: Path | None = None
    token_recheck: float = _DEFAULT["token_recheck"]
    reconcile_interval: float = _DEFAULT["reconcile_interval"]
    verify_tls: bool | str = DEFAULTS["VerifyTls"]
    log_level: str = _DEFAULT["log_level"]
    state_database: str = _DEFAULT["state_database"]
    postgres: PostgresSettings | None = None
    node_name: str = "orthanc"
    lease_seconds: float = _DEFAULT["lease_seconds"]
    sent_label: bool = _DEFAULT["sent_label"]
    # Raw rules hold DestinationToken/SourceToken in clear: keep them out of repr().
    switching_albums: tuple[Mapping[str, Any], ...] = field(default=(), repr=False)


def load_config(
    orthanc_configuration: Mapping[str, Any], *, config_directory: Path
) -> KheopsConfig:
    """Build the plugin's configuration from Orthanc's whole configuration document."""
    section = orthanc_configuration.get(SECTION)
    if section is None:
        raise ConfigError(f"{SECTION}: the section is missing from the configuration")
    try:
        validate(section, "kheops.schema.json", root=SECTION)
    except SchemaError as exc:
        raise ConfigError(str(exc)) from None
    _check_values(section)
    given = {**DEFAULTS, **section}
    return KheopsConfig(
        url=str(given["Url"]).rstrip("/"),
        token=Secret(given["Token"]),
        state_directory=_state_directory(section, orthanc_configuration, config_directory),
        orthanc_url=_orthanc_url(section, orthanc_configuration),
        storage_recycling=_storage_recycling(orthanc_configuration),
        storage_folder=_storage_folder(orthanc_configuration, config_directory),
        verify_tls=_verify_tls(given["VerifyTls"], config_directory),
        postgres=_postgres(given, orthanc_configuration),
        node_name=section.get("NodeName")
        or f"{socket.gethostname()}:{orthanc_configuration.get('HttpPort', 8042)}",
        switching_albums=tuple(section.get("SwitchingAlbums", ())),
        **_fields(given),
    )


def _check_values(section: Mapping[str, Any]) -> None:
    """What the schema cannot say: fields that only make sense together, URLs with passwords."""
    for key in ("Url", "OrthancUrl"):
        value = section.get(key)
        if isinstance(value, str) and "@" in urlsplit(value).netloc:
            raise ConfigError(
                f"{SECTION}.{key}: must not hold a user name or password (the part before '@');"
                + (
                    " KHEOPS takes the album token of Kheops.Token"
                    if key == "Url"
                    else " the plugin authenticates to Orthanc by itself"
                )
            )
    initial = section.get("RetryInitialSeconds", DEFAULTS["RetryInitialSeconds"])
    maximum = section.get("RetryMaximumSeconds", DEFAULTS["RetryMaximumSeconds"])
    if maximum < initial:
        raise ConfigError(
            f"{SECTION}.RetryMaximumSeconds: {maximum} is less than"
            f" {SECTION}.RetryInitialSeconds ({initial}); the longest delay between two attempts"
            " cannot be shorter than the first"
        )


def check_environment(config: KheopsConfig, orthanc: Mapping[str, Any]) -> None:
    """At load, the paths the configuration names: Orthanc refuses to start on a wrong one.

    The state directory is created when missing, if its parent folder exists (a default
    one is created with its parents, as Orthanc creates its storage folder); it must be a
    folder Orthanc can write. A VerifyTls path must exist.
    """
    section = orthanc.get(SECTION) or {}
    explicit = bool(section.get("StateDirectory"))
    _check_state_directory(config.state_directory, explicit=explicit)
    if isinstance(config.verify_tls, str):
        bundle = Path(config.verify_tls)
        if not bundle.exists():
            raise ConfigError(
                f"{SECTION}.VerifyTls: {config.verify_tls!r} does not exist; give the path of a"
                " CA bundle (a PEM file or a folder of certificates), true or false"
            )
        if not os.access(bundle, os.R_OK):
            raise ConfigError(f"{SECTION}.VerifyTls: {config.verify_tls!r} cannot be read")


def _check_state_directory(path: Path, *, explicit: bool) -> None:
    field_name = f"{SECTION}.StateDirectory"
    shown = repr(str(path))
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{field_name}: {shown} is a file, not a folder")
    if not path.exists():
        if explicit and not path.parent.is_dir():
            raise ConfigError(
                f"{field_name}: {shown} does not exist, nor does its folder"
                f" {str(path.parent)!r}; create it or correct the path"
            )
        try:
            path.mkdir(parents=not explicit, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{field_name}: cannot create {shown} ({exc.strerror})") from None
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ConfigError(
            f"{field_name}: Orthanc cannot write in {shown} ({exc.strerror})"
        ) from None


def _state_directory(
    section: Mapping[str, Any], orthanc: Mapping[str, Any], config_directory: Path
) -> Path:
    explicit = section.get("StateDirectory")
    if explicit:
        return _resolve(Path(explicit), config_directory)
    return _orthanc_storage(orthanc, config_directory) / "kheops"


def _storage_folder(orthanc: Mapping[str, Any], config_directory: Path) -> Path | None:
    """Where Orthanc keeps its files as stored; None when it compresses them."""
    if orthanc.get("StorageCompression") is True:
        return None
    return _orthanc_storage(orthanc, config_directory)


def _orthanc_storage(orthanc: Mapping[str, Any], config_directory: Path) -> Path:
    """Orthanc's StorageDirectory, resolved as Orthanc resolves it."""
    return _resolve(Path(orthanc.get("StorageDirectory", "OrthancStorage")), config_directory)


_CONNINFO_KEYS = {"Host": "host", "Port": "port", "Database": "dbname", "Username": "user"}


def _postgres(section: Mapping[str, Any], orthanc: Mapping[str, Any]) -> PostgresSettings | None:
    """Kheops.PostgreSQL, else Orthanc's own PostgreSQL section (the same database)."""
    if section["StateDatabase"] != "postgresql":
        return None
    own = {k: v for k, v in section.get("PostgreSQL", {}).items() if k != "Schema"}
    settings = own or orthanc.get("PostgreSQL")
    where = f"{SECTION}.PostgreSQL" if own else "PostgreSQL"
    if not isinstance(settings, Mapping):
        raise ConfigError(
            f"{SECTION}.PostgreSQL: StateDatabase is 'postgresql' but neither Kheops.PostgreSQL"
            " nor Orthanc's PostgreSQL section says how to connect"
        )
    schema = str(section.get("PostgreSQL", {}).get("Schema", _POSTGRES_DEFAULTS["Schema"]))
    uri = settings.get("ConnectionUri")
    if uri:
        return PostgresSettings(conninfo=Secret(str(uri)), schema=schema)
    password = settings.get("Password")
    secret = Secret(str(password)) if password else None
    parts = []
    for key, name in _CONNINFO_KEYS.items():
        value = settings.get(key)
        if value is not None and value != "":
            parts.append(f"{name}={_quoted(str(value))}")
    if not parts:
        raise ConfigError(f"{where}: gives neither ConnectionUri nor Host, Port, Database")
    if secret is not None:
        parts.append(f"password={_quoted(secret.reveal())}")
    return PostgresSettings(conninfo=Secret(" ".join(parts)), schema=schema, password=secret)


def _quoted(value: str) -> str:
    """A libpq conninfo value: quoted, with quotes and backslashes escaped."""
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def _storage_recycling(orthanc: Mapping[str, Any]) -> str | None:
    """Orthanc's recycling settings when they can delete instances, in words; else None."""
    if orthanc.get("MaximumStorageMode", "Recycle") != "Recycle":
        return None
    keys = ("MaximumPatientCount", "MaximumStorageSize")
    return ", ".join(f"{key} {orthanc[key]}" for key in keys if orthanc.get(key)) or None


def _verify_tls(value: bool | str, config_directory: Path) -> bool | str:
    """A CA bundle path is relative to the configuration folder, like Orthanc's own paths."""
    if isinstance(value, bool):
        return value
    return str(_resolve(Path(value), config_directory))


def _resolve(path: Path, base: Path) -> Path:
    return path if path.is_absolute() else (base / path).resolve()


def _orthanc_url(section: Mapping[str, Any], orthanc: Mapping[str, Any]) -> str:
    explicit = section.get("OrthancUrl")
    if explicit:
        return str(explicit).rstrip("/")
    scheme = "https" if orthanc.get("SslEnabled") else "http"
    return f"{scheme}://127.0.0.1:{orthanc.get('HttpPort', 8042)}"
