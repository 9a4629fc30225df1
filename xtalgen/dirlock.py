"""An exclusive lock on an output directory, so that two commands never write into one at once.

    with DirectoryLock("shards/perov"):
        ...  # write into shards/perov; a second process is refused with OutputInUseError

Every command that writes a directory (`shard build`, `train`, `sample`, `evaluate`) holds one
for as long as it writes. Without it, two runs into the same directory use the same temporary
names, clear each other's at start, and the one that finishes last can leave a set that looks
complete but is not.

How: `fcntl.flock` on a lock file inside the directory (`.xtalgen.lock`). The kernel releases a
flock when the last descriptor of its holder closes, so a holder killed with SIGKILL leaves no
lock behind, only the file; the next command takes it over and says so. The file records who
holds it (pid, host, command, start time) for the refusal message; the host matters because a
directory on a shared file system can be written from several machines (NFS and Lustre, mounted
with flock support, forward the lock between them).

The lock file is removed on release, so finished outputs carry nothing extra. That is safe only
because an acquirer checks, after the flock succeeds, that the path still names the file it
locked: a process that opened the file just before its holder removed it would otherwise hold a
lock on a file nobody else can see.

One process may take the same lock again while holding it (build_shards holds it, and the
ShardSetWriter it drives takes it too); it is released when the outermost holder releases it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".xtalgen.lock"
# A holder writes its details right after its flock succeeds; a refused process that reads the file
# in between sees it empty, so it reads again for up to this long before giving up on the details.
_HOLDER_WAIT_S = 1.0
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class OutputInUseError(RuntimeError):
    """Another running process holds the directory's lock; the message names it."""

    def __init__(self, directory: Path, holder: dict | None):
        self.directory, self.holder = directory, holder
        super().__init__(f"{directory} is in use by {describe_holder(holder)}; wait for it to finish, "
                         "or write somewhere else")


def describe_holder(holder: dict | None) -> str:
    if not holder:
        return "another process (its lock file names no holder yet)"
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')} "
            f"({holder.get('command', '?')})")


def current_command() -> str:
    """This process's command line, as a person would recognise it (`xtalgen shard build ...`)."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if program in ("cli.py", "__main__.py"):  # `python -m xtalgen.cli ...`
        program = "xtalgen"
    text = shlex.join([program, *sys.argv[1:]])
    return text if len(text) <= 300 else text[:297] + "..."


# Locks this process holds: lock file path -> [pid, descriptor, depth]. The pid keeps a forked child
# from believing it holds its parent's lock.
_HELD: dict[str, list[int]] = {}


class DirectoryLock:
    """Exclusive lock on `directory` (created if missing) held by this process; see the module docstring.

    `name` picks the lock file, for commands whose processes share a directory but must each
    refuse only their own double (`xtalgen sample` locks one file per rank). `acquire` raises
    OutputInUseError at once when another live process holds it; it never waits. `taken_over`
    is the record of a holder that died without releasing the lock, when this one replaced it.
    """

    def __init__(self, directory: str | Path, name: str = LOCK_NAME, command: str | None = None):
        self.directory = Path(directory)
        self.path = self.directory / name
        self.command = command
        self.taken_over: dict | None = None
        self._key: str | None = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> DirectoryLock:
        if self._key is not None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.path)
        held = _HELD.get(key)
        if held is not None and held[0] == os.getpid():
            held[2] += 1
            self._key = key
            return self
        fd = self._lock_file()
        if fd is not None:
            _HELD[key] = [os.getpid(), fd, 1]
        self._key = key
        return self

    def release(self) -> None:
        key, self._key = self._key, None
        held = _HELD.get(key) if key is not None else None
        if held is None or held[0] != os.getpid():
            return
        held[2] -= 1
        if held[2] > 0:
            return
        del _HELD[key]
        # Removed while still locked (see the module docstring), then unlocked by the close.
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(held[1])

    # --- internals ---------------------------------------------------------------------------
    def _lock_file(self) -> int | None:
        """Descriptor of the locked lock file (None where the file system has no locks)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # never truncates: the holder's record
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise OutputInUseError(self.directory, holder) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno not in _UNSUPPORTED:
                    raise
                print(f"xtalgen: warning: {self.directory}: this file system does not support locks "
                      f"({exc.strerror}); a second writer into it would not be refused", file=sys.stderr)
                return None
            if self._still_named(fd):
                break
            os.close(fd)  # its holder removed it between our open and our flock: lock the new one
        previous = _read_record(fd)
        if previous:
            self.taken_over = previous
            print(f"xtalgen: note: {self.directory} was locked by {describe_holder(previous)}, which ended "
                  "without releasing it; taking it over", file=sys.stderr)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command or current_command(),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record, sort_keys=True) + "\n").encode(), 0)
        except OSError:  # a full disk: the lock holds all the same, a refusal just names no holder
            pass
        return fd

    def _still_named(self, fd: int) -> bool:
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)

    @staticmethod
    def _holder(fd: int) -> dict | None:
        deadline = time.monotonic() + _HOLDER_WAIT_S
        while True:
            record = _read_record(fd)
            if record or time.monotonic() >= deadline:
                return record
            time.sleep(0.05)


def _read_record(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 4096, 0)
        record = json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
