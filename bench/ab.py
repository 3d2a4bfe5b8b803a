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
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench import corpus as corpora
from bench.kheops import KheopsProcess
from bench.scenarios import Bench, Settings
from bench.sizes import Size, SizeResult, drain_backlog

WORKDIR = Path(__file__).resolve().parent.parent / "build" / "bench-ab"


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--columns", type=int, default=256)
    parser.add_argument("--count", type=int, default=2000, help="instances in the backlog")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tls", action="store_true", help="the sink serves HTTPS")
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

    shutil.rmtree(WORKDIR, ignore_errors=True)
    with KheopsProcess(WORKDIR / "kheops", tls=args.tls) as kheops:
        bench = Bench(
            settings=Settings(repeat=1, ingest_repeat=1, latency=0.0, plugin={}),
            kheops=kheops,
            corpus=corpus,
            workdir=WORKDIR,
            log=log,
        )
        try:
            kheops.set_down(True)
            results = {}
            orthancs = {}
            for name, variant in variants.items():
                orthancs[name] = bench.orthanc(
                    f"variant-{name}",
                    kheops={**bench.defaults_section(), **variant.get("plugin", {})},
                    extra_config=variant.get("orthanc"),
                    env=variant.get("env"),
                )
                orthancs[name].storescu(list(corpus.paths))
                results[name] = SizeResult(size=size, corpus=corpus, rounds={"drain": []})
            names = list(variants)
            for number in range(args.rounds):
                for name in names[number % len(names) :] + names[: number % len(names)]:
                    drain_backlog(bench, orthancs[name], corpus, results[name], None)
                log(
                    f"round {number + 1}: "
                    + ", ".join(
                        f"{n} {results[n].rounds['drain'][-1].seconds:.3f} s" for n in names
                    )
                )
        finally:
            bench.close()
    print(report(results))
    return 0


def report(results: Mapping[str, SizeResult]) -> str:
    """Each variant against the first: the median of the per-round ratios, their range, the
    medians of the drains and of Orthanc's CPU."""
    names = list(results)
    base = results[names[0]].rounds["drain"]
    lines = [f"against {names[0]}: median drain {statistics.median(r.seconds for r in base):.3f} s"]
    for name in names[1:]:
        rounds = results[name].rounds["drain"]
        ratios = [b.seconds / r.seconds for b, r in zip(base, rounds, strict=True)]
        cpu = statistics.median(r.cpu.get("orthanc", 0.0) for r in rounds)
        lines.append(
            f"{name}: {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}),"
            f" median drain {statistics.median(r.seconds for r in rounds):.3f} s,"
            f" Orthanc CPU {cpu:.2f} s"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
