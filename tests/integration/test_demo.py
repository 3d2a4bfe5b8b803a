"""`make demo` keeps working: it sends its studies and shows the switching rule at work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPOSITORY = Path(__file__).resolve().parent.parent.parent


def test_the_demo_sends_its_studies_and_shares_the_research_series(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "demo", "--no-wait", "--studies", "5", "--state", str(tmp_path)],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert "All 50 instances are in the main album" in result.stdout
    assert "2 series matched the rule and were shared" in result.stdout
    assert "/kheops/status" in result.stdout
