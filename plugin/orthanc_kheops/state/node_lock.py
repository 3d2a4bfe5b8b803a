"""Refuse a SQLite state directory that another Orthanc node uses.

SQLite in WAL mode needs shared memory on one host and working file locks: on a network
file system, or with two nodes on one shared folder, two writers corrupt the queue or lose
instances without any error. So a node writes its name into `node.lock` in the state
directory, and refreshes it while it runs; it refuses to start when the file names another
node that refreshed it recently, or when the directory is on a network file system. Several
nodes need Kheops.StateDatabase "postgresql".
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = "node.lock"
REFRESH_SECONDS = 10.0
STALE_SECONDS = 60.0
"""A lock of another node not refreshed for this long was left by a node that is gone."""
NETWORK_FILE_SYSTEMS = frozenset(
    {
        "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "ceph", "glusterfs",
        "fuse.glusterfs", "fuse.sshfs", "fuse.s3fs", "fuse.cephfs", "lustre", "gpfs", "9p",
        "beegfs", "ocfs2", "gfs2", "virtiofs",
    }
)  # fmt: skip
_ADVICE = (
    'several Orthanc nodes cannot share SQLite state: set Kheops.StateDatabase to "postgresql"'
)


class StateDirectoryInUse(RuntimeError):
    """The SQLite state directory cannot be used by this node; the message says why."""


class NodeLock:
    """This node's claim on a SQLite state directory, kept fresh while the node runs.

    The lock file's modification time is its heartbeat: a lock of another node that has not
    been refreshed for `stale_after` seconds was left by a node that is gone (killed, or a
    container replaced under another host name), and is taken over with a warning.
    """

    def __init__(
        self,
        directory: Path,
        node: str,
        *,
        mounts: Path = Path("/proc/mounts"),
        clock: Callable[[], float] = time.time,
        stale_after: float = STALE_SECONDS,
    ) -> None:
        """Make `directory` this node's, or raise `StateDirectoryInUse`."""
        directory.mkdir(parents=True, exist_ok=True)
        fs_type = file_system_type(directory, mounts)
        if fs_type in NETWORK_FILE_SYSTEMS:
            raise StateDirectoryInUse(
                f"the state directory {directory} is on a network file system ({fs_type}),"
                f" where SQLite's locks do not hold; {_ADVICE} (or a local StateDirectory)"
            )
        self._path = directory / LOCK_FILE
        self._node = node
        owner, beat = _owner(self._path)
        if owner is not None and owner != node:
            age = clock() - beat
            if age < stale_after:
                raise StateDirectoryInUse(
                    f"the state directory {directory} is used by Orthanc node {owner!r} (its"
                    f" lock {self._path} was refreshed {max(age, 0):.0f} s ago); {_ADVICE}"
                )
            log.warning(
                "the state directory %s was used by node %r, silent for %.0f s; this node"
                " %r takes it over",
                directory,
                owner,
                age,
                node,
            )
        temporary = self._path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"Node": node, "Pid": os.getpid()}) + "\n")
        temporary.replace(self._path)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Refresh the lock every REFRESH_SECONDS from a thread of its own."""
        self._thread = threading.Thread(target=self._run, name="kheops-node-lock", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(REFRESH_SECONDS):
            self.refresh()

    def refresh(self) -> None:
        """This node is alive: the lock's modification time is now."""
        try:
            os.utime(self._path)
        except OSError as exc:
            log.warning("cannot refresh %s: %s", self._path, exc)

    def release(self) -> None:
        """At a clean stop: another node may take the directory over at once."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
        if _owner(self._path)[0] == self._node:
            self._path.unlink(missing_ok=True)


def file_system_type(path: Path, mounts: Path = Path("/proc/mounts")) -> str | None:
    """The type of the file system holding `path`: its deepest mount point in `mounts`."""
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return None
    target = str(path.resolve())
    best: tuple[int, str] | None = None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) > best[0]):
            best = (len(point), fields[2])
    return None if best is None else best[1]


def _owner(lock: Path) -> tuple[str | None, float]:
    """The node named in the lock file and when it was last refreshed; (None, 0) if none."""
    try:
        beat = lock.stat().st_mtime
        document = json.loads(lock.read_text())
    except FileNotFoundError:
        return None, 0.0
    except (OSError, ValueError):
        return "(unreadable lock file)", 0.0
    node = document.get("Node") if isinstance(document, dict) else None
    return (str(node) if node else "(unreadable lock file)"), beat
