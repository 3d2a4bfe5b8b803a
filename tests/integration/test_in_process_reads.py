"""Workers read instance files in-process through the SDK; large ones over loopback while a
store callback would wait for the GIL a read holds (with OverwriteInstances)."""

from __future__ import annotations

import re

import pytest

from tests.orthanc_process import OrthancFactory, OrthancProcess
from tests.plugin_setup import Album, orthanc_id, queue, single_instance, status
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


def loopback_reads(orthanc: OrthancProcess) -> set[str]:
    """Orthanc ids whose file was asked for over Orthanc's HTTP server (its verbose log)."""
    return set(re.findall(r"\(http\) GET /instances/([0-9a-f-]+)/file", orthanc.log))


@pytest.mark.parametrize("store_callback", [False, True], ids=["default", "overwrite"])
def test_files_are_read_in_process_but_a_large_one_over_loopback_beside_a_store_callback(
    orthanc_factory: OrthancFactory, album: Album, store_callback: bool
) -> None:
    small = [single_instance() for _ in range(3)]
    large = single_instance(rows=1024, columns=1024)  # 2 MiB: a store would wait for its read
    orthanc = orthanc_factory(
        kheops=album.section(), extra_config={"OverwriteInstances": store_callback}
    )

    for _, data in [*small, large]:
        orthanc.upload(data)
    wait_until(lambda: album.holds([uid for uid, _ in [*small, large]]), timeout=60)

    expected = {orthanc_id(orthanc, large[0])} if store_callback else set()
    assert loopback_reads(orthanc) == expected


def test_an_instance_deleted_before_it_is_sent_is_never_counted_as_sent(
    orthanc_factory: OrthancFactory, album: Album
) -> None:
    kept, gone = single_instance(), single_instance()
    album.server.set_down(True)
    orthanc = orthanc_factory(kheops=album.section())
    orthanc.upload(kept[1])
    gone_id = orthanc.upload(gone[1])
    wait_until(lambda: status(orthanc)["Counts"]["Queued"] == 2)
    orthanc.delete(f"/instances/{gone_id}").raise_for_status()

    album.server.set_down(False)
    wait_until(lambda: album.holds([kept[0]]), timeout=60)

    def settled() -> bool:
        """Failed as deleted (the read says so), or dropped from the queue: never retried."""
        failed = [e for e in queue(orthanc, "failed") if e["ID"] == gone_id]
        pending = [e for e in queue(orthanc, "pending") if e["ID"] == gone_id]
        return not pending and all("deleted" in str(e["LastError"]) for e in failed)

    wait_until(settled, timeout=30, message="the deleted instance settled")
    assert not album.holds([gone[0]])
    assert all(e["ID"] != gone_id for e in queue(orthanc, "sent"))
