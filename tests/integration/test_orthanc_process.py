"""The harness against a real, plain Orthanc (and the python plugin with a stand-in script)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.corpus import generate_corpus, make_dataset, new_uid, to_bytes
from tests.orthanc_process import (
    DICOMWEB_PLUGIN,
    ENTRYPOINT,
    PYTHON_PLUGIN,
    OrthancError,
    OrthancFactory,
    OrthancProcess,
    OrthancStartError,
)
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def plain_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancProcess]:
    """One plain Orthanc for the tests that only add instances and look at their own."""
    with OrthancProcess(tmp_path_factory.mktemp("plain-orthanc")) as orthanc:
        yield orthanc


def _instance(study_uid: str | None = None) -> bytes:
    return to_bytes(
        make_dataset(
            patient_id="P1",
            patient_name="DOE^JANE",
            study_uid=study_uid or new_uid(),
            series_uid=new_uid(),
        )
    )


# --- Configuration ---------------------------------------------------------------------------


def test_plain_orthanc_gets_its_own_ports_and_directories(orthanc_factory: OrthancFactory) -> None:
    orthanc = orthanc_factory(start=False)

    assert orthanc.http_port != orthanc.dicom_port
    assert {orthanc.http_port, orthanc.dicom_port}.isdisjoint({8042, 4242})
    assert orthanc.url == f"http://127.0.0.1:{orthanc.http_port}"
    config = orthanc.config
    assert config["Plugins"] == []
    assert "PythonScript" not in config and "Kheops" not in config and "DicomWeb" not in config
    assert config["AuthenticationEnabled"] is False
    assert config["DicomAet"] == orthanc.aet == "ORTHANC"
    assert Path(config["StorageDirectory"]).parent == orthanc.workdir
    assert Path(config["IndexDirectory"]).parent == orthanc.workdir


def test_kheops_section_loads_the_python_plugin_with_the_repository_entry_script(
    orthanc_factory: OrthancFactory,
) -> None:
    kheops = {"Url": "http://127.0.0.1:9/api", "AlbumToken": "t"}
    orthanc = orthanc_factory(start=False, kheops=kheops)

    config = orthanc.config
    assert config["Plugins"] == [str(PYTHON_PLUGIN)]
    assert config["PythonScript"] == str(ENTRYPOINT)
    assert ENTRYPOINT.is_file()
    assert config["Kheops"] == {**kheops, "StateDirectory": str(orthanc.workdir / "kheops-state")}


def test_state_directory_given_in_the_kheops_section_is_kept(
    orthanc_factory: OrthancFactory, tmp_path: Path
) -> None:
    orthanc = orthanc_factory(start=False, kheops={"StateDirectory": str(tmp_path / "state")})

    assert orthanc.config["Kheops"]["StateDirectory"] == str(tmp_path / "state")


def test_dicomweb_servers_load_the_dicomweb_plugin_and_extra_config_merges_last(
    orthanc_factory: OrthancFactory,
) -> None:
    orthanc = orthanc_factory(
        start=False,
        dicomweb_servers={"kheops": ["http://127.0.0.1:9/dicom-web/"]},
        extra_config={"DicomWeb": {"StudiesMetadata": "MainDicomTags"}, "StableAge": 5},
    )

    config = orthanc.config
    assert config["Plugins"] == [str(DICOMWEB_PLUGIN)]
    assert config["DicomWeb"] == {
        "Enable": True,
        "Servers": {"kheops": ["http://127.0.0.1:9/dicom-web/"]},
        "StudiesMetadata": "MainDicomTags",
    }
    assert config["StableAge"] == 5


# --- Lifecycle -------------------------------------------------------------------------------


def test_plain_orthanc_starts_without_the_python_plugin(plain_orthanc: OrthancProcess) -> None:
    assert plain_orthanc.is_running
    assert json.loads(plain_orthanc.config_path.read_text()) == plain_orthanc.config
    assert plain_orthanc.get("/system").json()["DicomPort"] == plain_orthanc.dicom_port
    assert "python" not in plain_orthanc.get("/plugins").json()
    assert "Orthanc has started" in plain_orthanc.log


def test_instances_survive_kill_and_restart_on_the_same_ports(
    orthanc_factory: OrthancFactory,
) -> None:
    orthanc = orthanc_factory()
    instance_id = orthanc.upload(_instance())
    url = orthanc.url

    orthanc.kill()
    assert not orthanc.is_running
    orthanc.restart()

    assert orthanc.url == url
    assert orthanc.instance_ids() == [instance_id]


def test_stop_ends_orthanc_cleanly_and_closes_its_port(orthanc_factory: OrthancFactory) -> None:
    orthanc = orthanc_factory()

    orthanc.stop()

    assert not orthanc.is_running
    assert orthanc.returncode == 0
    assert not orthanc.exited_unexpectedly
    with pytest.raises(requests.ConnectionError):
        orthanc.get("/system", timeout=2)
    orthanc.stop()  # stopping a stopped Orthanc does nothing


def test_context_manager_starts_and_stops(tmp_workdir: Path) -> None:
    with OrthancProcess(tmp_workdir, verbose=False) as orthanc:
        assert orthanc.get("/system").status_code == 200

    assert orthanc.returncode == 0


def test_a_process_that_dies_on_its_own_is_reported_as_unexpected(tmp_workdir: Path) -> None:
    orthanc = OrthancProcess(tmp_workdir)
    orthanc.start()
    try:
        os.kill(orthanc.pid, signal.SIGKILL)
        wait_until(lambda: not orthanc.is_running, timeout=10)
    finally:
        orthanc.kill()

    assert orthanc.exited_unexpectedly
    assert orthanc.returncode == -signal.SIGKILL


def test_start_fails_fast_with_the_log_when_orthanc_exits(orthanc_factory: OrthancFactory) -> None:
    orthanc = orthanc_factory(start=False, extra_config={"StorageDirectory": "/proc/no-storage"})

    with pytest.raises(OrthancStartError, match="exited with code") as raised:
        orthanc.start(timeout=20)

    assert "no-storage" in str(raised.value)
    assert not orthanc.is_running


def test_memory_of_the_process_is_measurable(plain_orthanc: OrthancProcess) -> None:
    rss = plain_orthanc.rss_bytes()

    assert 1_000_000 < rss <= plain_orthanc.peak_rss_bytes()


# --- REST and DICOM --------------------------------------------------------------------------


def test_uploaded_instance_is_listed_once(plain_orthanc: OrthancProcess) -> None:
    before = set(plain_orthanc.instance_ids())
    data = _instance()

    instance_id = plain_orthanc.upload(data)

    assert plain_orthanc.upload(data) == instance_id
    assert set(plain_orthanc.instance_ids()) - before == {instance_id}


def test_storescu_stores_a_corpus_directory(plain_orthanc: OrthancProcess, tmp_path: Path) -> None:
    before = set(plain_orthanc.instance_ids())
    files = generate_corpus(
        tmp_path / "corpus", studies=2, series_per_study=2, instances_per_series=3, seed=1
    )

    plain_orthanc.storescu([tmp_path / "corpus"])

    assert len(set(plain_orthanc.instance_ids()) - before) == len(files) == 12


def test_storescu_stores_a_list_of_files(plain_orthanc: OrthancProcess, tmp_path: Path) -> None:
    before = set(plain_orthanc.instance_ids())
    files = generate_corpus(tmp_path, studies=1, series_per_study=1, instances_per_series=3, seed=2)

    plain_orthanc.storescu(files[:2])

    assert len(set(plain_orthanc.instance_ids()) - before) == 2


def test_storescu_raises_when_a_file_is_not_dicom(
    plain_orthanc: OrthancProcess, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")

    with pytest.raises(OrthancError, match="storescu exited with"):
        plain_orthanc.storescu([junk])


def test_credentials_enable_http_authentication(orthanc_factory: OrthancFactory) -> None:
    orthanc = orthanc_factory(credentials=("alice", "secret"))

    assert requests.get(f"{orthanc.url}/system", timeout=5).status_code == 401
    assert orthanc.get("/system").status_code == 200
    assert orthanc.config["RegisteredUsers"] == {"alice": "secret"}


def test_dicomweb_plugin_serves_stored_studies(orthanc_factory: OrthancFactory) -> None:
    orthanc = orthanc_factory(dicomweb_servers={"peer": ["http://127.0.0.1:9/dicom-web/"]})
    study_uid = new_uid()
    orthanc.upload(_instance(study_uid))

    studies = orthanc.get("/dicom-web/studies").json()

    assert [study["0020000D"]["Value"] for study in studies] == [[study_uid]]
    assert orthanc.get("/dicom-web/servers").json() == ["peer"]


# --- With the python plugin ------------------------------------------------------------------

_STAND_IN_SCRIPT = """
import orthanc

calls = []

def status(output, uri, **request):
    calls.append(uri)
    if len(calls) < 4:
        output.SendHttpStatusCode(503)
    else:
        output.AnswerBuffer('{"calls": %d}' % len(calls), "application/json")

orthanc.RegisterRestCallback("/kheops/status", status)
"""


def test_readiness_waits_for_the_plugin_status(
    orthanc_factory: OrthancFactory, tmp_path: Path
) -> None:
    script = tmp_path / "stand_in.py"
    script.write_text(_STAND_IN_SCRIPT)
    orthanc = orthanc_factory(kheops={}, extra_config={"PythonScript": str(script)})

    assert orthanc.get("/kheops/status").json()["calls"] >= 5
    assert "python" in orthanc.get("/plugins").json()


def test_start_times_out_when_the_plugin_never_reports_ready(
    orthanc_factory: OrthancFactory, tmp_path: Path
) -> None:
    script = tmp_path / "silent.py"
    script.write_text("import orthanc\n")
    orthanc = orthanc_factory(start=False, kheops={}, extra_config={"PythonScript": str(script)})

    with pytest.raises(OrthancStartError, match="GET /kheops/status did not answer 200") as raised:
        orthanc.start(timeout=3)

    assert "Orthanc has started" in str(raised.value)
    assert not orthanc.is_running
