"""docker/orthanc.json as Orthanc reads it: the image's configuration, with this test's KHEOPS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.orthanc_process import ENTRYPOINT, PYTHON_PLUGIN, OrthancFactory
from tests.plugin_setup import FAST, Album, status
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

DOCKER_CONFIG = Path(__file__).resolve().parents[2] / "docker" / "orthanc.json"


def _docker_sections(album: Album) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """The file's Kheops and Python sections, pointed at this test's KHEOPS and repository,
    and the environment that gives its ${...} tokens."""
    config = json.loads(DOCKER_CONFIG.read_text(encoding="utf-8"))
    _, r42_token = album.other_album()
    kheops = {**config["Kheops"], **FAST, "Url": album.server.url}
    del kheops["StateDirectory"]  # the image's volume; the harness gives one per test
    python = {**config["Python"], "Path": str(ENTRYPOINT)}
    return kheops, python, {"KHEOPS_TOKEN": album.token, "KHEOPS_R42_TOKEN": r42_token}


def test_the_docker_configuration_starts_orthanc_with_the_plugin_and_its_rule(
    orthanc_factory: OrthancFactory, album: Album
) -> None:
    plain = orthanc_factory(extra_config={"Plugins": [str(PYTHON_PLUGIN)]})
    version = plain.get("/plugins/python").json()["Version"]
    plain.stop()
    if tuple(int(part) for part in version.split(".")[:2]) < (4, 1):
        pytest.skip(f"python plugin {version} reads no Python.Path; the image has 7.1")
    kheops, python, env = _docker_sections(album)

    orthanc = orthanc_factory(start=False, kheops=kheops, env=env)
    del orthanc.config["PythonScript"]  # the file loads the script through Python.Path
    orthanc.config["Python"] = python
    orthanc.start()

    assert status(orthanc)["State"] in ("sending", "paused", "unreachable")
    rules = wait_until(lambda: orthanc.get("/kheops/rules").json(), message="the rule listed")
    assert [(rule["Name"], rule["Source"]) for rule in rules] == [("research-r42", "config")]
    wait_until(lambda: "Python.AllowThreads is on" in orthanc.log, message="the versions line")
