"""The README's OrthancExplorer2 CustomButtons block works as pasted.

Each button is pressed the way OE2 presses it: its Url is resolved against OE2's page
(/ui/app/index.html), its Payload template filled as OE2 fills it, and the result sent with
the browser's credentials to an Orthanc whose authentication is on.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import pytest

from tests.corpus import new_uid
from tests.orthanc_process import OrthancFactory, OrthancProcess
from tests.plugin_setup import Album, single_instance
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

REPOSITORY = Path(__file__).resolve().parents[2]
README = REPOSITORY / "README.md"
OE2_PAGE = "/ui/app/index.html"
CREDENTIALS = ("admin", "kheops-oe2-test")
UNKNOWN = "00000000-00000000-00000000-00000000-00000000"


def custom_buttons() -> dict[str, list[dict[str, Any]]]:
    """The block under the README's oe2-custom-buttons marker."""
    text = README.read_text(encoding="utf-8")
    found = re.search(r"<!-- oe2-custom-buttons -->\s*```json\n(.*?)```", text, re.DOTALL)
    assert found, "the README has no CustomButtons block"
    block = json.loads("{" + found.group(1) + "}")
    buttons: dict[str, list[dict[str, Any]]] = block["OrthancExplorer2"]["UiOptions"][
        "CustomButtons"
    ]
    return buttons


def filled(template: object, *, uuid: str | None, selected: list[str]) -> object:
    """OE2's filling of a Payload: "{JsonArrayUUIDs}" alone becomes the list of the selected
    studies; in other strings {UUID} and {CommaSeparatedUUIDs} are replaced, and any other
    placeholder becomes "undefined"."""
    if isinstance(template, dict):
        return {k: filled(v, uuid=uuid, selected=selected) for k, v in template.items()}
    if not isinstance(template, str) or "{" not in template:
        return template
    if template == "{JsonArrayUUIDs}":
        return selected
    text = template.replace("{UUID}", str(uuid)).replace(
        "{CommaSeparatedUUIDs}", ",".join(selected)
    )
    return re.sub(r"{[^}]+}", "undefined", text)


def press(
    orthanc: OrthancProcess, button: dict[str, Any], *, uuid: str | None, selected: list[str]
) -> Any:
    """What OE2 does when the button is clicked: a GET opens the Url, a POST posts the Payload."""
    target = filled(button["Url"], uuid=uuid, selected=selected)
    assert isinstance(target, str)
    url = urlsplit(urljoin(OE2_PAGE, target))
    if button["HttpMethod"] == "GET":
        return url
    payload = filled(button["Payload"], uuid=uuid, selected=selected)
    return orthanc.request(button["HttpMethod"], url.path, json=payload)


def test_each_button_of_the_readme_block_does_what_its_tooltip_says(
    orthanc_factory: OrthancFactory, album: Album
) -> None:
    buttons = custom_buttons()
    orthanc = orthanc_factory(credentials=CREDENTIALS, kheops=album.section())
    study_a = new_uid()
    sop_uids = []
    for study in (study_a, study_a, new_uid()):
        sop_uid, data = single_instance(study_uid=study)
        orthanc.upload(data)
        sop_uids.append(sop_uid)
    wait_until(lambda: album.holds(sop_uids), message="instances sent")
    studies = orthanc.get("/studies").json()
    first = next(
        s
        for s in studies
        if orthanc.get(f"/studies/{s}").json()["MainDicomTags"]["StudyInstanceUID"] == study_a
    )
    series_id = orthanc.get(f"/studies/{first}/series").json()[0]["ID"]

    assert [b["Tooltip"] for b in buttons["study"]] == ["Send to KHEOPS", "KHEOPS status"]
    assert [b["Tooltip"] for b in buttons["series"]] == ["Send to KHEOPS", "KHEOPS status"]
    assert [b["Tooltip"] for b in buttons["bulk-studies"]] == ["Send to KHEOPS"]

    send_study, status_study = buttons["study"]
    answer = press(orthanc, send_study, uuid=first, selected=[])
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "Queued": 2,
        "Resources": 1,
        "Message": "2 instances queued for KHEOPS",
    }
    send_series, status_series = buttons["series"]
    answer = press(orthanc, send_series, uuid=series_id, selected=[])
    assert answer.json()["Queued"] == 1
    answer = press(orthanc, buttons["bulk-studies"][0], uuid=None, selected=studies)
    assert answer.status_code == 200, answer.text
    assert answer.json()["Queued"] == 3
    assert answer.json()["Resources"] == 2
    wait_until(lambda: album.server.store_count(sop_uids[2]) == 2, message="sent once more")

    # The status buttons open the app on that study or series.
    for button, level, uuid in (
        (status_study, "study", first),
        (status_series, "series", series_id),
    ):
        url = press(orthanc, button, uuid=uuid, selected=[])
        assert button["Target"] == "_blank"
        assert url.fragment == f"{level}/{uuid}"
        page = orthanc.get(url.path)
        assert page.status_code == 200
        assert page.headers["Content-Type"].startswith("text/html")
        assert '<script type="module" src="app.js">' in page.text

    # What OE2 sends in the unhappy cases gets a 400 or 404 that says why, and queues nothing.
    for selected, status, words in (
        ([], 400, "no study is selected"),
        (["0000-unknown"], 400, "is not an Orthanc id"),
        ([UNKNOWN], 404, f"unknown Orthanc id '{UNKNOWN}'"),
    ):
        answer = press(orthanc, buttons["bulk-studies"][0], uuid=None, selected=selected)
        assert answer.status_code == status
        assert words in answer.json()["Message"]
        assert answer.json()["Field"] == "Resources"
    answer = orthanc.post("/kheops/oe2/send", json={"Resources": "undefined"})
    assert answer.status_code == 400
    assert "does not know the placeholder" in answer.json()["Message"]
    answer = orthanc.post("/kheops/oe2/send", json={"Resources": f"{first},{series_id}"})
    assert answer.json()["Queued"] == 2  # {CommaSeparatedUUIDs}; the series is in the study

    # OE2's plugin list opens the app.
    root = orthanc.get("/plugins/python").json().get("RootUri", "")
    assert root.endswith("/kheops/app/index.html")


def test_the_docker_configuration_carries_the_readme_block() -> None:
    docker = json.loads((REPOSITORY / "docker" / "orthanc.json").read_text(encoding="utf-8"))
    assert docker["OrthancExplorer2"]["UiOptions"]["CustomButtons"] == custom_buttons()
