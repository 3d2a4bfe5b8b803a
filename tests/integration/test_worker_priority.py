"""The forwarder's threads run below Orthanc's own (`WorkerNiceness`), and only they do."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.orthanc_process import OrthancFactory, OrthancProcess
from tests.plugin_setup import Album, single_instance
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


def nice_values(orthanc: OrthancProcess) -> list[int]:
    """The nice value of each thread of Orthanc's process (field 19 of its task's stat)."""
    values = []
    for stat in Path(f"/proc/{orthanc.pid}/task").glob("*/stat"):
        try:
            after_name = stat.read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
        values.append(int(after_name[16]))  # the fields after the name start at the 3rd
    return values


def main_thread_nice(orthanc: OrthancProcess) -> int:
    stat = Path(f"/proc/{orthanc.pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


@pytest.mark.parametrize("niceness", [7, 0])
def test_the_workers_and_the_supervisor_run_lower_by_the_niceness_and_still_send(
    orthanc_factory: OrthancFactory, album: Album, niceness: int
) -> None:
    orthanc = orthanc_factory(kheops=album.section(Workers=3, WorkerNiceness=niceness))
    base = main_thread_nice(orthanc)
    lowered = min(19, base + niceness)

    if niceness:
        wait_until(
            lambda: nice_values(orthanc).count(lowered) == 3 + 1,
            timeout=30,
            message="three workers and the supervisor lowered",
        )
    sop_uid, data = single_instance()
    orthanc.upload(data)
    wait_until(lambda: album.holds([sop_uid]), timeout=30, message="the instance sent")

    values = nice_values(orthanc)
    assert set(values) <= {base, lowered}
    assert sum(value != base for value in values) == (4 if niceness else 0)
