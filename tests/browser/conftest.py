"""Fixtures of the browser tests: one Chromium per session, a context per test, KHEOPS."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Playwright, expect, sync_playwright

from tests.browser.explorer import (
    CHROMIUM,
    CHROMIUM_ARGS,
    CREDENTIALS,
    VIEWPORT,
    Explorer,
    OpenExplorer,
)
from tests.orthanc_process import OrthancFactory, OrthancProcess
from tests.plugin_setup import Album

expect.set_options(timeout=30_000)


@pytest.fixture(scope="session")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="session")
def browser(playwright: Playwright) -> Iterator[Browser]:
    chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield chromium
    chromium.close()


@pytest.fixture
def kheops(album: Album) -> Album:
    """The main album, under the name these tests use for the KHEOPS they talk to."""
    return album


@pytest.fixture
def start_orthanc(orthanc_factory: OrthancFactory, kheops: Album) -> OrthancFactory:
    """Start an Orthanc with the plugin pointed at `kheops` and authentication on."""

    def start(workdir: Path | None = None, *, start: bool = True, **kwargs: Any) -> OrthancProcess:
        kwargs.setdefault("kheops", kheops.section(Workers=1))
        return orthanc_factory(workdir, start=start, credentials=CREDENTIALS, **kwargs)

    return start


@pytest.fixture
def open_explorer(browser: Browser) -> Iterator[OpenExplorer]:
    """Open Explorer of an Orthanc in a fresh, logged-in browser context."""
    contexts: list[BrowserContext] = []

    def open_for(orthanc: OrthancProcess) -> Explorer:
        user, password = CREDENTIALS
        context = browser.new_context(
            http_credentials={"username": user, "password": password}, viewport=VIEWPORT
        )
        contexts.append(context)
        return Explorer(context.new_page(), orthanc)

    yield open_for
    for context in contexts:
        context.close()
