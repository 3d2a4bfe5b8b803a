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


def test_the_bench_runs_every_scenario_on_a_tiny_corpus_and_prints_its_verdict(
    tmp_path: Path,
) -> None:
    report = tmp_path / "report.md"

    result = subprocess.run(
        [sys.executable, "-m", "bench", "--instances", "40", "--output", str(report)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == report.read_text()
    for heading in ("### Throughput", "### Ingest cost", "### Memory", "### Verdict"):
        assert heading in result.stdout
    throughput = table(result.stdout, "### Throughput")
    assert sum("Sink limit" in row for row in throughput) == 1
    for scenario in ("DICOMweb STOW client", "Per-instance STOW", "backlog drain"):
        assert sum(scenario in row for row in throughput) == 2, scenario  # at 0 and at 50 ms
    assert any("live" in row and "lag store -> album p50" in row for row in throughput)
    verdicts = table(result.stdout, "### Verdict")
    assert len(verdicts) == 6
    assert all(re.search(r"\| (met|MISSED) \|", row) for row in verdicts)
    assert sum(bool(re.search(r"\| \d+\.\d\dx \| at least ", row)) for row in verdicts) == 5
    assert sum(bool(re.search(r"\| \d+ MB \| at most 50 MB \|", row)) for row in verdicts) == 1
