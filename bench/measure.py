"""Clocks, CPU counters and statistics shared by the scenarios."""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.waiting import wait_until

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
POLL = 0.02  # how often "is everything in the album yet?" is asked: the timing resolution


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def proc_status_bytes(pid: int, field_name: str) -> int:
    """VmRSS, VmHWM, ... of a process, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field_name}:\s+(\d+) kB$", status, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no {field_name} in /proc/{pid}/status")
    return int(match.group(1)) * 1024


@dataclass
class CpuMeter:
    """CPU seconds each named process spends between `start` and `stop`.

    On two shared cores the wall clock says how fast, CPU seconds say where the time went:
    that is what explains a ratio.
    """

    pids: Mapping[str, int]
    _before: dict[str, float] = field(default_factory=dict)
    used: dict[str, float] = field(default_factory=dict)

    def start(self) -> None:
        self._before = {name: self._read(name, pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        self.used = {
            name: self._read(name, pid) - self._before[name] for name, pid in self.pids.items()
        }
        return self.used

    @staticmethod
    def _read(name: str, pid: int) -> float:
        if pid == os.getpid():
            return time.process_time()
        return cpu_seconds(pid)


def timed_until(
    start: Callable[[], object], done: Callable[[], bool], *, timeout: float
) -> tuple[float, float]:
    """Run `start`, then poll `done`: (seconds until done, seconds `start` itself took)."""
    began = time.perf_counter()
    start()
    returned = time.perf_counter() - began
    wait_until(done, timeout=timeout, interval=POLL, message="every instance in the album")
    return time.perf_counter() - began, returned


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile: the value below which `fraction` of the values fall."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]
