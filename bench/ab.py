"""`python -m bench.ab`: the backlog drain of plugin variants, side by side in one run.

A change worth a few per cent is lost in the noise between two runs of `make bench`: the
machine's speed moves the 64 KiB drain by 10 % from one run to the next. Here every variant
gets its own Orthanc holding the same backlog, and their drains take turns round by round (the
order turning), so that a burst of other work falls on all of them alike. The figure is the
median of the ratios taken within each round, against the first variant.

A variant is a name and any of: "plugin" (settings of the "Kheops" section), "orthanc" (of
Orthanc's configuration, such as another "PythonScript": a checkout of the plugin before a
change) and "env" (Orthanc's environment). Two identical variants show how far apart the
noise alone puts them.

With `--ingest`, what is compared is the ingest instead: each round, every variant gets a fresh
Orthanc with the plugin forwarding live, storescu stores the corpus into it (timed), and the
next one starts once the sink has every instance, so that no variant's sends fall on another's
store. A variant whose "plugin" is null is a plain Orthanc, without the plugin.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import corpus as corpora
from bench.kheops import KheopsProcess
from bench.scenarios import Bench, Settings
from bench.sizes import Round, Size, SizeResult, drain_backlog
from tests.waiting import wait_until

WORKDIR = Path(__file__).resolve().parent.parent / "build" / "bench-ab"
_TIMEOUT = 900.0


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--columns", type=int, default=256)
    parser.add_argument("--count", type=int, default=2000, help="instances in the backlog")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tls", action="store_true", help="the sink serves HTTPS")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=WORKDIR,
        help="where the Orthancs and the sink keep their files (a tmpfs takes the disk's"
        " latency out of an ingest)",
    )
    parser.add_argument(
        "--ingest", action="store_true", help="time storescu into each variant, forwarding live"
    )
    parser.add_argument(
        "variants",
        type=json.loads,
        help='a JSON object, e.g. \'{"defaults": {}, "six": {"plugin": {"Workers": 6}}}\'',
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    variants: Mapping[str, Mapping[str, Any]] = args.variants
    if len(variants) < 2:
        print("give at least two variants", file=sys.stderr)
        return 2
    corpus = corpora.ensure(args.count, size=args.rows, columns=args.columns)
    size = Size(f"{args.rows}x{args.columns}", args.rows, args.columns, args.count)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    shutil.rmtree(args.workdir / "kheops", ignore_errors=True)  # the Orthancs' go with them
    with KheopsProcess(args.workdir / "kheops", tls=args.tls) as kheops:
        bench = Bench(
            settings=Settings(repeat=1, ingest_repeat=1, latency=0.0, plugin={}),
            kheops=kheops,
            corpus=corpus,
            workdir=args.workdir,
            log=log,
        )
        try:
            trial = Trial(bench, variants, corpus, size, args.rounds)
            results = ingest(trial) if args.ingest else drain(trial)
        finally:
            bench.close()
    print(report(results, "ingest" if args.ingest else "drain"))
    return 0


@dataclass(frozen=True)
class Trial:
    """What the variants are run on, and how many rounds."""

    bench: Bench
    variants: Mapping[str, Mapping[str, Any]]
    corpus: corpora.Corpus
    size: Size
    rounds: int


def drain(trial: Trial) -> dict[str, SizeResult]:
    """The same backlog in one Orthanc per variant, drained round by round."""
    bench, variants, corpus, size = trial.bench, trial.variants, trial.corpus, trial.size
    bench.kheops.set_down(True)
    results = {}
    orthancs = {}
    for name, variant in variants.items():
        orthancs[name] = bench.orthanc(f"variant-{name}", **_arguments(bench, variant))
        orthancs[name].storescu(list(corpus.paths))
        results[name] = SizeResult(size=size, corpus=corpus, rounds={"drain": []})
    for number, order in _rounds(list(variants), trial.rounds):
        for name in order:
            drain_backlog(bench, orthancs[name], corpus, results[name], None)
        _log_round(bench, number, results, "drain")
    return results


def ingest(trial: Trial) -> dict[str, SizeResult]:
    """storescu into a fresh Orthanc per variant and round, forwarding live."""
    bench, variants, corpus, size = trial.bench, trial.variants, trial.corpus, trial.size
    results = {
        name: SizeResult(size=size, corpus=corpus, rounds={"ingest": []}) for name in variants
    }
    for number, order in _rounds(list(variants), trial.rounds):
        for name in order:
            results[name].rounds["ingest"].append(_ingest_once(bench, name, variants[name], corpus))
        _log_round(bench, number, results, "ingest")
    return results


def _ingest_once(
    bench: Bench, name: str, variant: Mapping[str, Any], corpus: corpora.Corpus
) -> Round:
    """The store's time and CPU; returns once the sink has every instance it forwards."""
    os.sync()  # what the store before left to write falls on no one
    orthanc = bench.orthanc(f"variant-{name}", **_arguments(bench, variant))
    try:
        baseline = bench.kheops.stores()
        stored, cpu = bench.timed_store(orthanc)
        if variant.get("plugin", {}) is not None:
            wait_until(
                bench.arrived(baseline, len(corpus)),
                timeout=_TIMEOUT,
                message="every instance in the sink",
            )
        return Round(stored, cpu, requests=())
    finally:
        bench.retire(orthanc)


def _arguments(bench: Bench, variant: Mapping[str, Any]) -> dict[str, Any]:
    """An Orthanc's arguments for a variant; its plugin section null: no plugin at all."""
    plugin = variant.get("plugin", {})
    return {
        "kheops": None if plugin is None else {**bench.defaults_section(), **plugin},
        "extra_config": variant.get("orthanc"),
        "env": variant.get("env"),
    }


def _rounds(names: list[str], rounds: int) -> Iterator[tuple[int, list[str]]]:
    """Each round's order, turning, so that no variant always follows the same one."""
    for number in range(rounds):
        yield number, names[number % len(names) :] + names[: number % len(names)]


def _log_round(bench: Bench, number: int, results: Mapping[str, SizeResult], key: str) -> None:
    bench.log(
        f"round {number + 1}: "
        + ", ".join(f"{n} {r.rounds[key][-1].seconds:.3f} s" for n, r in results.items())
    )


def report(results: Mapping[str, SizeResult], key: str) -> str:
    """Each variant against the first: the median of the per-round ratios, their range, the
    medians of the times and of Orthanc's CPU."""
    names = list(results)
    base = results[names[0]].rounds[key]
    lines = [f"against {names[0]}: median {key} {statistics.median(r.seconds for r in base):.3f} s"]
    for name in names[1:]:
        rounds = results[name].rounds[key]
        ratios = [b.seconds / r.seconds for b, r in zip(base, rounds, strict=True)]
        cpu = statistics.median(r.cpu.get("orthanc", 0.0) for r in rounds)
        lines.append(
            f"{name}: {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}),"
            f" median {key} {statistics.median(r.seconds for r in rounds):.3f} s,"
            f" Orthanc CPU {cpu:.2f} s"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
