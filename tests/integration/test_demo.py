"""`make demo` keeps working: it sends its studies, shows the switching rule at work, answers this
machine only, and stops cleanly on Ctrl-C or SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

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
    config = json.loads((tmp_path / "orthanc" / "orthanc.json").read_text())
    assert config["RemoteAccessAllowed"] is False
    assert config["DicomAlwaysAllowStore"] is False


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_the_demo_opens_on_the_app_and_stops_cleanly_on_a_signal(
    tmp_path: Path, stop: signal.Signals
) -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "demo", "--studies", "1", "--state", str(tmp_path)],
        cwd=REPOSITORY,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as in a terminal
    )
    try:
        assert demo.stdout is not None
        lines: list[str] = []
        for line in demo.stdout:
            lines.append(line)
            if line.startswith("Press Ctrl-C"):
                break
        app = next(line.split()[-1] for line in lines if "KHEOPS web app" in line)
        assert requests.get(app, timeout=10).status_code == 200  # loopback: no password
        os.killpg(demo.pid, stop)  # Ctrl-C signals the whole group: Orthanc too
        out, err = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    assert "Demo stopped." in out
    with pytest.raises(requests.ConnectionError):  # Orthanc went with the demo
        requests.get(app, timeout=10)
