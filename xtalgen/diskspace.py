"""A full disk as one line that names the file and the space needed, not a traceback.

Writers turn the operating system's "no space" errors into `DiskFullError`: ENOSPC, EDQUOT (a
quota) and EFBIG (a file-size limit, e.g. `ulimit -f`; Python ignores SIGXFSZ, so the write fails
instead of the process being killed). LMDB reports the same faults as `Input/output error`, its
word for a write cut short; `xtalgen.sharding.lmdb_format` maps those. The command line prints the
message and exits 2.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def is_out_of_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS


class DiskFullError(Exception):
    """A write into `path` failed for lack of space (or a quota or file-size limit).

    `written` is what the command had written when it stopped, `needed` an estimate of the bytes
    it still needs (`at_least`: a lower bound), `advice` what to do next. All are plain values,
    so the error crosses process boundaries (a build's worker processes) intact.
    """

    def __init__(self, path: str | Path, reason: str, written: int | None = None, needed: int | None = None,
                 at_least: bool = False, advice: str = "free space there and run the same command again"):
        super().__init__(str(path), reason, written, needed, at_least, advice)
        self.path, self.reason, self.written, self.needed = Path(path), reason, written, needed
        self.at_least, self.advice = at_least, advice

    def with_estimate(self, written: int | None, needed: int | None, at_least: bool = False,
                      advice: str | None = None) -> DiskFullError:
        return DiskFullError(self.path, self.reason, written, needed, at_least, advice or self.advice)

    def __str__(self) -> str:
        # Free space is measured now, after the command removed what it had written: so the total
        # the output needs, not what is "still" missing, is the figure to compare it with.
        free = free_bytes(self.path)
        free_text = f"{format_bytes(free)} free there now" if free is not None else "free space unknown"
        text = f"cannot write {self.path}: {self.reason}"
        if self.needed is not None:
            total = (self.written or 0) + self.needed
            text += f"; it needs {'at least' if self.at_least else 'about'} {format_bytes(total)} in all ({free_text})"
        elif self.written is not None:
            text += f"; {format_bytes(self.written)} had been written when it stopped ({free_text})"
        else:
            text += f" ({free_text})"
        return f"{text}; {self.advice}"


def from_os_error(exc: OSError, path: str | Path) -> DiskFullError:
    return DiskFullError(exc.filename or path, exc.strerror or str(exc))


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system of `path` (its nearest existing parent), None if unknown."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def format_bytes(n: int) -> str:
    """Decimal units, as `df -H` prints them: 999 B, 1.5 kB, 12.0 MB, 3.2 GB."""
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("kB", "MB", "GB", "TB"):
        value /= 1000
        if value < 1000 or unit == "TB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")
