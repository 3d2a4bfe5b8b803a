"""The measurements: each scenario runs against the one KHEOPS test server and returns figures.

Progress is read from the test server's count of accepted instances, so a run is timed until
KHEOPS holds everything, whatever the sender; the count keeps growing across runs (re-sending
an instance is accepted again), so each run waits for its own difference.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import clients
from bench.corpus import Corpus
from bench.kheops import TOKEN, KheopsProcess
from bench.measure import POLL, CpuMeter, percentile, proc_status_bytes, timed_until
from tests.orthanc_process import OrthancProcess, merged
from tests.waiting import wait_until

# Outage detection is the probe interval; keeping it short keeps it out of the drain figures.
BENCH_PLUGIN_SETTINGS: Mapping[str, Any] = {
    "RetryInitialSeconds": 1,
    "RetryMaximumSeconds": 1,
    "LogLevel": "warning",
}
_TIMEOUT = 900.0
_STORESCU_PROCESSES = 4  # parallel associations for the memory backlog


@dataclass
class Run:
    """One contender at one latency: the wall time of each repetition and where the CPU went."""

    key: str
    label: str
    instances: int
    megabytes: float
    latency: float = 0.0
    seconds: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # of the fastest repetition
    requests: str = ""  # how the instances travelled, in the last repetition
    detections: list[float] = field(default_factory=list)  # drains: KHEOPS back -> first stored
    notes: list[str] = field(default_factory=list)

    @property
    def time(self) -> float:
        """The fastest repetition: on a shared machine, noise only ever adds time."""
        return min(self.seconds)

    @property
    def rate(self) -> float:
        return self.instances / self.time

    def add(self, seconds: float, cpu: Mapping[str, float]) -> None:
        if not self.seconds or seconds < self.time:
            self.cpu = dict(cpu)
        self.seconds.append(seconds)

    def cpu_per_thousand(self) -> dict[str, float]:
        return {name: 1000 * used / self.instances for name, used in self.cpu.items()}


@dataclass
class Lag:
    """Store in Orthanc -> confirmed in the album, per instance, from the plugin's own records."""

    p50: float
    p95: float
    maximum: float


@dataclass
class Memory:
    """RSS of a plain Orthanc and of one with the plugin, idle, then with the same backlog."""

    backlog: int
    storage_cache: str  # Orthanc's own file cache setting for both: it dwarfs everything else
    plain_idle: int
    plain_peak: int
    plugin_idle: int
    plugin_peak: int
    queued: int
    outbox_bytes: int

    @property
    def plugin_growth(self) -> int:
        return self.plugin_peak - self.plugin_idle

    @property
    def plain_growth(self) -> int:
        return self.plain_peak - self.plain_idle


@dataclass
class SweepPoint:
    workers: int
    batch: int
    latency: float
    seconds: float
    instances: int
    peak_rss: int  # of an Orthanc started for this point: what the drain itself needed

    @property
    def rate(self) -> float:
        return self.instances / self.seconds


@dataclass
class LingerPoint:
    linger_ms: int
    ingest_seconds: float
    plain_seconds: float
    lag: Lag
    requests: str
    orthanc_cpu: float


@dataclass
class Settings:
    repeat: int
    ingest_repeat: int
    latency: float
    plugin: Mapping[str, Any]  # the "Kheops" settings under test, on top of the defaults
    orthanc: Mapping[str, Any] = field(default_factory=dict)  # for every Orthanc with the plugin
    sink_batch: int = 50
    sink_connections: int = 2
    sweep_workers: Sequence[int] = (1, 2, 4, 8)
    sweep_batches: Sequence[int] = (10, 25, 50, 100)
    sweep_latencies: Sequence[float] = (0.0, 0.05)
    sweep_repeat: int = 1
    linger_values: Sequence[int] = ()
    memory_caches: Sequence[int | None] = (0,)


def with_orthanc_settings(
    arguments: Mapping[str, Any], settings: Mapping[str, Any]
) -> dict[str, Any]:
    """OrthancProcess arguments with the Orthanc settings under test (`--orthanc`) merged into
    their extra configuration, for an Orthanc that runs the plugin: a plain Orthanc, the
    baseline, keeps its own."""
    result = dict(arguments)
    if result.get("kheops") is not None and settings:
        result["extra_config"] = merged(dict(settings), result.get("extra_config") or {})
    return result


class Bench:
    """Runs scenarios; owns every Orthanc it starts and ends them all in `close`."""

    def __init__(
        self,
        *,
        settings: Settings,
        kheops: KheopsProcess,
        corpus: Corpus,
        workdir: Path,
        log: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.kheops = kheops
        self.corpus = corpus
        self.workdir = workdir
        self.log = log
        self._orthancs: list[OrthancProcess] = []
        self._files: list[bytes] | None = None
        self._runs: dict[tuple[str, float], Run] = {}
        self.ingest: dict[str, Run] = {}
        self.lag: Lag | None = None

    # --- plumbing ----------------------------------------------------------------------

    def close(self) -> None:
        for orthanc in list(self._orthancs):
            self.retire(orthanc)

    def _orthanc(self, name: str, **kwargs: Any) -> OrthancProcess:
        workdir = self.workdir / name
        shutil.rmtree(workdir, ignore_errors=True)
        orthanc = OrthancProcess(
            workdir, verbose=False, **with_orthanc_settings(kwargs, self.settings.orthanc)
        )
        self._orthancs.append(orthanc)
        orthanc.start()
        return orthanc

    def retire(self, orthanc: OrthancProcess) -> None:
        """End an Orthanc and free its disk. SIGKILL: a clean stop takes Orthanc 3.5 s and
        nothing of its state is read afterwards."""
        orthanc.kill()
        orthanc.session.close()
        if orthanc in self._orthancs:
            self._orthancs.remove(orthanc)
        shutil.rmtree(orthanc.workdir, ignore_errors=True)

    def orthanc(self, name: str, **kwargs: Any) -> OrthancProcess:
        """A fresh Orthanc, retired by `close` unless `retire` came first."""
        return self._orthanc(name, **kwargs)

    def defaults_section(self) -> dict[str, Any]:
        """The plugin's defaults (but for quieter logs) and the settings under test."""
        return {
            **self.kheops.plugin_settings(),
            "LogLevel": "warning",
            **self.settings.plugin,
        }

    def meter(self, sender_pid: int | None) -> CpuMeter:
        """CPU of the sink and of the sender: an Orthanc, or this process (None)."""
        sender = ("client", os.getpid()) if sender_pid is None else ("orthanc", sender_pid)
        return CpuMeter(dict([("kheops", self.kheops.pid), sender]))

    def dicomweb_orthanc(self, name: str) -> OrthancProcess:
        """A plain Orthanc whose DICOMweb plugin knows the sink as the server "kheops"."""
        return self._orthanc(
            name,
            dicomweb_servers={
                "kheops": {
                    "Url": self.kheops.api,
                    "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"},
                }
            },
            extra_config=self.kheops.orthanc_settings(),
        )

    def plugin_section(self, **overrides: Any) -> dict[str, Any]:
        return {
            **self.kheops.plugin_settings(),
            **BENCH_PLUGIN_SETTINGS,
            **self.settings.plugin,
            **overrides,
        }

    def runs(self) -> list[Run]:
        return list(self._runs.values())

    def _run(self, key: str, label: str, latency: float = 0.0) -> Run:
        return self._runs.setdefault(
            (key, latency),
            Run(key, label, len(self.corpus), self.corpus.megabytes, latency=latency),
        )

    def _ingest(self, key: str, label: str) -> Run:
        return self.ingest.setdefault(
            key, Run(f"ingest_{key}", label, len(self.corpus), self.corpus.megabytes)
        )

    def _files_in_memory(self) -> list[bytes]:
        if self._files is None:
            self._files = [path.read_bytes() for path in self.corpus.paths]
        return self._files

    def arrived(self, baseline: int, count: int) -> Callable[[], bool]:
        return lambda: self.kheops.stores() - baseline >= count

    @contextmanager
    def _latency(self, seconds: float) -> Iterator[None]:
        self.kheops.set_latency(seconds)
        try:
            yield
        finally:
            self.kheops.set_latency(0)

    def _meter(self, orthanc: OrthancProcess | None = None) -> CpuMeter:
        """CPU of KHEOPS and of the sender: Orthanc, or this process when it is the client."""
        sender = ("orthanc", orthanc.pid) if orthanc is not None else ("client", os.getpid())
        return CpuMeter(dict([("kheops", self.kheops.pid), sender]))

    def _stow_requests(self) -> str:
        """How the instances travelled since the last call: requests and parts per request."""
        parts = self.kheops.stow_requests()
        self.kheops.clear_requests()
        if not parts:
            return "no request"
        per = sum(parts) / len(parts)
        if len(set(parts)) == 1:
            return f"{len(parts)} request{'s' * (len(parts) != 1)} of {parts[0]} part{'s' * (parts[0] != 1)}"
        return f"{len(parts)} requests of {per:.1f} parts on average"

    def _timed_store(self, orthanc: OrthancProcess, run: Run) -> None:
        run.add(*self.timed_store(orthanc))

    def timed_store(self, orthanc: OrthancProcess) -> tuple[float, dict[str, float]]:
        """storescu of the corpus into an Orthanc: the seconds it took, and the CPU."""
        meter = self._meter(orthanc)
        meter.start()
        began = time.perf_counter()
        orthanc.storescu(list(self.corpus.paths))
        return time.perf_counter() - began, meter.stop()

    def _sent(self, orthanc: OrthancProcess) -> int:
        return int(orthanc.get("/kheops/status").json()["Counts"]["Sent"])

    def _queued(self, orthanc: OrthancProcess) -> int:
        counts = orthanc.get("/kheops/status").json()["Counts"]
        return int(counts["Queued"]) + int(counts["InFlight"])

    # --- 1 to 4 and 8: the contenders, round by round ------------------------------------

    def throughput(self, contenders: set[str]) -> OrthancProcess | None:
        """Each round runs every contender once at each latency, so that the noise of a shared
        machine falls on all of them alike; each keeps its fastest round.

        Returns the plugin's Orthanc, corpus stored, for the sweep; the caller retires it.
        """
        latencies = (0.0, self.settings.latency)
        dicomweb = self._dicomweb_orthanc() if "dicomweb" in contenders else None
        plugin = self._plugin_orthanc() if contenders & {"drain", "sweep"} else None
        if "drain" not in contenders:
            self.kheops.set_down(False)
        outage = True  # the first drain is the backlog stored while KHEOPS was down
        try:
            for round_number in range(1, self.settings.repeat + 1):
                last = round_number == self.settings.repeat
                self.log(f"   round {round_number} of {self.settings.repeat}")
                for latency in latencies:
                    with self._latency(latency):
                        # First, as KHEOPS is down from the start until the outage drain.
                        if plugin is not None and "drain" in contenders:
                            self._drain(plugin, latency, outage=outage)
                            outage = False
                        if "sink" in contenders and latency == 0:
                            self._sink()
                        if dicomweb is not None:
                            self._dicomweb(dicomweb, latency)
                        # Sleep-bound at 50 ms (2000 x 50 ms): one run says it all.
                        if "per-instance" in contenders and (latency == 0 or last):
                            self._per_instance(latency)
            # Peak RSS since start: storing, then every STOW of the rounds.
            self._note_peak(dicomweb, "dicomweb")
            self._note_peak(plugin, "drain")
        except BaseException:
            if plugin is not None:
                self.retire(plugin)
            raise
        finally:
            if dicomweb is not None:
                self.retire(dicomweb)
            self.kheops.set_down(False)
        if plugin is not None and outage:
            # No drain ran: let the stored backlog go before the sweep.
            wait_until(lambda: self._queued(plugin) == 0, timeout=_TIMEOUT)
        return plugin

    def _note_peak(self, orthanc: OrthancProcess | None, key: str) -> None:
        if orthanc is None:
            return
        peak = proc_status_bytes(orthanc.pid, "VmHWM") / 2**20
        for run in self.runs():
            if run.key == key and run.latency == 0:
                run.notes.append(f"Orthanc peak RSS {peak:.0f} MB over the rounds")

    def _sink(self) -> None:
        batch, connections = self.settings.sink_batch, self.settings.sink_connections
        run = self._run(
            "sink", f"Sink limit: bare client, batches of {batch}, {connections} connections"
        )
        files = self._files_in_memory()
        self.kheops.clear_requests()
        meter = self._meter()
        meter.start()
        began = time.perf_counter()
        clients.post_batches(
            self.kheops.api,
            TOKEN,
            files,
            batch=batch,
            connections=connections,
            verify=self.kheops.verify,
        )
        run.add(time.perf_counter() - began, meter.stop())
        run.requests = self._stow_requests()

    def _per_instance(self, latency: float) -> None:
        run = self._run(
            "per_instance", "Per-instance STOW: one request per instance, one connection", latency
        )
        files = self._files_in_memory()
        self.kheops.clear_requests()
        meter = self._meter()
        meter.start()
        began = time.perf_counter()
        clients.post_one_by_one(self.kheops.api, TOKEN, files, verify=self.kheops.verify)
        run.add(time.perf_counter() - began, meter.stop())
        run.requests = self._stow_requests()

    def _dicomweb_orthanc(self) -> OrthancProcess:
        orthanc = self.dicomweb_orthanc("dicomweb")
        self._timed_store(orthanc, self._ingest("dicomweb", "Orthanc with DICOMweb only"))
        return orthanc

    def _dicomweb(self, orthanc: OrthancProcess, latency: float) -> None:
        run = self._run("dicomweb", "Orthanc DICOMweb STOW client, all studies", latency)
        studies = orthanc.get("/studies").json()
        self.kheops.clear_requests()
        meter = self._meter(orthanc)
        baseline = self.kheops.stores()

        def post() -> None:
            response = orthanc.post(
                "/dicom-web/servers/kheops/stow",
                json={"Resources": studies, "Synchronous": True},
                timeout=_TIMEOUT,
            )
            response.raise_for_status()

        meter.start()
        seconds, _ = timed_until(post, self.arrived(baseline, len(self.corpus)), timeout=_TIMEOUT)
        run.add(seconds, meter.stop())
        run.requests = self._stow_requests()

    def _plugin_orthanc(self) -> OrthancProcess:
        """An Orthanc with the plugin, the corpus stored while KHEOPS is down: a backlog."""
        self.kheops.set_down(True)
        orthanc = self._orthanc("plugin", kheops=self.plugin_section())
        try:
            orthanc.storescu(list(self.corpus.paths))
        except BaseException:
            self.retire(orthanc)
            raise
        return orthanc

    def _drain(self, orthanc: OrthancProcess, latency: float, *, outage: bool) -> None:
        """Time from KHEOPS coming back until the album holds the whole backlog."""
        run = self._run("drain", "This plugin: backlog drain after an outage", latency)
        if not outage:
            # A new backlog: the corpus queued again while KHEOPS is down.
            self.kheops.set_down(True)
            studies = orthanc.get("/studies").json()
            orthanc.post("/kheops/send", json={"Resources": studies}).raise_for_status()
        count = len(self.corpus)
        wait_until(
            lambda: self._queued(orthanc) >= count,
            timeout=_TIMEOUT,
            message="the whole corpus queued while KHEOPS is down",
        )
        self.kheops.clear_requests()
        meter = self._meter(orthanc)
        baseline = self.kheops.stores()
        first: list[float] = []
        began = 0.0

        def done() -> bool:
            arrived = self.kheops.stores() - baseline
            if arrived and not first:
                first.append(time.perf_counter() - began)
            return arrived >= count

        meter.start()
        began = time.perf_counter()
        seconds, _ = timed_until(lambda: self.kheops.set_down(False), done, timeout=_TIMEOUT)
        run.add(seconds, meter.stop())
        run.detections.append(first[0] if first else seconds)
        run.requests = self._stow_requests()

    # --- 9: workers x batch size ----------------------------------------------------------

    def sweep(self, orthanc: OrthancProcess) -> list[SweepPoint]:
        """Re-queue the stored corpus at once under each setting, time until it is all sent.

        Whole passes over the grid are repeated, so that a burst of noise spoils one point of a
        pass rather than every repetition of one point; each point keeps its fastest pass.
        """
        best: dict[tuple[float, int, int], SweepPoint] = {}
        studies = orthanc.get("/studies").json()
        for number in range(1, self.settings.sweep_repeat + 1):
            self.log(f"   pass {number} of {self.settings.sweep_repeat}")
            for latency in self.settings.sweep_latencies:
                with self._latency(latency):
                    for workers in self.settings.sweep_workers:
                        for batch in self.settings.sweep_batches:
                            seconds = self._sweep_point(orthanc, studies, workers, batch)
                            peak = proc_status_bytes(orthanc.pid, "VmHWM")
                            point = SweepPoint(
                                workers, batch, latency, seconds, len(self.corpus), peak
                            )
                            self.log(
                                f"    workers {workers:>2} x batch {batch:>3}"
                                f" @ {latency * 1000:.0f} ms: {seconds:6.2f} s,"
                                f" {point.rate:6.0f} instances/s, peak RSS {peak / 2**20:.0f} MB"
                            )
                            key = (latency, workers, batch)
                            if key not in best or seconds < best[key].seconds:
                                best[key] = point
        self.kheops.clear_requests()
        return list(best.values())

    def _sweep_point(
        self, orthanc: OrthancProcess, studies: list[str], workers: int, batch: int
    ) -> float:
        orthanc.kill()  # the queue is empty: nothing to lose, and 3.5 s saved
        orthanc.config["Kheops"].update(Workers=workers, BatchMaxInstances=batch)
        orthanc.start()
        wait_until(lambda: self._queued(orthanc) == 0, timeout=_TIMEOUT)
        baseline = self.kheops.stores()
        seconds, _ = timed_until(
            lambda: orthanc.post("/kheops/send", json={"Resources": studies}).raise_for_status(),
            self.arrived(baseline, len(self.corpus)),
            timeout=_TIMEOUT,
        )
        return seconds

    # --- 5 and 6: live forwarding, and what it costs the ingest --------------------------------

    def live_and_ingest(self) -> None:
        """Round by round: storescu into a plain Orthanc, into one with the plugin forwarding,
        and into one with the plugin while KHEOPS is down (an outage must not slow Orthanc
        either).

        The order turns from one round to the next, so that no contender always follows the
        same one, and each store starts with the disk's pending writes done: what the round
        before left to write falls on no one.
        """
        plain = self._ingest("plain", "Plain Orthanc")
        live = self._ingest("live", "Orthanc + plugin forwarding live")
        down = self._ingest("down", "Orthanc + plugin, KHEOPS down")
        end_to_end = self._run("live", "This plugin, live: storescu -> all in the album")
        lags: list[Lag] = []
        contenders = ("plain", "down", "live")
        for number in range(self.settings.ingest_repeat):
            self.log(f"   round {number + 1} of {self.settings.ingest_repeat}")
            for key in contenders[number % 3 :] + contenders[: number % 3]:
                os.sync()
                if key == "plain":
                    self._plain_once(plain)
                elif key == "down":
                    self._down_once(down)
                else:
                    lag, requests = self._live_once(self.plugin_section(), live, end_to_end)
                    lags.append(lag)
                    if end_to_end.seconds[-1] == end_to_end.time:
                        end_to_end.requests = requests
        self.lag = lags[end_to_end.seconds.index(end_to_end.time)]
        end_to_end.notes.append(
            f"lag store -> album p50 {self.lag.p50:.2f} s, p95 {self.lag.p95:.2f} s"
        )

    def _plain_once(self, run: Run) -> None:
        orthanc = self._orthanc("plain")
        try:
            self._timed_store(orthanc, run)
        finally:
            self.retire(orthanc)

    def _down_once(self, run: Run) -> None:
        self.kheops.set_down(True)
        orthanc = self._orthanc("down", kheops=self.plugin_section())
        try:
            self._timed_store(orthanc, run)
        finally:
            self.retire(orthanc)
            self.kheops.set_down(False)

    def _live_once(
        self, section: Mapping[str, Any], ingest: Run, end_to_end: Run
    ) -> tuple[Lag, str]:
        orthanc = self._orthanc("live", kheops=section)
        try:
            baseline = self.kheops.stores()
            self.kheops.clear_requests()
            meter = self._meter(orthanc)
            meter.start()
            began = time.perf_counter()
            orthanc.storescu(list(self.corpus.paths))
            stored = time.perf_counter() - began
            ingest_cpu = meter.stop()
            wait_until(self.arrived(baseline, len(self.corpus)), timeout=_TIMEOUT, interval=POLL)
            total = time.perf_counter() - began
            end_cpu = meter.stop()
            ingest.add(stored, ingest_cpu)
            end_to_end.add(total, end_cpu)
            # KHEOPS answers before the plugin records the verdict: wait for the last rows.
            wait_until(
                lambda: self._sent(orthanc) >= len(self.corpus),
                timeout=_TIMEOUT,
                message="every instance marked sent in the outbox",
            )
            lag = read_lag(orthanc.workdir / "kheops-state" / "outbox.sqlite3")
            return lag, self._stow_requests()
        finally:
            self.retire(orthanc)

    def linger(self, values: Sequence[int]) -> list[LingerPoint]:
        """Live forwarding under several BatchLingerMilliseconds: lag against ingest cost."""
        points = []
        for linger_ms in values:
            count, size = len(self.corpus), self.corpus.megabytes
            plain = Run("plain", "plain", count, size)
            self._plain_once(plain)
            ingest = Run("live", "live", count, size)
            end_to_end = Run("live", "live", count, size)
            section = self.plugin_section(BatchLingerMilliseconds=linger_ms)
            lag, requests = self._live_once(section, ingest, end_to_end)
            point = LingerPoint(
                linger_ms, ingest.time, plain.time, lag, requests, end_to_end.cpu["orthanc"]
            )
            self.log(
                f"    linger {linger_ms:>4} ms: ingest {point.ingest_seconds:.2f} s"
                f" (plain {point.plain_seconds:.2f} s), lag p50 {lag.p50:.2f} s"
                f" p95 {lag.p95:.2f} s, {requests}"
            )
            points.append(point)
        return points

    # --- 7: memory with a backlog on disk --------------------------------------------------------

    def memory(self, small: Corpus, *, cache_sizes: Sequence[int | None]) -> list[Memory]:
        """Peak RSS while a backlog of small instances piles up with KHEOPS down, against idle.

        Orthanc keeps recently stored files in its storage cache (MaximumStorageCacheSize,
        128 MB by default), plugin or not: with the cache off, what remains is the plugin's.
        """
        return [self._memory(small, cache) for cache in cache_sizes]

    def _memory(self, small: Corpus, cache: int | None) -> Memory:
        extra = {} if cache is None else {"MaximumStorageCacheSize": cache}
        label = "Orthanc's default" if cache is None else f"{cache} MB"
        plain_idle, plain_peak, _ = self._rss_with_backlog(
            "memory-plain", small, kheops=None, extra=extra
        )
        self.kheops.set_down(True)
        try:
            plugin_idle, plugin_peak, orthanc = self._rss_with_backlog(
                "memory-plugin", small, kheops=self.plugin_section(), extra=extra, keep=True
            )
            assert orthanc is not None
            try:
                wait_until(lambda: self._queued(orthanc) >= len(small), timeout=_TIMEOUT)
                queued = self._queued(orthanc)
                plugin_peak = max(plugin_peak, proc_status_bytes(orthanc.pid, "VmHWM"))
                outbox = sum(
                    path.stat().st_size
                    for path in (orthanc.workdir / "kheops-state").glob("outbox.sqlite3*")
                )
            finally:
                self.retire(orthanc)
        finally:
            self.kheops.set_down(False)
        return Memory(
            backlog=len(small),
            storage_cache=label,
            plain_idle=plain_idle,
            plain_peak=plain_peak,
            plugin_idle=plugin_idle,
            plugin_peak=plugin_peak,
            queued=queued,
            outbox_bytes=outbox,
        )

    def _rss_with_backlog(
        self,
        name: str,
        small: Corpus,
        *,
        kheops: Mapping[str, Any] | None,
        extra: Mapping[str, Any],
        keep: bool = False,
    ) -> tuple[int, int, OrthancProcess | None]:
        orthanc = self._orthanc(name, kheops=kheops, extra_config=extra)
        try:
            idle = _settled_rss(orthanc.pid)
            store_in_parallel(orthanc, small.paths, processes=_STORESCU_PROCESSES)
            peak = proc_status_bytes(orthanc.pid, "VmHWM")
        except BaseException:
            self.retire(orthanc)
            raise
        if keep:
            return idle, peak, orthanc
        self.retire(orthanc)
        return idle, peak, None


def _settled_rss(pid: int) -> int:
    """RSS once Orthanc has finished starting (plugin threads up, first reconcile done)."""
    pause = threading.Event()
    samples = []
    for _ in range(5):
        samples.append(proc_status_bytes(pid, "VmRSS"))
        pause.wait(0.2)
    return max(samples)


def store_in_parallel(orthanc: OrthancProcess, paths: Sequence[Path], *, processes: int) -> None:
    """storescu over several associations at once: small instances are latency-bound."""
    slices = [list(paths[i::processes]) for i in range(processes)]
    with ThreadPoolExecutor(max_workers=processes) as pool:
        list(pool.map(orthanc.storescu, [s for s in slices if s]))


def read_lag(outbox: Path) -> Lag:
    """Seconds from queued (the store callback) to sent (KHEOPS's answer), from the outbox."""
    with sqlite3.connect(f"file:{outbox}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT done_at - queued_at FROM instances WHERE state = 'sent'"
        ).fetchall()
    lags = [float(row[0]) for row in rows]
    return Lag(p50=percentile(lags, 0.5), p95=percentile(lags, 0.95), maximum=max(lags))
