"""Run a real Orthanc on free ports, in its own work directory, for tests, the demo and benchmarks.

    orthanc = OrthancProcess(workdir)                         # plain Orthanc
    orthanc = OrthancProcess(workdir, kheops={...})           # with this repository's plugin
    orthanc.start()
    orthanc.upload(dicom_bytes)
    orthanc.storescu([corpus_dir])
    orthanc.stop()

The configuration is written to `workdir/orthanc.json`; Orthanc's stdout and stderr are appended
to `workdir/orthanc.log`; storage and index live in `workdir/storage` and `workdir/index`, so a
restart (after `stop` or `kill`) finds the same data on the same ports.
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import requests

from tests.waiting import wait_until

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
PLUGINS_DIRECTORY = Path("/usr/share/orthanc/plugins")
PYTHON_PLUGIN = PLUGINS_DIRECTORY / "libOrthancPython.so"
DICOMWEB_PLUGIN = PLUGINS_DIRECTORY / "libOrthancDicomWeb.so"
ENTRYPOINT = Path(__file__).resolve().parent.parent / "plugin" / "entrypoint.py"

# DCMTK (in Orthanc and in storescu) leaves Nagle's algorithm on unless this variable says
# otherwise; with it on, every C-STORE waits ~40-90 ms for a delayed ACK.
_DCMTK_ENVIRONMENT = {"TCP_NODELAY": "1"}
_REQUEST_TIMEOUT = 30.0
_STORESCU_BATCH = 500  # files per storescu run (one association each)
_LOG_TAIL_LINES = 60
# Orthanc 1.13 logs a second line for each, with the time it took.
_READINESS_CHECK = re.compile(r"\(http\) GET /(system|kheops/status)( \(elapsed: [^)]*\))?$")


class OrthancError(RuntimeError):
    """Orthanc did not do what the harness asked: start, stop, store."""


class OrthancStartError(OrthancError):
    """Orthanc exited or did not become ready during `start`; the message has the log tail."""


class OrthancProcess:
    """One Orthanc server process, its configuration, work directory and HTTP session."""

    aet = "ORTHANC"

    def __init__(
        self,
        workdir: Path,
        *,
        kheops: Mapping[str, Any] | None = None,
        dicomweb_servers: Mapping[str, Any] | None = None,
        load_dicomweb: bool = False,
        extra_config: Mapping[str, Any] | None = None,
        verbose: bool = True,
        credentials: tuple[str, str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Choose free ports and build the configuration; nothing runs until `start`.

        `kheops` loads the python plugin with this repository's entry script and becomes the
        "Kheops" section (with a "StateDirectory" in the work directory unless given);
        `dicomweb_servers` (implies `load_dicomweb`) becomes "DicomWeb.Servers"; `extra_config`
        is merged last, recursively for nested objects; `env` is added to Orthanc's environment.
        """
        self.workdir = Path(workdir)
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self.kheops = copy.deepcopy(dict(kheops)) if kheops is not None else None
        self.verbose = verbose
        self.env = dict(env or {})
        self.http_port, self.dicom_port = free_ports(2)
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.config = self._build_config(
            dicomweb_servers=dicomweb_servers,
            load_dicomweb=load_dicomweb or dicomweb_servers is not None,
            extra_config=extra_config,
            credentials=credentials,
        )
        self.session = requests.Session()
        if credentials is not None:
            self.session.auth = credentials
        self._process: subprocess.Popen[bytes] | None = None
        self._expected_exit = False

    def __repr__(self) -> str:
        process = self._live_process()
        state = "stopped" if process is None else f"pid {process.pid}"
        return f"<OrthancProcess {self.url} dicom:{self.dicom_port} {state} in {self.workdir}>"

    # --- Configuration ---------------------------------------------------------------------

    def _build_config(
        self,
        *,
        dicomweb_servers: Mapping[str, Any] | None,
        load_dicomweb: bool,
        extra_config: Mapping[str, Any] | None,
        credentials: tuple[str, str] | None,
    ) -> dict[str, Any]:
        plugins = []
        if self.kheops is not None:
            plugins.append(str(PYTHON_PLUGIN))
        if load_dicomweb:
            plugins.append(str(DICOMWEB_PLUGIN))
        config: dict[str, Any] = {
            "Name": f"orthanc-kheops-test-{self.http_port}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": True,
            "AuthenticationEnabled": credentials is not None,
            "DicomAet": self.aet,
            "DicomCheckCalledAet": False,
            # No resource becomes stable during a test: python plugin 7.1 aborts Orthanc's
            # shutdown when a stable event comes after ORTHANC_STOPPED (README, Limitations;
            # pinned by test_orthanc_stacks), and nothing here reads stable events.
            "StableAge": 3600,
            "Plugins": plugins,
        }
        if credentials is not None:
            user, password = credentials
            config["RegisteredUsers"] = {user: password}
        if self.kheops is not None:
            config["PythonScript"] = str(ENTRYPOINT)
            config["Kheops"] = {"StateDirectory": str(self.workdir / "kheops-state"), **self.kheops}
        if load_dicomweb:
            servers = copy.deepcopy(dict(dicomweb_servers or {}))
            config["DicomWeb"] = {"Enable": True, "Servers": servers}
        return merged(config, extra_config or {})

    # --- Process lifecycle -----------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._live_process() is not None

    @property
    def pid(self) -> int:
        process = self._live_process()
        if process is None:
            raise OrthancError(f"{self!r} is not running")
        return process.pid

    @property
    def returncode(self) -> int | None:
        """Exit code of the last process, or None if it never ran or still runs."""
        return None if self._process is None else self._process.poll()

    def start(self, timeout: float = 60) -> None:
        """Write the configuration, start Orthanc and wait until it answers.

        Ready means GET /system answers 200 and, when the plugin is loaded, GET /kheops/status
        too. Raises OrthancStartError (with the log tail) if Orthanc exits or is not ready
        within `timeout` seconds; in that case the process is killed.
        """
        if self.is_running:
            raise OrthancError(f"{self!r} is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config, indent=2) + "\n")
        command = [str(ORTHANC_BINARY)]
        if self.verbose:
            command.append("--verbose")
        command.append(str(self.config_path))
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **_DCMTK_ENVIRONMENT, **self.env},
            )
        self._expected_exit = False
        pending = ["/system"] if self.kheops is None else ["/system", "/kheops/status"]
        try:
            wait_until(lambda: self._is_ready(pending), timeout=timeout)
        except TimeoutError as exc:
            self.kill()
            raise OrthancStartError(
                f"Orthanc was not ready within {timeout:g} s: GET {pending[0]} did not answer 200"
                f"\n{self._log_excerpt()}"
            ) from exc
        except OrthancStartError:
            self._expected_exit = True  # reported by this exception, not a crash to report again
            raise

    def _is_ready(self, pending: list[str]) -> bool:
        """Whether each path in `pending` answers 200, in turn; removes those that did."""
        code = self.returncode
        if code is not None:
            raise OrthancStartError(
                f"Orthanc exited with code {code} during startup\n{self._log_excerpt()}"
            )
        while pending:
            try:
                if self.get(pending[0], timeout=2).status_code != 200:
                    return False
            except requests.RequestException:
                return False
            pending.pop(0)
        return True

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM and wait; raise if Orthanc needed SIGKILL after `timeout` or exited non-zero.

        Does nothing if Orthanc is not running.
        """
        stop_all([self], timeout=timeout)

    def kill(self) -> None:
        """SIGKILL and wait: a crash, as far as Orthanc and the plugin can tell."""
        process = self._live_process()
        if process is not None:
            self._expected_exit = True
            process.kill()
            process.wait()

    @property
    def exited_unexpectedly(self) -> bool:
        """Whether the last process ended without `stop` or `kill` (a crash, or a failed start)."""
        return self._process is not None and self.returncode is not None and not self._expected_exit

    def _live_process(self) -> subprocess.Popen[bytes] | None:
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process

    def restart(self, timeout: float = 60) -> None:
        """Stop if running, then start again with the same ports, directories and config."""
        if self.is_running:
            self.stop()
        self.start(timeout=timeout)

    def __enter__(self) -> Self:
        if not self.is_running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # --- Logs and resources ----------------------------------------------------------------

    @property
    def log(self) -> str:
        """Everything Orthanc wrote to stdout and stderr, over all its runs in this workdir."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        return "\n".join(self.log.splitlines()[-lines:])

    def _log_excerpt(self) -> str:
        """The log tail without the access lines of the readiness checks."""
        lines = [line for line in self.log.splitlines() if not _READINESS_CHECK.search(line)]
        tail = "\n".join(lines[-_LOG_TAIL_LINES:])
        return f"--- last lines of {self.log_path} (readiness checks left out) ---\n{tail}"

    def rss_bytes(self) -> int:
        """Resident set size now (VmRSS)."""
        return self._proc_status_bytes("VmRSS")

    def peak_rss_bytes(self) -> int:
        """Peak resident set size since the process started (VmHWM)."""
        return self._proc_status_bytes("VmHWM")

    def _proc_status_bytes(self, field: str) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(rf"^{field}:\s+(\d+) kB$", status, re.MULTILINE)
        if match is None:
            raise OrthancError(f"no {field} in /proc/{self.pid}/status")
        return int(match.group(1)) * 1024

    # --- REST ------------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """`session.request` on `url + path`, with a default timeout; no status check."""
        kwargs.setdefault("timeout", _REQUEST_TIMEOUT)
        return self.session.request(method, f"{self.url}/{path.lstrip('/')}", **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("PUT", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("DELETE", path, **kwargs)

    def upload(self, data: bytes) -> str:
        """POST /instances; returns the Orthanc id (also when the instance was already stored)."""
        response = self.post("/instances", data=data, headers={"Content-Type": "application/dicom"})
        if response.status_code != 200:
            raise OrthancError(
                f"POST /instances answered {response.status_code}: {response.text[:500]}"
            )
        return str(response.json()["ID"])

    def instance_ids(self) -> list[str]:
        response = self.get("/instances")
        response.raise_for_status()
        return [str(identifier) for identifier in response.json()]

    # --- DICOM -----------------------------------------------------------------------------

    def storescu(
        self, files: Sequence[Path], *, calling_aet: str = "STORESCU", timeout: float = 600
    ) -> None:
        """C-STORE files (directories are searched recursively) to this Orthanc with storescu.

        Runs storescu once (one association) per batch of 500 files, each run within `timeout`
        seconds; raises OrthancError unless storescu exits 0 and reports Success for every file.
        Returns once Orthanc has answered every C-STORE, so the instances are stored.
        """
        paths = list(_expand(files))
        for start in range(0, len(paths), _STORESCU_BATCH):
            batch = paths[start : start + _STORESCU_BATCH]
            command = [
                "storescu", "--verbose", "--required",
                "--aetitle", calling_aet, "--call", self.aet,
                "--timeout", "30", "--acse-timeout", "30", "--dimse-timeout", "60",
                "127.0.0.1", str(self.dicom_port),
                *map(str, batch),
            ]  # fmt: skip
            try:
                result = subprocess.run(
                    command,
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                    env={**os.environ, **_DCMTK_ENVIRONMENT},
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise OrthancError(f"storescu still ran after {timeout:g} s: killed it") from exc
            output = result.stdout + result.stderr
            succeeded = output.count("Received Store Response (Success)")
            if result.returncode != 0 or succeeded != len(batch):
                tail = "\n".join(output.splitlines()[-20:])
                raise OrthancError(
                    f"storescu exited with {result.returncode} after {succeeded} successful"
                    f" C-STOREs of {len(batch)} (files {start}..{start + len(batch) - 1}):\n{tail}"
                )


class OrthancFactory(Protocol):
    """What the `orthanc_factory` fixture is: OrthancProcess arguments, plus where and whether
    to start (the default workdir is a fresh directory under the test's tmp_path)."""

    def __call__(
        self, workdir: Path | None = None, *, start: bool = True, **kwargs: Any
    ) -> OrthancProcess: ...


def stop_all(processes: Iterable[OrthancProcess], *, timeout: float = 30) -> None:
    """SIGTERM every running process first, then wait for each (Orthanc takes 1-3 s to stop).

    Raises OrthancError, after all have been waited for, naming those that were still running
    after `timeout` (then killed) or exited with a non-zero code.
    """
    stopping = []
    for orthanc in processes:
        process = orthanc._live_process()
        if process is not None:
            stopping.append((orthanc, process))
    for orthanc, process in stopping:
        orthanc._expected_exit = True
        orthanc.session.close()  # an idle keep-alive connection delays Orthanc's HTTP shutdown
        process.terminate()
    failures = []
    for orthanc, process in stopping:
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            failures.append(f"{orthanc!r} still ran {timeout:g} s after SIGTERM: killed it")
        else:
            if code == 0:
                continue
            failures.append(f"{orthanc!r} exited with code {code} after SIGTERM")
        failures.append(orthanc._log_excerpt())
    if failures:
        raise OrthancError("\n".join(failures))


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that were free a moment ago (bound to port 0, then closed)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind(("", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _expand(paths: Iterable[Path]) -> Iterable[Path]:
    for path in map(Path, paths):
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def merged(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` updated by `overrides`, recursing where both hold an object."""
    result = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result
