"""The KHEOPS app and Orthanc Explorer in headless Chromium: the browser, screenshots, axe.

Orthanc runs with its HTTP authentication on; the browser logs in with Basic credentials, as an
administrator would. Every answer of the /kheops/... routes the browser receives is recorded,
so that a test can check no token ever reached it in clear.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

from playwright.sync_api import Page, Response, ViewportSize

from tests.corpus import make_dataset, new_uid, to_bytes
from tests.orthanc_process import OrthancProcess

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
CREDENTIALS = ("admin", "kheops-browser-test")
REPOSITORY = Path(__file__).resolve().parents[2]
# Tests write their pictures into build/; `make screenshots` copies them to docs/screenshots/.
SCREENSHOTS = REPOSITORY / "build" / "screenshots"
AXE_VERSION = "4.14.1"
AXE_FOLDER = REPOSITORY / "build" / "test" / f"axe-core-{AXE_VERSION}"
VIEWPORT: ViewportSize = {"width": 1280, "height": 900}


class Explorer:
    """A browser tab on the KHEOPS app or Orthanc Explorer, logged in, that records the plugin's
    answers."""

    def __init__(self, page: Page, orthanc: OrthancProcess) -> None:
        self.page = page
        self.orthanc = orthanc
        self.answers: list[str] = []
        page.on("response", self._record)

    def _record(self, response: Response) -> None:
        if "/kheops/" in response.url:
            try:
                self.answers.append(response.text())
            except Exception:  # noqa: BLE001 -- a body that is gone (navigation) holds nothing
                return

    def open(self, fragment: str) -> Page:
        """Orthanc Explorer (the legacy UI) at #fragment."""
        self.page.goto(f"{self.orthanc.url}/app/explorer.html#{fragment}")
        return self.page

    def open_app(self, fragment: str = "") -> Page:
        """The KHEOPS app at #fragment, entered the way a user types it: /kheops/app/."""
        self.page.goto(f"{self.orthanc.url}/kheops/app/#{fragment}")
        self.page.wait_for_url(re.compile(r"/kheops/app/index\.html(#|$)"))
        return self.page

    def assert_no_token_shown(self, tokens: Sequence[str]) -> None:
        html = self.page.content()
        for token in tokens:
            assert token not in html, "a token is in the page"
            assert not [a for a in self.answers if token in a], "a token reached the browser"


OpenExplorer = Callable[[OrthancProcess], Explorer]


def save_screenshot(page: Page, name: str) -> Path:
    """Write build/screenshots/<name>.png, from this very page (`make screenshots` publishes it)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def axe_script() -> str:
    """axe-core, which `make install` fetches from the npm registry into build/test/."""
    script = AXE_FOLDER / "package" / "axe.min.js"
    assert script.exists(), f"{script} is missing: `make install` fetches axe-core {AXE_VERSION}"
    return script.read_text(encoding="utf-8")


def serious_violations(page: Page, script: str) -> list[str]:
    """axe-core's serious and critical findings on the page as shown now, one line each."""
    page.add_script_tag(content=script)
    found = page.evaluate(
        "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
    )
    return [
        f"{v['id']} ({v['impact']}): {v['help']}: "
        + ", ".join(str(n["target"]) for n in v["nodes"][:5])
        for v in found
        if v["impact"] in ("serious", "critical")
    ]


def instance(
    *,
    study_uid: str,
    series_uid: str,
    modality: str = "CT",
    series_number: int = 1,
    description: str = "",
    patient: tuple[str, str] = ("P-BROWSER", "EXPLORER^ANNA"),
    study_description: str = "CHEST CT",
) -> tuple[str, bytes]:
    """One instance of a series: its SOP Instance UID and its bytes."""
    sop_uid = new_uid()
    dataset = make_dataset(
        patient_id=patient[0],
        patient_name=patient[1],
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        modality=modality,
        series_number=series_number,
        series_description=description,
        study_description=study_description,
    )
    return sop_uid, to_bytes(dataset)
