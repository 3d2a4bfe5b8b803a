"""The benchmark's KHEOPS (bench/sink.py) in its own process, steered through /_test routes.

A separate process, so that its GIL is shared neither with the bench's clients nor with the
plugin: on two cores, one Python process reading every STOW part's header is the sink.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import requests

from bench.sink import LISTENING
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
ALBUM = "BenchAlbum01"
TOKEN = "BenchMainAlbumToken001"
# The tests' certificate for 127.0.0.1, its own CA: test data, as the sink is.
TLS_CERTIFICATE = ROOT / "tests" / "unit" / "data" / "localhost-tls.crt"
TLS_KEY = ROOT / "tests" / "unit" / "data" / "localhost-tls.key"


@dataclass(frozen=True)
class Window:
    """When the accepted STOW-RS requests of a run began and ended, on the monotonic clock
    that the bench and the sink share: a run is timed by what the sink saw, not by polling."""

    first_started: float
    first_ended: float  # the first instance stored
    last_ended: float  # the last instance stored
    parts: tuple[int, ...]
    chunk_bytes: int = 0  # the largest mean chunk size of a chunked request; 0: none was

    @property
    def seconds(self) -> float:
        return self.last_ended - self.first_started


class KheopsProcess:
    """`python -m bench.sink` with one album and its write token; with `tls`, over HTTPS."""

    def __init__(self, workdir: Path, *, tls: bool = False) -> None:
        self.workdir = workdir
        self.url = ""
        self.tls = tls
        self._process: subprocess.Popen[str] | None = None
        self._session = requests.Session()

    def start(self, timeout: float = 30) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "kheops.log").open("ab")
        tls = ["--tls", str(TLS_CERTIFICATE), str(TLS_KEY)] if self.tls else []
        self._process = subprocess.Popen(
            [sys.executable, "-m", "bench.sink", "--album", ALBUM, "--token", TOKEN, *tls],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        assert self._process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self._process.stdout.readline()
            if not line:
                raise RuntimeError(f"the KHEOPS sink exited; see {self.workdir}/kheops.log")
            if line.startswith(LISTENING):
                self.url = line[len(LISTENING) :].strip()
                break
        wait_until(lambda: self._control("GET", "health").ok, timeout=timeout)

    def stop(self) -> None:
        self._session.close()
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._process is not None and self._process.stdout is not None:
            self._process.stdout.close()
        self._process = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    @property
    def api(self) -> str:
        return f"{self.url}/api"

    @property
    def verify(self) -> bool | str:
        """What a client checks the sink's certificate against (requests' `verify`)."""
        return str(TLS_CERTIFICATE) if self.tls else True

    def plugin_settings(self) -> dict[str, Any]:
        """The plugin's settings that reach this sink: its URL, token and CA."""
        return {"Url": self.url, "Token": TOKEN} | (
            {"VerifyTls": str(TLS_CERTIFICATE)} if self.tls else {}
        )

    def orthanc_settings(self) -> dict[str, Any]:
        """Orthanc's settings for its own HTTP client (the DICOMweb plugin's) to trust the sink."""
        if not self.tls:
            return {}
        return {"HttpsVerifyPeers": True, "HttpsCACertificates": str(TLS_CERTIFICATE)}

    # --- control API ---------------------------------------------------------------------

    def _control(self, method: str, path: str, body: Any = None) -> requests.Response:
        return self._session.request(
            method, f"{self.url}/_test/{path}", json=body, timeout=30, verify=self.verify
        )

    def stores(self) -> int:
        """Instances accepted so far, re-sends included: progress is a difference of two reads."""
        response = self._control("GET", "counts")
        response.raise_for_status()
        return int(response.json()["stores"])

    def await_stores(self, count: int, *, timeout: float = 600) -> None:
        """Block until the sink has accepted `count` instances in all (re-sends included)."""
        response = self._session.get(
            f"{self.url}/_test/await",
            params={"stores": count},
            timeout=timeout + 30,
            verify=self.verify,
        )
        response.raise_for_status()
        if int(response.json()["stores"]) < count:
            raise TimeoutError(f"the sink holds {response.json()['stores']} of {count} instances")

    def album_instances(self) -> set[str]:
        response = self._control("GET", f"albums/{ALBUM}/instances")
        response.raise_for_status()
        return set(response.json()["instances"])

    def stow_requests(self) -> list[int]:
        """Part counts of the STOW-RS requests KHEOPS accepted whole since the last clear."""
        response = self._control("GET", "requests?full=1")
        response.raise_for_status()
        return [
            int(entry["part_count"])
            for entry in response.json()["requests"]
            if entry["method"] == "POST"
            and entry["path"] == "/api/studies"
            and entry["status"] == 200
        ]

    def stow_window(self) -> Window:
        """The accepted STOW-RS requests since the last clear, timed on the sink's clock."""
        response = self._control("GET", "requests?full=1")
        response.raise_for_status()
        accepted = [
            entry
            for entry in response.json()["requests"]
            if entry["method"] == "POST"
            and entry["path"] == "/api/studies"
            and entry["status"] in (200, 202)
        ]
        if not accepted:
            return Window(0.0, 0.0, 0.0, ())
        return Window(
            first_started=min(float(e["started"]) for e in accepted),
            first_ended=min(float(e["ended"]) for e in accepted),
            last_ended=max(float(e["ended"]) for e in accepted),
            parts=tuple(int(e["part_count"]) for e in accepted),
            chunk_bytes=max(int(e.get("chunk_bytes", 0)) for e in accepted),
        )

    def clear_requests(self) -> None:
        self._control("DELETE", "requests").raise_for_status()

    def set_latency(self, seconds: float) -> None:
        self._control("PUT", "faults/latency", {"seconds": seconds}).raise_for_status()

    def set_down(self, down: bool) -> None:
        self._control("PUT", "faults/down", {"down": down}).raise_for_status()
