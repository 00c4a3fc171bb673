"""What the filesystem under a bench's working directory costs the embedded store.

The store (ClickHouse) writes every insert as a new part: a directory of ~13 files per table and month touched,
~15 parts per store group in ``bench score``. Creating a file is normally a few µs, but on some machines it is
not: on the development VM (ext4 without a journal, after many files were created and deleted) one empty file
took ~600 µs of kernel time against ~7 µs on tmpfs, and the store then spent more system CPU for the same
inserts (3-7x, measured, README "Performance"). On two shared cores that CPU is taken from the worker, so the bench
reports what creating a file costs where it runs, and ``TMPDIR`` moves its throwaway data elsewhere.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def mount_of(path: Path, mounts_text: str) -> tuple[str, str] | None:
    r"""(mount point, filesystem type) of the mount that holds ``path``, from ``/proc/mounts`` text.

    >>> mounts = "/dev/vda / ext4 rw 0 0\ntmpfs /dev/shm tmpfs rw 0 0\n"
    >>> mount_of(Path("/dev/shm/dealpulse-x"), mounts), mount_of(Path("/tmp/x"), mounts)
    (('/dev/shm', 'tmpfs'), ('/', 'ext4'))
    >>> mount_of(Path("/tmp"), "") is None
    True
    """
    best: tuple[str, str] | None = None
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = path == Path(point) or Path(point) in path.parents
        if inside and (best is None or len(point) > len(best[0])):
            best = (point, fields[2])
    return best


def file_create_us(directory: Path, files: int = 200) -> float:
    """Median µs to create (and close) one empty file in a fresh directory under ``directory``.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     file_create_us(Path(tmp), files=20) > 0
    True
    """
    timings = []
    with tempfile.TemporaryDirectory(dir=directory, prefix="create-probe-") as probe:
        for i in range(files):
            started = time.perf_counter()
            os.close(os.open(f"{probe}/{i}", os.O_CREAT | os.O_WRONLY, 0o644))
            timings.append(time.perf_counter() - started)
    return statistics.median(timings) * 1e6


def workdir_report(workdir: Path) -> dict[str, Any]:
    """The bench output's description of where its broker and store data lived."""
    resolved = workdir.resolve()
    try:
        mounts = Path("/proc/mounts").read_text()
    except OSError:  # not Linux
        mounts = ""
    mount = mount_of(resolved, mounts)
    return {
        "workdir_fs": mount[1] if mount else None,
        "workdir_file_create_us": round(file_create_us(resolved), 1),
    }
