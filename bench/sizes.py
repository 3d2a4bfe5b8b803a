"""The drain at several instance sizes, against Orthanc's DICOMweb client and the bare client.

For each size, one Orthanc with the plugin holds the corpus as a backlog stored while KHEOPS
was down, one plain Orthanc with the DICOMweb plugin holds the same corpus, and each round runs
the three contenders one after the other (in an order that turns from round to round), so
that a burst of other work on the machine falls on all of them alike.

Every run ends when the sink stored its last instance (the sink's clock, which is the bench's
monotonic clock: polling does not blur it). A client's run starts when it is asked to send;
the drain's starts with its first accepted STOW-RS request, as its wait for the end of the
outage is reported on its own, as the resume delay: from KHEOPS answering again to the first
instance stored, with the plugin's default settings.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bench import clients
from bench import corpus as corpora
from bench.corpus import Corpus
from bench.kheops import TOKEN, Window
from bench.scenarios import Bench
from tests.orthanc_process import OrthancProcess
from tests.waiting import wait_until

CONTENDERS = ("drain", "dicomweb", "bare")
LABELS = {
    "drain": "this plugin, backlog drain",
    "dicomweb": "Orthanc's DICOMweb STOW client",
    "bare": "bare client (50 per request, 2 connections)",
}
_TIMEOUT = 900.0
# The sink's neutrality, checked with one sender and one connection for both framings: its CPU
# per instance also rises with how busy the other core is (1.44x on the same requests with a
# busy loop beside it), so the contenders, which load the machine differently, cannot show it.
FRAMINGS = {
    "chunked": "one chunked request of every instance, in the DICOMweb client's chunk size",
    "length": "requests of 100 with a Content-Length",
}
_CHUNK = 65536  # what the DICOMweb client sent on every stack, until its own is seen


@dataclass(frozen=True)
class Size:
    label: str
    rows: int
    columns: int
    count: int


@dataclass
class Round:
    seconds: float
    cpu: dict[str, float]  # CPU seconds of the sink ("kheops") and of the sender
    requests: tuple[int, ...]  # parts per accepted request
    chunk_bytes: int = 0  # the mean chunk of a chunked request (the DICOMweb client's)


@dataclass
class Resume:
    outage: float  # seconds KHEOPS was down, from the first refused request
    delay: float  # KHEOPS back -> first instance stored


@dataclass
class SizeResult:
    size: Size
    corpus: Corpus
    rounds: dict[str, list[Round]] = field(default_factory=dict)
    resumes: list[Resume] = field(default_factory=list)
    # The sink's CPU seconds per 1000 instances for each framing (FRAMINGS), round by round.
    framing: dict[str, list[float]] = field(default_factory=dict)

    def chunk_bytes(self) -> int:
        """The chunk size of the framing check: the DICOMweb client's in its latest round."""
        seen = [r.chunk_bytes for r in self.rounds.get("dicomweb", []) if r.chunk_bytes]
        return seen[-1] if seen else _CHUNK

    def median(self, key: str) -> float:
        return statistics.median(r.seconds for r in self.rounds[key])

    def rate(self, key: str) -> float:
        return len(self.corpus) / self.median(key)

    def cpu_per_thousand(self, key: str, process: str) -> float:
        """Median over the rounds of one process's CPU seconds per 1000 instances."""
        return statistics.median(
            1000 * r.cpu.get(process, 0.0) / len(self.corpus) for r in self.rounds[key]
        )

    def ratio(self, faster: str, slower: str) -> tuple[float, float, float]:
        """(ratio of the medians, lowest and highest ratio within one round) of slower/faster."""
        paired = [
            s.seconds / f.seconds
            for f, s in zip(self.rounds[faster], self.rounds[slower], strict=True)
        ]
        return self.median(slower) / self.median(faster), min(paired), max(paired)


def run_sizes(bench: Bench, sizes: Sequence[Size], *, repeat: int) -> list[SizeResult]:
    results = []
    for size in sizes:
        corpus = corpora.ensure(size.count, size=size.rows, columns=size.columns)
        bench.log(f"   {size.label}: {corpus.describe()}")
        results.append(_one_size(bench, size, corpus, repeat))
    return results


def _one_size(bench: Bench, size: Size, corpus: Corpus, repeat: int) -> SizeResult:
    result = SizeResult(
        size=size,
        corpus=corpus,
        rounds={key: [] for key in CONTENDERS},
        framing={key: [] for key in FRAMINGS},
    )
    bench.kheops.set_down(True)
    plugin = bench.orthanc(f"plugin-{size.rows}x{size.columns}", kheops=bench.defaults_section())
    dicomweb: OrthancProcess | None = None
    try:
        down_since = time.monotonic()
        plugin.storescu(list(corpus.paths))
        dicomweb = bench.dicomweb_orthanc(f"dicomweb-{size.rows}x{size.columns}")
        dicomweb.storescu(list(corpus.paths))
        files = [path.read_bytes() for path in corpus.paths]
        for number in range(repeat):
            order = CONTENDERS[number % 3 :] + CONTENDERS[: number % 3]
            for key in order:
                if key == "drain":
                    drain_backlog(
                        bench, plugin, corpus, result, down_since if number == 0 else None
                    )
                elif key == "dicomweb":
                    result.rounds[key].append(_dicomweb(bench, dicomweb, corpus))
                else:
                    result.rounds[key].append(_bare(bench, files))
            _framings(bench, files, result, first=("chunked", "length")[number % 2])
            bench.log(
                f"    round {number + 1}: "
                + ", ".join(f"{k} {result.rounds[k][-1].seconds:.2f} s" for k in CONTENDERS)
                + f"; resume {result.resumes[-1].delay:.2f} s"
            )
    finally:
        bench.kheops.set_down(False)
        bench.retire(plugin)
        if dicomweb is not None:
            bench.retire(dicomweb)
    return result


def _timed(
    bench: Bench, sender: int | None, count: int, start: Callable[[], object], *, window: bool
) -> tuple[Round, float, Window]:
    """Run `start`, wait for `count` more instances in the album: the round, when it began
    and the sink's window of accepted requests.

    The round lasts until the last instance is stored, from the start of the first accepted
    request (`window`: the drain, whose wait for the end of the outage is the resume delay)
    or from `start` (a client's own preparation is part of its work).
    """
    meter = bench.meter(sender)
    bench.kheops.clear_requests()
    baseline = bench.kheops.stores()
    meter.start()
    began = time.monotonic()
    start()
    bench.kheops.await_stores(baseline + count, timeout=_TIMEOUT)
    cpu = meter.stop()
    accepted = bench.kheops.stow_window()
    seconds = accepted.seconds if window else accepted.last_ended - began
    return Round(seconds, cpu, accepted.parts, accepted.chunk_bytes), began, accepted


def drain_backlog(
    bench: Bench, orthanc: OrthancProcess, corpus: Corpus, result: SizeResult, since: float | None
) -> None:
    """KHEOPS comes back after an outage; the backlog is the corpus.

    The first round drains what was stored while KHEOPS was down; later rounds queue the
    corpus again (POST /kheops/send) while KHEOPS is down, and wait until the plugin has
    found KHEOPS unreachable before it comes back.
    """
    if since is None:
        bench.kheops.set_down(True)
        since = time.monotonic()
        studies = orthanc.get("/studies").json()
        orthanc.post("/kheops/send", json={"Resources": studies}).raise_for_status()
    wait_until(
        lambda: _status(orthanc)["State"] == "unreachable" and _queued(orthanc) >= len(corpus),
        timeout=_TIMEOUT,
        message="the corpus queued and KHEOPS found unreachable",
    )
    run, began, window = _timed(
        bench, orthanc.pid, len(corpus), lambda: bench.kheops.set_down(False), window=True
    )
    result.rounds["drain"].append(run)
    result.resumes.append(Resume(outage=began - since, delay=window.first_ended - began))


def _dicomweb(bench: Bench, orthanc: OrthancProcess | None, corpus: Corpus) -> Round:
    assert orthanc is not None
    studies = orthanc.get("/studies").json()

    def post() -> None:
        orthanc.post(
            "/dicom-web/servers/kheops/stow",
            json={"Resources": studies, "Synchronous": True},
            timeout=_TIMEOUT,
        ).raise_for_status()

    return _timed(bench, orthanc.pid, len(corpus), post, window=False)[0]


def _bare(bench: Bench, files: list[bytes]) -> Round:
    def post() -> None:
        clients.post_batches(
            bench.kheops.api, TOKEN, files, batch=50, connections=2, verify=bench.kheops.verify
        )

    return _timed(bench, None, len(files), post, window=False)[0]


def _framings(bench: Bench, files: list[bytes], result: SizeResult, *, first: str) -> None:
    """The sink's CPU per 1000 instances for the same files in each framing, `first` first."""
    chunk = result.chunk_bytes()
    api, verify = bench.kheops.api, bench.kheops.verify
    posts: dict[str, Callable[[], None]] = {
        "chunked": lambda: clients.post_chunked(api, TOKEN, files, chunk=chunk, verify=verify),
        "length": lambda: clients.post_batches(
            api, TOKEN, files, batch=100, connections=1, verify=verify
        ),
    }
    for key in sorted(posts, key=lambda k: k != first):
        cpu = _timed(bench, None, len(files), posts[key], window=False)[0].cpu["kheops"]
        result.framing[key].append(1000 * cpu / len(files))


def _status(orthanc: OrthancProcess) -> dict[str, object]:
    document = orthanc.get("/kheops/status").json()
    assert isinstance(document, dict)
    return document


def _queued(orthanc: OrthancProcess) -> int:
    counts = orthanc.get("/kheops/status").json()["Counts"]
    return int(counts["Queued"]) + int(counts["InFlight"])
