"""Refuse a SQLite state directory that another Orthanc node uses.

SQLite in WAL mode needs shared memory on one host and working file locks: on a network
file system, or with two nodes on one shared folder, two writers corrupt the queue or lose
instances without any error. So a node writes its name into `node.lock` in the state
directory and refuses to start when the file names another node, or when the directory is
on a network file system. Several nodes need Kheops.StateDatabase "postgresql".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

LOCK_FILE = "node.lock"
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


def claim_state_directory(
    directory: Path, node: str, *, mounts: Path = Path("/proc/mounts")
) -> None:
    """Make `directory` this node's, or raise `StateDirectoryInUse`."""
    directory.mkdir(parents=True, exist_ok=True)
    fs_type = file_system_type(directory, mounts)
    if fs_type in NETWORK_FILE_SYSTEMS:
        raise StateDirectoryInUse(
            f"the state directory {directory} is on a network file system ({fs_type}), where"
            f" SQLite's locks do not hold; {_ADVICE} (or a local StateDirectory)"
        )
    lock = directory / LOCK_FILE
    owner = _owner(lock)
    if owner is not None and owner != node:
        raise StateDirectoryInUse(
            f"the state directory {directory} is used by Orthanc node {owner!r} (see"
            f" {lock}); {_ADVICE}. If that node is gone for good, delete {lock}"
        )
    temporary = lock.with_suffix(".tmp")
    temporary.write_text(json.dumps({"Node": node, "Pid": os.getpid()}) + "\n")
    temporary.replace(lock)


def release_state_directory(directory: Path, node: str) -> None:
    """At a clean stop: another node may take the directory over."""
    lock = directory / LOCK_FILE
    if _owner(lock) == node:
        lock.unlink(missing_ok=True)


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


def _owner(lock: Path) -> str | None:
    try:
        document = json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return "(unreadable lock file)"
    node = document.get("Node") if isinstance(document, dict) else None
    return str(node) if node else "(unreadable lock file)"
