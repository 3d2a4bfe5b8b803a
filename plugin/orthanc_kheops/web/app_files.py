"""The files of the KHEOPS web app (web/app/), served by the plugin under /kheops/app/.

The app is plain HTML, CSS and ES modules: no build step, so what is in the package is what
the browser runs. Only the files of that one folder are served, looked up by exact name, so no
path can reach anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

APP_FOLDER = Path(__file__).parent / "app"

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


# Orthanc drops a URI's trailing slash, so /kheops/app/ reaches the plugin as /kheops/app, and
# no relative redirect works from both: this page goes to index.html beside it, hash and all.
ENTRY_PAGE = (
    b"<!doctype html><meta charset=utf-8><title>KHEOPS</title><script>"
    b"location.replace(location.pathname.replace(/\\/?$/, '/index.html') + location.hash)"
    b"</script><a href=app/index.html>Open the KHEOPS app</a>"
)


@dataclass(frozen=True)
class AppFile:
    content_type: str
    body: bytes


def app_file(name: str, folder: Path = APP_FOLDER) -> AppFile | None:
    """The file `name` of the app, or None if the app has no such file."""
    known = {p.name: p for p in folder.iterdir() if p.is_file() and p.suffix in _TYPES}
    path = known.get(name)
    if path is None:
        return None
    return AppFile(_TYPES[path.suffix], path.read_bytes())
