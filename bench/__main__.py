"""`python -m bench [--quick]`: run every scenario, then print the table and the verdict.

Progress goes to stderr, the report (Markdown) to stdout and, with --output, to a file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import corpus as corpora
from bench.kheops import KheopsProcess
from bench.report import Results, render
from bench.scenarios import Bench, Settings
from bench.sizes import Size, run_sizes

ROOT = Path(__file__).resolve().parent.parent
WORKDIR = ROOT / "build" / "bench-work"
LATENCY = 0.05
SCENARIOS = (
    "sizes",
    "live",
    "sink",
    "per-instance",
    "dicomweb",
    "drain",
    "sweep",
    "memory",
    "linger",
)
# What `make bench` runs: the drain at every size, resume delays, and the ingest cost. The
# others (512x512 only, 50 ms latency, the sweep, memory, linger) run when named.
DEFAULT_SCENARIOS = ("sizes", "live")
SIZES = (
    Size("64 KiB", 128, 256, 6000),
    Size("128 KiB", 256, 256, 6000),
    Size("512 KiB", 512, 512, 1000),
    Size("27 MB", 3328, 4096, 40),  # a mammogram
)


@dataclass(frozen=True)
class Mode:
    """How big each scenario is: full (the README's figures), quick, or a tiny smoke run."""

    backlog: int
    repeat: int
    sweep_workers: tuple[int, ...]
    sweep_batches: tuple[int, ...]
    sweep_latencies: tuple[float, ...]
    sweep_repeat: int
    linger: tuple[int, ...]
    # Orthanc's MaximumStorageCacheSize for the memory runs; None: Orthanc's default (128 MB)
    memory_caches: tuple[int | None, ...] = (0,)
    sizes: tuple[Size, ...] = SIZES
    size_repeat: int = 5
    ingest_repeat: int = 9


FULL = Mode(
    backlog=20000,
    repeat=3,
    sweep_workers=(1, 2, 4, 8),
    sweep_batches=(50, 100, 500),
    sweep_latencies=(0.0, LATENCY),
    sweep_repeat=2,
    linger=(50, 200, 500, 1000),
    memory_caches=(0, None),
)
QUICK = Mode(
    backlog=3000,
    repeat=1,
    sweep_workers=(1, 4),
    sweep_batches=(10, 50),
    sweep_latencies=(LATENCY,),
    sweep_repeat=1,
    linger=(),
    sizes=tuple(Size(s.label, s.rows, s.columns, max(4, s.count // 10)) for s in SIZES),
    size_repeat=1,
    ingest_repeat=1,
)


def tiny(instances: int) -> Mode:
    """For the smoke test: the default scenarios, a few dozen instances a size (two at 27 MB)."""
    return Mode(
        backlog=10 * instances,
        repeat=1,
        sweep_workers=(2,),
        sweep_batches=(10,),
        sweep_latencies=(LATENCY,),
        sweep_repeat=1,
        linger=(),
        sizes=tuple(
            Size(s.label, s.rows, s.columns, instances if s.count > 100 else 2) for s in SIZES
        ),
        size_repeat=1,
        ingest_repeat=1,
    )


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smaller run, under 2 minutes")
    parser.add_argument(
        "--instances", type=int, help="corpus size (small values are for the smoke test)"
    )
    parser.add_argument(
        "--scenarios",
        help=f"comma-separated subset of {', '.join(SCENARIOS)}"
        f" (default: {', '.join(DEFAULT_SCENARIOS)})",
    )
    parser.add_argument(
        "--plugin",
        type=json.loads,
        default={},
        help='JSON "Kheops" settings to test instead of the defaults, e.g. \'{"Workers": 2}\'',
    )
    parser.add_argument(
        "--orthanc",
        type=json.loads,
        default={},
        help="JSON Orthanc settings for every Orthanc that runs the plugin,"
        ' e.g. \'{"Python": {"AllowThreads": true}}\'',
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="the sink serves HTTPS, as a real KHEOPS: every contender encrypts",
    )
    parser.add_argument("--repeat", type=int, help="repetitions of the timed runs")
    parser.add_argument(
        "--ingest-rounds", type=int, help="rounds of the ingest runs (default: --repeat, or 9)"
    )
    parser.add_argument("--output", type=Path, help="also write the report to this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    mode = tiny(args.instances) if args.instances else QUICK if args.quick else FULL
    if args.scenarios is None:
        chosen = set(DEFAULT_SCENARIOS)
    else:
        chosen = {s.strip() for s in args.scenarios.split(",") if s.strip()}
    unknown = chosen - set(SCENARIOS)
    if unknown:
        print(f"unknown scenarios: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    began = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - began:6.1f} s] {message}", file=sys.stderr, flush=True)

    log("preparing the corpora")
    # Ingest and the 512x512 scenarios store the 128 KiB corpus of the size runs.
    main_size = mode.sizes[1]
    corpus = corpora.ensure(main_size.count, size=main_size.rows, columns=main_size.columns)
    small = corpora.ensure(mode.backlog, size=64) if "memory" in chosen else None
    settings = Settings(
        repeat=args.repeat or mode.repeat,
        ingest_repeat=args.ingest_rounds or args.repeat or mode.ingest_repeat,
        latency=LATENCY,
        plugin=dict(args.plugin),
        orthanc=dict(args.orthanc),
        sweep_workers=mode.sweep_workers,
        sweep_batches=mode.sweep_batches,
        sweep_latencies=mode.sweep_latencies,
        sweep_repeat=mode.sweep_repeat,
        linger_values=mode.linger,
        memory_caches=mode.memory_caches,
    )
    results = Results(
        corpus=corpus,
        small=small,
        plugin_settings=dict(args.plugin),
        orthanc_settings=dict(args.orthanc),
    )
    shutil.rmtree(WORKDIR, ignore_errors=True)
    with KheopsProcess(WORKDIR / "kheops", tls=args.tls) as kheops:
        results.tls = kheops.url.startswith("https://")  # what the sink announced
        bench = Bench(settings=settings, kheops=kheops, corpus=corpus, workdir=WORKDIR, log=log)
        try:
            if "sizes" in chosen:
                log(
                    "drain by instance size: plugin, DICOMweb client and bare client, round by round"
                )
                results.sizes = run_sizes(bench, mode.sizes, repeat=args.repeat or mode.size_repeat)
            run_scenarios(bench, results, chosen, log)
        finally:
            bench.close()
    report = render(results, quick=args.quick, latency=LATENCY)
    print(report, end="")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)
    log("done")
    return 0


def run_scenarios(
    bench: Bench, results: Results, chosen: set[str], log: Callable[[str], None]
) -> None:
    contenders = chosen & {"sink", "dicomweb", "per-instance", "drain", "sweep"}
    if contenders:
        log(
            "1-4 and 8. sink, DICOMweb STOW client, per-instance STOW and the plugin's backlog"
            f" drain, at 0 and {LATENCY * 1000:.0f} ms, round by round"
        )
        plugin = bench.throughput(contenders)
        if plugin is not None:
            try:
                if "sweep" in chosen:
                    log("9. workers x batch size")
                    results.sweep = bench.sweep(plugin)
            finally:
                bench.retire(plugin)
    if "live" in chosen:
        log("5 and 6. live forwarding and ingest cost")
        bench.live_and_ingest()
    if "memory" in chosen and results.small is not None:
        log(f"7. memory with a backlog of {len(results.small)} small instances")
        results.memory = bench.memory(results.small, cache_sizes=bench.settings.memory_caches)
    if "linger" in chosen:
        log("live forwarding: linger")
        results.linger = bench.linger(bench.settings.linger_values)
    order = ("plain", "live", "down", "dicomweb")
    results.ingest = [bench.ingest[key] for key in order if key in bench.ingest]
    kinds = ("sink", "dicomweb", "per_instance", "drain", "live")
    results.runs = sorted(bench.runs(), key=lambda run: (run.latency, kinds.index(run.key)))


if __name__ == "__main__":
    sys.exit(main())
