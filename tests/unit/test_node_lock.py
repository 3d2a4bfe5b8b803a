"""A SQLite state directory belongs to one node: refused to another, or on a network FS."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orthanc_kheops.state.node_lock import (
    LOCK_FILE,
    STALE_SECONDS,
    NodeLock,
    StateDirectoryInUse,
    file_system_type,
)


@pytest.fixture
def local_mounts(tmp_path: Path) -> Path:
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/sda1 / ext4 rw 0 0\n")
    return mounts


def test_the_node_that_claimed_a_directory_may_use_it_again(
    tmp_path: Path, local_mounts: Path
) -> None:
    NodeLock(tmp_path / "state", "host-a:8042", mounts=local_mounts)

    NodeLock(tmp_path / "state", "host-a:8042", mounts=local_mounts)


def test_another_node_is_refused_with_a_message_that_says_to_use_postgresql(
    tmp_path: Path, local_mounts: Path
) -> None:
    NodeLock(tmp_path / "state", "host-a:8042", mounts=local_mounts)

    with pytest.raises(StateDirectoryInUse) as refused:
        NodeLock(tmp_path / "state", "host-b:8042", mounts=local_mounts)

    message = str(refused.value)
    assert "is used by Orthanc node 'host-a:8042'" in message
    assert 'set Kheops.StateDatabase to "postgresql"' in message


def test_a_clean_stop_lets_another_node_take_the_directory_over(
    tmp_path: Path, local_mounts: Path
) -> None:
    NodeLock(tmp_path / "state", "host-a:8042", mounts=local_mounts).release()

    NodeLock(tmp_path / "state", "host-b:8042", mounts=local_mounts)


def test_the_lock_of_a_node_silent_for_long_is_taken_over(
    tmp_path: Path, local_mounts: Path, caplog: pytest.LogCaptureFixture
) -> None:
    NodeLock(tmp_path / "state", "old-container:8042", mounts=local_mounts)
    lock = tmp_path / "state" / LOCK_FILE
    beat = lock.stat().st_mtime

    with pytest.raises(StateDirectoryInUse):
        NodeLock(
            tmp_path / "state",
            "new-container:8042",
            mounts=local_mounts,
            clock=lambda: beat + STALE_SECONDS - 1,
        )
    NodeLock(
        tmp_path / "state",
        "new-container:8042",
        mounts=local_mounts,
        clock=lambda: beat + STALE_SECONDS + 1,
    )

    assert "'old-container:8042', silent for 61 s" in caplog.text
    assert '"new-container:8042"' in lock.read_text()


def test_a_running_node_keeps_its_lock_fresh(tmp_path: Path, local_mounts: Path) -> None:
    lock = NodeLock(tmp_path / "state", "host-a:8042", mounts=local_mounts)
    path = tmp_path / "state" / LOCK_FILE
    os.utime(path, (0, 0))

    lock.refresh()

    assert path.stat().st_mtime > 0


def test_a_directory_on_a_network_file_system_is_refused(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\nnas:/export {tmp_path}/nfs nfs4 rw 0 0\n")
    (tmp_path / "nfs").mkdir()

    with pytest.raises(StateDirectoryInUse, match=r"network file system \(nfs4\).*postgresql"):
        NodeLock(tmp_path / "nfs" / "kheops", "host-a:8042", mounts=mounts)


def test_the_file_system_is_that_of_the_deepest_mount_point(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/sda1 / ext4 rw 0 0\nnas:/x /srv nfs rw 0 0\ntmpfs /srv/local tmpfs rw 0 0\n"
    )

    assert file_system_type(Path("/srv/local/kheops"), mounts) == "tmpfs"
    assert file_system_type(Path("/srv/other"), mounts) == "nfs"
    assert file_system_type(Path("/srvx"), mounts) == "ext4"
