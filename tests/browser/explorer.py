"""Orthanc Explorer in headless Chromium: the browser, the KHEOPS test server, screenshots.

Orthanc runs with its HTTP authentication on; the browser logs in with Basic credentials, as an
administrator would. Every answer of the /kheops/... routes the browser receives is recorded,
so that a test can check no token ever reached it in clear.
"""

from __future__ import annotations

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
# Not docs/screenshots: a test run leaves committed files alone; `make screenshots` copies these.
SCREENSHOTS = Path(__file__).resolve().parents[2] / "build" / "screenshots"
VIEWPORT: ViewportSize = {"width": 1280, "height": 900}


class Explorer:
    """A browser tab on Orthanc Explorer, logged in, that records the plugin's answers."""

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
        self.page.goto(f"{self.orthanc.url}/app/explorer.html#{fragment}")
        return self.page

    def assert_no_token_shown(self, tokens: Sequence[str]) -> None:
        html = self.page.content()
        for token in tokens:
            assert token not in html, "a token is in the page"
            assert not [a for a in self.answers if token in a], "a token reached the browser"


OpenExplorer = Callable[[OrthancProcess], Explorer]


def save_screenshot(page: Page, name: str) -> Path:
    """Write build/screenshots/<name>.png, the picture the README shows, from this very page."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    # jQuery Mobile fades from page to page: wait until no page is half-shown.
    page.wait_for_function(
        "() => !document.body.classList.contains('ui-mobile-viewport-transitioning')"
        " && !document.querySelector('.ui-page.in, .ui-page.out')"
    )
    page.screenshot(path=str(path), full_page=True)
    return path


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
