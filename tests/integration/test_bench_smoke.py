"""`make bench` on a tiny corpus: it completes and prints its table and verdict.

Benchmarks are not tests: nothing here looks at a duration or a ratio's value, only that
every scenario ran and reported one.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent.parent


def table(report: str, heading: str) -> list[str]:
    """The body rows of the table under `heading`."""
    section = report.split(heading, 1)[1].split("\n### ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ")][1:]


def run(module: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    """`python -m module arguments`, once it ended well."""
    result = subprocess.run(
        [sys.executable, "-m", module, *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def bench(tmp_path: Path, *arguments: str) -> str:
    """The report `python -m bench` prints, once it ended well and wrote the same to a file."""
    report = tmp_path / "report.md"
    result = run("bench", *arguments, "--output", str(report))
    assert result.stdout == report.read_text()
    return result.stdout


def test_the_bench_runs_tiny_corpora_of_every_size_and_prints_its_verdict(
    tmp_path: Path,
) -> None:
    stdout = bench(tmp_path, "--instances", "40")

    for heading in ("### Drain by instance size", "### Ingest cost", "### Verdict"):
        assert heading in stdout
    rows = table(stdout, "### Drain by instance size")
    sizes = ("64 KiB", "128 KiB", "512 KiB", "27 MB")
    contenders = ("backlog drain", "DICOMweb STOW client", "bare client")
    for size in sizes:
        per_size = [row for row in rows if row.startswith(f"| {size} (")]
        assert [sum(c in row for row in per_size) for c in contenders] == [1, 1, 1], size
    # the summary, one row per size: two ratios, the sink's CPU for each contender, the resumes
    summary = [row for row in rows if re.match(r"\| [\d.]+ (KiB|MB) \| \d", row)]
    assert len(summary) == 4
    assert all(re.search(r"\| [\d.]+ / [\d.]+ / [\d.]+ \|", row) for row in summary)
    verdicts = table(stdout, "### Verdict")
    assert all(re.search(r"\| (met|MISSED) \|", row) for row in verdicts)
    for size in sizes:
        assert sum(row.startswith(f"| {size}: drain vs Orthanc") for row in verdicts) == 1
        assert sum(row.startswith(f"| {size}: sink CPU") for row in verdicts) == 1
    assert (
        sum("Resume" in row and re.search(r"\| [\d.]+ s \|", row) is not None for row in verdicts)
        == 1
    )
    assert sum(row.startswith("| Ingest") for row in verdicts) == 2


def test_over_https_every_contender_reaches_the_sink_and_verifies_its_certificate(
    tmp_path: Path,
) -> None:
    stdout = bench(tmp_path, "--instances", "20", "--scenarios", "sizes", "--tls")

    assert "KHEOPS sink: HTTPS on loopback" in stdout
    rows = [
        row
        for row in table(stdout, "### Drain by instance size")
        if re.match(r"\| [\d.]+ (KiB|MB) \(", row)
    ]
    for contender in ("backlog drain", "DICOMweb STOW client", "bare client"):
        assert sum(contender in row for row in rows) == 4, contender


def test_the_ab_tool_times_the_ingest_of_each_variant_against_the_first(tmp_path: Path) -> None:
    variants = '{"plain": {"plugin": null}, "live": {}, "again": {}}'
    result = run(
        "bench.ab",
        *("--ingest", "--count", "10", "--rounds", "2", "--rows", "16", "--columns", "16"),
        *("--workdir", str(tmp_path), variants),
    )

    lines = result.stdout.splitlines()
    assert re.fullmatch(r"against plain: median ingest [\d.]+ s", lines[0])
    for name in ("live", "again"):
        assert sum(re.match(rf"{name}: [\d.]+x \(", line) is not None for line in lines) == 1
    assert sum(line.startswith("round ") for line in result.stderr.splitlines()) == 2
