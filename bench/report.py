"""The table and the verdict: Markdown, so that a full run can go into the README as printed."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.corpus import Corpus
from bench.scenarios import LingerPoint, Memory, Run, SweepPoint
from bench.sizes import CONTENDERS, FRAMINGS, LABELS, SizeResult

_MB = 1024 * 1024
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Results:
    corpus: Corpus
    small: Corpus | None
    plugin_settings: dict[str, object]
    orthanc_settings: dict[str, object] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    ingest: list[Run] = field(default_factory=list)
    memory: list[Memory] = field(default_factory=list)
    sweep: list[SweepPoint] = field(default_factory=list)
    linger: list[LingerPoint] = field(default_factory=list)
    sizes: list[SizeResult] = field(default_factory=list)
    tls: bool = False  # the sink served HTTPS
    load_at_start: tuple[float, ...] = field(default_factory=os.getloadavg)

    def find(self, key: str, latency: float = 0.0) -> Run | None:
        for run in self.runs + self.ingest:
            if run.key == key and abs(run.latency - latency) < 1e-9:
                return run
        return None


@dataclass(frozen=True)
class Verdict:
    """A target: a ratio that must reach `goal` (or stay within `goal`..`upper`), or a size in
    MB or a delay in seconds that must stay under it."""

    target: str
    measured: float | None
    goal: float
    explanation: str = ""
    unit: str = "x"
    upper: float | None = None

    @property
    def met(self) -> bool | None:
        if self.measured is None:
            return None
        if self.unit != "x":
            return self.measured <= self.goal
        return self.measured >= self.goal and (self.upper is None or self.measured <= self.upper)

    def shown(self, value: float) -> str:
        if self.unit == "x":
            return f"{value:.2f}x"
        return f"{value:.1f} {self.unit}" if self.unit == "s" else f"{value:.0f} {self.unit}"

    def goal_text(self) -> str:
        if self.upper is not None:
            return f"{self.shown(self.goal)} to {self.shown(self.upper)}"
        return ("at least " if self.unit == "x" else "at most ") + self.shown(self.goal)


def machine(load_at_start: tuple[float, ...]) -> str:
    """Cores, memory, CPU model and Orthanc version: what the figures depend on."""
    memory = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    orthanc = _first_line(["/usr/sbin/Orthanc", "--version"])
    plugins = _first_line(
        ["dpkg-query", "-W", "-f=${Package} ${Version}, ", "orthanc-dicomweb", "orthanc-python"]
    ).rstrip(", ")
    start = ", ".join(f"{x:.2f}" for x in load_at_start)
    end = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} cores ({model}), {memory / 2**30:.0f} GiB,"
        f" {platform.system()} {platform.release()}, Python {platform.python_version()},"
        f" {orthanc} ({plugins}); load average (1, 5, 15 min) at start {start}, at the end {end}"
    )


def _first_line(command: list[str]) -> str:
    try:
        output = subprocess.run(
            command, check=False, capture_output=True, text=True, timeout=10
        ).stdout
    except OSError:
        return "unknown version"
    return output.splitlines()[0].strip() if output else "unknown version"


def header(results: Results, *, quick: bool) -> list[str]:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    settings = ", ".join(f"{k}={v}" for k, v in results.plugin_settings.items()) or "defaults"
    lines = [
        f"Benchmark of {now}{' (--quick)' if quick else ''}",
        f"Machine: {machine(results.load_at_start)}",
        f"Corpus: {results.corpus.describe()}",
        f"Plugin settings: {settings}",
        "KHEOPS sink: "
        + (
            "HTTPS on loopback (the tests' certificate; every contender verifies it)"
            if results.tls
            else "HTTP on loopback"
        ),
    ]
    if results.orthanc_settings:
        lines.append(f"Orthanc settings with the plugin: {json.dumps(results.orthanc_settings)}")
    return lines


_NAMES = {"kheops": "server", "orthanc": "Orthanc", "client": "client"}


def _cpu(run: Run) -> str:
    per = run.cpu_per_thousand()
    return " + ".join(f"{_NAMES.get(name, name)} {used:.1f}" for name, used in per.items())


def throughput_table(results: Results) -> list[str]:
    lines = [
        "| Scenario | Latency | Time (s) | Instances/s | MB/s | CPU s per 1000 instances | Notes |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for run in results.runs:
        notes = [run.requests, *run.notes]
        if run.detections:
            notes.append(
                f"first instance stored {min(run.detections):.2f}-{max(run.detections):.2f} s"
                " after KHEOPS came back (the plugin's probe interval, here at most 1 s)"
            )
        if len(run.seconds) > 1:
            notes.append(
                f"best of {len(run.seconds)}: {', '.join(f'{s:.2f}' for s in run.seconds)}"
            )
        lines.append(
            f"| {run.label} | {run.latency * 1000:.0f} ms | {run.time:.2f} | {run.rate:.0f}"
            f" | {run.megabytes / run.time:.0f} | {_cpu(run)} | {'; '.join(filter(None, notes))} |"
        )
    return lines


def ingest_table(results: Results) -> list[str]:
    plain = results.find("ingest_plain")
    if not results.ingest:
        return []
    count = len(results.corpus)
    associations = f"{math.ceil(count / 500)} association(s) of up to 500 instances"
    lines = [
        (
            f"| Ingest by storescu ({associations}) | Fastest round (s) | Instances/s"
            " | vs plain, median of the rounds | Orthanc CPU s per 1000 | Rounds (s) |"
        ),
        "|---|---:|---:|---:|---:|---|",
    ]
    for run in results.ingest:
        ratio = f"{round_ratios(plain.seconds, run.seconds).median:.2f}x" if plain else ""
        per = run.cpu_per_thousand().get("orthanc", 0.0)
        runs = ", ".join(f"{s:.2f}" for s in run.seconds)
        lines.append(
            f"| {run.label} | {run.time:.2f} | {run.rate:.0f} | {ratio} | {per:.1f} | {runs} |"
        )
    return lines


def memory_table(memories: Sequence[Memory]) -> list[str]:
    if not memories:
        return []

    def mb(value: int) -> str:
        return f"{value / _MB:.0f}"

    lines = [
        (
            f"| RSS, backlog of {memories[0].backlog} small instances | Orthanc storage cache"
            " | Idle (MB) | Peak (MB) | Growth (MB) |"
        ),
        "|---|---|---:|---:|---:|",
    ]
    for memory in memories:
        rows = [
            ("Plain Orthanc", memory.plain_idle, memory.plain_peak, memory.plain_growth),
            (
                "Orthanc + plugin, KHEOPS down",
                memory.plugin_idle,
                memory.plugin_peak,
                memory.plugin_growth,
            ),
        ]
        lines += [
            f"| {name} | {memory.storage_cache} | {mb(idle)} | {mb(peak)} | {mb(growth)} |"
            for name, idle, peak, growth in rows
        ]
    last = memories[-1]
    lines += [
        "",
        (
            f"{last.queued} instances queued at the end; the outbox holds them in"
            f" {last.outbox_bytes / _MB:.1f} MB on disk."
        ),
    ]
    return lines


def sweep_table(points: Sequence[SweepPoint]) -> list[str]:
    if not points:
        return []
    batches = sorted({p.batch for p in points})
    lines = []
    for latency in sorted({p.latency for p in points}):
        lines += [
            (
                "Backlog drain, instances/s (Orthanc's peak RSS during the drain),"
                f" KHEOPS latency {latency * 1000:.0f} ms:"
            ),
            "",
            "| Workers \\ batch | " + " | ".join(str(b) for b in batches) + " |",
            "|---:|" + "---:|" * len(batches),
        ]
        for workers in sorted({p.workers for p in points}):
            cells = []
            for batch in batches:
                match = [
                    p
                    for p in points
                    if p.workers == workers and p.batch == batch and p.latency == latency
                ]
                cells.append(
                    f"{match[0].rate:.0f} ({match[0].peak_rss / _MB:.0f} MB)" if match else ""
                )
            lines.append(f"| {workers} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def linger_table(points: Sequence[LingerPoint]) -> list[str]:
    if not points:
        return []
    lines = [
        (
            "| BatchLingerMilliseconds | Ingest (s) | Plain (s) | Ingest vs plain | Lag p50 (s)"
            " | Lag p95 (s) | STOW requests | Orthanc CPU (s) |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        lines.append(
            f"| {p.linger_ms} | {p.ingest_seconds:.2f} | {p.plain_seconds:.2f}"
            f" | {p.plain_seconds / p.ingest_seconds:.2f}x | {p.lag.p50:.2f} | {p.lag.p95:.2f}"
            f" | {p.requests} | {p.orthanc_cpu:.1f} |"
        )
    return lines


def _ratio(a: Run | None, b: Run | None) -> float | None:
    """How many times faster `a` is than `b`."""
    if a is None or b is None:
        return None
    return b.time / a.time


def _cores() -> int:
    return os.cpu_count() or 1


def _cpu_floor(run: Run) -> float:
    """The least wall time the CPU this run used allows, spread perfectly over every core."""
    return sum(run.cpu.values()) / _cores()


def size_tables(sizes: Sequence[SizeResult]) -> list[str]:
    """Per size and contender: time, rate, and the CPU of the sink and of the sender."""
    lines = [
        (
            "| Size | Contender | Time (s), median | Rounds (s) | Instances/s | MB/s"
            " | Sink CPU s per 1000 | Sender CPU s per 1000 | Requests (last round) |"
        ),
        "|---|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for result in sizes:
        corpus = result.corpus
        for key in CONTENDERS:
            rounds = result.rounds[key]
            if not rounds:
                continue
            sender = "client" if key == "bare" else "orthanc"
            lines.append(
                f"| {result.size.label} ({len(corpus)} x {corpus.instance_bytes / 1024:.0f} KiB)"
                f" | {LABELS[key]} | {result.median(key):.2f}"
                f" | {', '.join(f'{r.seconds:.2f}' for r in rounds)}"
                f" | {result.rate(key):.0f} | {corpus.megabytes / result.median(key):.0f}"
                f" | {result.cpu_per_thousand(key, 'kheops'):.2f}"
                f" | {result.cpu_per_thousand(key, sender):.2f} | {_parts(rounds[-1].requests)} |"
            )
    lines += [
        "",
        (
            "| Size | Drain vs DICOMweb client (round range) | Drain vs bare client (round range)"
            " | Sink CPU s per 1000: drain / DICOMweb / bare | Resume delay (s) after outages of (s) |"
        ),
        "|---|---:|---:|---|---|",
    ]
    for result in sizes:
        versus, low, high = result.ratio("drain", "dicomweb")
        bare, bare_low, bare_high = result.ratio("drain", "bare")
        sink = " / ".join(f"{result.cpu_per_thousand(k, 'kheops'):.2f}" for k in CONTENDERS)
        resumes = ", ".join(f"{r.delay:.2f} ({r.outage:.1f})" for r in result.resumes)
        lines.append(
            f"| {result.size.label} | {versus:.2f}x ({low:.2f}-{high:.2f})"
            f" | {bare:.2f}x ({bare_low:.2f}-{bare_high:.2f}) | {sink} | {resumes} |"
        )
    return lines


def _parts(parts: Sequence[int]) -> str:
    if not parts:
        return "none"
    if len(set(parts)) == 1:
        return f"{len(parts)} of {parts[0]}"
    return f"{len(parts)} of {min(parts)}-{max(parts)}"


def size_verdicts(sizes: Sequence[SizeResult]) -> list[Verdict]:
    found = []
    for result in sizes:
        versus, low, high = result.ratio("drain", "dicomweb")
        cpu = {k: result.cpu_per_thousand(k, "kheops") for k in CONTENDERS}
        # What /proc can tell apart, per 1000 instances: below it, two figures are equal.
        tick = 1000 / _CLOCK_TICKS / len(result.corpus)
        orthanc = result.cpu_per_thousand("drain", "orthanc")
        dicomweb = result.cpu_per_thousand("dicomweb", "orthanc")
        # The least wall time the drain's CPU (Orthanc's and the sink's) allows on every core.
        floor = (orthanc + cpu["drain"]) * len(result.corpus) / 1000 / _cores()
        ceiling = f"; at most {result.median('dicomweb') / floor:.2f}x" if floor else ""
        found.append(
            Verdict(
                f"{result.size.label}: drain vs Orthanc's DICOMweb STOW client",
                versus,
                1.2,
                f"median of {len(result.rounds['drain'])} rounds; per round {low:.2f}-{high:.2f}x;"
                f" Orthanc CPU s per 1000 instances: drain {orthanc:.2f}, DICOMweb {dicomweb:.2f};"
                f" the drain's CPU and the sink's need {floor:.2f} s on {_cores()} cores{ceiling}",
            )
        )
        framing = {k: statistics.median(v) for k, v in result.framing.items() if v}
        if len(framing) == len(FRAMINGS):
            found.append(
                Verdict(
                    f"{result.size.label}: sink CPU per instance, one chunked request vs"
                    " requests of 100 (neutral)",
                    max(framing["chunked"], tick) / max(framing["length"], tick),
                    0.8,
                    "the same files from this process over one connection (chunks of"
                    f" {result.chunk_bytes() / 1024:.0f} KiB), sink CPU s per 1000 instances: "
                    + ", ".join(f"{FRAMINGS[k]} {v:.2f}" for k, v in framing.items())
                    + "; in the contenders' rounds: "
                    + ", ".join(f"{LABELS[k]} {v:.2f}" for k, v in cpu.items()),
                    upper=1.25,
                )
            )
    resumes = [r for result in sizes for r in result.resumes]
    if resumes:
        worst = max(resumes, key=lambda r: r.delay)
        found.append(
            Verdict(
                "Resume: KHEOPS answers again -> first instance stored, plugin defaults",
                worst.delay,
                10.0,
                f"worst of {len(resumes)} outages, after {worst.outage:.1f} s down; all:"
                f" {min(r.delay for r in resumes):.2f}-{worst.delay:.2f} s",
                unit="s",
            )
        )
    return found


def verdicts(results: Results, latency: float) -> list[Verdict]:
    drain = results.find("drain")
    dicomweb = results.find("dicomweb")
    sink = results.find("sink")
    drain_remote = results.find("drain", latency)
    dicomweb_remote = results.find("dicomweb", latency)
    per_instance_remote = results.find("per_instance", latency)
    plain = results.find("ingest_plain")
    live = results.find("ingest_live")
    down = results.find("ingest_down")
    found = [
        Verdict(
            "Backlog drain vs DICOMweb STOW client",
            _ratio(drain, dicomweb),
            1.2,
            _explain_against(drain, dicomweb, "the DICOMweb client"),
        ),
        Verdict(
            "Backlog drain vs sink limit",
            _ratio(drain, sink),
            0.8,
            _explain_against(drain, sink, "the bare client"),
        ),
        Verdict(
            f"Backlog drain vs per-instance STOW, {latency * 1000:.0f} ms latency",
            _ratio(drain_remote, per_instance_remote),
            5.0,
        ),
        Verdict(
            f"Backlog drain vs DICOMweb STOW client, {latency * 1000:.0f} ms latency",
            _ratio(drain_remote, dicomweb_remote),
            1.5,
            _explain_latency(drain_remote, dicomweb_remote, dicomweb),
        ),
        _ingest_verdict("Ingest with the plugin forwarding vs plain Orthanc", live, plain),
        _ingest_verdict("Ingest with the plugin, KHEOPS down, vs plain Orthanc", down, plain),
    ]
    if results.memory:
        memory = results.memory[0]  # storage cache off: what the backlog itself costs
        context = "; ".join(
            f"with the storage cache at {m.storage_cache}, plain Orthanc grew"
            f" {m.plain_growth / _MB:.0f} MB and Orthanc + plugin {m.plugin_growth / _MB:.0f} MB"
            for m in results.memory
        )
        found.append(
            Verdict(
                f"RSS growth with a {memory.backlog}-instance backlog (KHEOPS down)",
                memory.plugin_growth / _MB,
                50,
                context,
                unit="MB",
            )
        )
    return found


def _explain_against(run: Run | None, other: Run | None, who: str) -> str:
    if run is None or other is None or not run.cpu or not other.cpu:
        return ""
    floor = _cpu_floor(run)
    ceiling = f": at most {other.time / floor:.2f}x with every core busy" if floor > 0 else ""
    return (
        f"CPU s per 1000 instances: drain {_cpu(run)}, {who} {_cpu(other)}; the drain's CPU"
        f" alone needs {floor:.2f} s of wall time on {_cores()} cores, {who}"
        f" took {other.time:.2f} s{ceiling}"
    )


def _explain_latency(remote: Run | None, dicomweb_remote: Run | None, dicomweb: Run | None) -> str:
    if remote is None or dicomweb_remote is None or dicomweb is None:
        return ""
    return (
        f"the DICOMweb client sends everything in {dicomweb_remote.requests or 'one request'},"
        f" so the added latency costs it {dicomweb_remote.time - dicomweb.time:+.2f} s in all"
    )


@dataclass(frozen=True)
class RoundRatios:
    """How much slower a contender is than plain Orthanc, round by round."""

    median: float
    quartiles: tuple[float, float]  # the middle half of the rounds
    extremes: tuple[float, float]
    rounds: int


def round_ratios(plain: Sequence[float], other: Sequence[float]) -> RoundRatios:
    """Plain Orthanc's time over the other's, taken within each round.

    Both ran in the same round, one after the other, so a slow spell of the machine falls on
    both: their ratio varies much less than either time does from round to round.
    """
    paired = sorted(p / o for p, o in zip(plain, other, strict=True))
    low, _, high = (
        statistics.quantiles(paired, n=4, method="inclusive") if len(paired) > 1 else paired * 3
    )
    return RoundRatios(statistics.median(paired), (low, high), (paired[0], paired[-1]), len(paired))


def _ingest_verdict(target: str, run: Run | None, plain: Run | None) -> Verdict:
    if run is None or plain is None or not run.seconds or not plain.seconds:
        return Verdict(target, None, 0.95)
    ratios = round_ratios(plain.seconds, run.seconds)
    return Verdict(
        target,
        ratios.median,
        0.95,
        f"median of {ratios.rounds} rounds' ratios; middle half"
        f" {ratios.quartiles[0]:.2f}-{ratios.quartiles[1]:.2f}x, all rounds"
        f" {ratios.extremes[0]:.2f}-{ratios.extremes[1]:.2f}x; {_explain_ingest(run, plain)}",
    )


def _explain_ingest(live: Run | None, plain: Run | None) -> str:
    if live is None or plain is None:
        return ""
    live_cpu = live.cpu.get("orthanc", 0.0)
    plain_cpu = plain.cpu.get("orthanc", 0.0)
    server = live.cpu.get("kheops", 0.0)
    return (
        f"in the fastest round, Orthanc used {live_cpu:.1f} CPU s with the plugin against"
        f" {plain_cpu:.1f} s plain, and the sink {server:.1f} s, on the same {_cores()} cores"
    )


def verdict_table(items: Sequence[Verdict]) -> list[str]:
    lines = ["| Target | Measured | Goal | Verdict | Why |", "|---|---:|---:|---|---|"]
    for item in items:
        measured = "not run" if item.measured is None else item.shown(item.measured)
        goal = item.goal_text()
        verdict = {None: "not run", True: "met", False: "MISSED"}[item.met]
        lines.append(f"| {item.target} | {measured} | {goal} | {verdict} | {item.explanation} |")
    return lines


def render(results: Results, *, quick: bool, latency: float) -> str:
    sections: list[list[str]] = [header(results, quick=quick)]
    if results.sizes:
        sections.append(["### Drain by instance size", "", *size_tables(results.sizes)])
    if results.runs:
        sections.append(["### Throughput", "", *throughput_table(results)])
    if results.ingest:
        sections.append(["### Ingest cost", "", *ingest_table(results)])
    if results.memory:
        sections.append(["### Memory", "", *memory_table(results.memory)])
    if results.sweep:
        sections.append(["### Workers x batch size", "", *sweep_table(results.sweep)])
    if results.linger:
        sections.append(["### Live forwarding: linger", "", *linger_table(results.linger)])
    found = size_verdicts(results.sizes) + verdicts(results, latency)
    sections.append(
        ["### Verdict", "", *verdict_table([v for v in found if v.measured is not None])]
    )
    return "\n\n".join("\n".join(section) for section in sections) + "\n"
