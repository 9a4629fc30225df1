"""Where a shard set's files are: a local directory, an `http(s)://` base URL, or a `pipe:` command.

    shard_location("shards/mp20")                                   # LocalDir
    shard_location("https://data.example.org/shards/mp20")          # HttpDir: BASE/manifest.json, BASE/wds/...
    shard_location("pipe:aws s3 cp s3://bucket/mp20/{name} -")       # PipeDir: one command per file

How a remote set is found: the same way as a local one, through its `manifest.json`. A base URL
names the directory `shard build` wrote (served as it is, or synced to a bucket); the manifest is
fetched from BASE/manifest.json, each shard from BASE/<file> as the manifest names it
(`wds/train-000000.tar`), and the atom-count index likewise. A `pipe:` template is a shell command
that writes one file of the set to stdout, with `{name}` standing for the file's path inside the
set: the manifest is read through the same template as the shards, so the manifest's per-shard
sha256 and record counts vouch for whatever the command streams. (WebDataset itself takes a brace
list of tar URLs instead; here the manifest already lists the shards, and the loader needs its
counts up front to plan an epoch without reading a record.)

Only WebDataset shards stream: an LMDB split is one file read by random access through mmap, so a
remote LMDB set is refused in one line (`ShardSet` checks that).

Failures keep the local set's contract. Bytes that arrive but are wrong (truncated, altered) go
through the same tar reader and checks as a local file, so they raise the same
`ShardCorruptionError` naming the shard and key. Bytes that cannot be had (HTTP 404, an unreachable
server, a command that exits non-zero) raise `ShardUnavailableError`, a subclass, naming the URL or
the command: everything that stops cleanly on damage (DataLoader workers, every rank, exit code 2)
stops on it as well, but its message does not call the data corrupt. A connection dropped mid-shard
is resumed with an HTTP Range request from the byte where it stopped, so a flaky link costs no
records and changes no batch.

File names come from the manifest, which may come from a stranger: a name with anything but
letters, digits, `._-` and `/`, or with `..`, is refused, and names are quoted (URL quoting, shell
quoting) before they go into a URL or a command, so a manifest can never run a command.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import re
import shlex
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from xtalgen.sharding.codec import ShardCorruptionError

PIPE_PREFIX = "pipe:"
HTTP_PREFIXES = ("http://", "https://")
NAME_PLACEHOLDER = "{name}"
MANIFEST_NAME = "manifest.json"
HTTP_TIMEOUT_S = 60  # per connect / per read; a stalled server then counts as a dropped connection
HTTP_ATTEMPTS = 3  # Range resumes per shard after a dropped connection
_READ_CHUNK = 1 << 20
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*")


class ShardUnavailableError(ShardCorruptionError):
    """A file of a remote shard set could not be fetched: HTTP error, unreachable server, failing
    `pipe:` command. Names the file and the URL or command. A ShardCorruptionError subclass so that
    it stops training the same clean way (see module docstring); its message says what happened."""

    def __init__(self, shard: str, detail: str, key: str | None = None):
        super().__init__(shard, detail, key)
        self.args = (f"cannot read shard {shard}: {detail}",)


def is_remote(location: str | Path) -> bool:
    """True for an `http(s)://` URL or a `pipe:` command (where `Path` would mangle the text)."""
    text = str(location)
    return text.startswith(HTTP_PREFIXES) or text.startswith(PIPE_PREFIX)


def shard_location(location: str | Path) -> LocalDir | HttpDir | PipeDir:
    """The location object for a shard set given as a directory (or its manifest.json), a base URL
    (or its manifest.json URL), or a `pipe:` template; ValueError (one line) for a bad template."""
    text = str(location)
    if text.startswith(HTTP_PREFIXES):
        return HttpDir(_strip_manifest(text.rstrip("/")).rstrip("/"))
    if text.startswith(PIPE_PREFIX):
        template = text[len(PIPE_PREFIX):].strip()
        if NAME_PLACEHOLDER not in template:
            raise ValueError(
                f"shard location {text!r}: a pipe: command needs {NAME_PLACEHOLDER} where the file inside the "
                "shard set goes, e.g. 'pipe:aws s3 cp s3://bucket/shards/{name} -'"
            )
        return PipeDir(template)
    path = Path(location)
    return LocalDir(path.parent if path.name == MANIFEST_NAME else path)


def _strip_manifest(url: str) -> str:
    return url[: -len(MANIFEST_NAME)] if url.endswith("/" + MANIFEST_NAME) else url


def checked_name(name: str) -> str:
    """A file name from a manifest, refused unless it is a plain relative path (see module docstring)."""
    if not _SAFE_NAME.fullmatch(name) or ".." in name.split("/"):
        raise ShardCorruptionError(name, "unsafe file name in the manifest (refused: only letters, digits, "
                                         "'._-' and '/', no '..')")
    return name


# --- locations ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LocalDir:
    """A shard set on a local (or shared) file system."""

    path: Path
    remote = False

    def describe(self, name: str = "") -> str:
        return str(self.path / name) if name else str(self.path)

    def open(self, name: str) -> BinaryIO:
        path = self.path / name
        if not path.exists():
            raise ShardCorruptionError(name, "shard file is missing")
        return open(path, "rb", buffering=_READ_CHUNK)

    def read_bytes(self, name: str) -> bytes:
        return (self.path / name).read_bytes()

    def __str__(self) -> str:
        return str(self.path)


class _StreamedDir:
    """What a remote set shares: a whole small file (manifest, index) is its stream read to the end."""

    def read_bytes(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()


@dataclass(frozen=True)
class HttpDir(_StreamedDir):
    """A shard set under an http(s) base URL: file NAME is BASE/NAME."""

    base: str
    remote = True

    def url(self, name: str) -> str:
        return f"{self.base}/{urllib.parse.quote(checked_name(name))}"

    def describe(self, name: str = "") -> str:
        return self.url(name) if name else self.base

    def open(self, name: str) -> BinaryIO:
        return io.BufferedReader(_HttpStream(self.url(name), name), _READ_CHUNK)

    def __str__(self) -> str:
        return self.base


@dataclass(frozen=True)
class PipeDir(_StreamedDir):
    """A shard set read by a shell command per file: the template with {name} filled in (quoted)."""

    template: str
    remote = True

    def command(self, name: str) -> str:
        return self.template.replace(NAME_PLACEHOLDER, shlex.quote(checked_name(name)))

    def describe(self, name: str = "") -> str:
        return f"{PIPE_PREFIX}{self.command(name)}" if name else f"{PIPE_PREFIX}{self.template}"

    def open(self, name: str) -> BinaryIO:
        return io.BufferedReader(_PipeStream(self.command(name), name), _READ_CHUNK)

    def __str__(self) -> str:
        return f"{PIPE_PREFIX}{self.template}"


def read_remote_file(location: HttpDir | PipeDir, name: str, sha256: str) -> bytes:
    """A small file of a remote set (the atom-count index), checked against the manifest's sha256:
    unlike a tar it has no structure of its own that would show damage."""
    data = location.read_bytes(name)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ShardCorruptionError(name, f"sha256 mismatch (file altered) at {location.describe(name)}")
    return data


# --- byte streams (raw; the locations wrap them in a BufferedReader) --------------------------------
class _HttpStream(io.RawIOBase):
    """GET of one file, resumed with a Range request where a connection drops.

    End of data before Content-Length is a drop, not the end of the file: the file's real end is
    whatever the server says it is, and a short file on the server (a truncated shard) ends exactly
    at its Content-Length, where the tar reader then finds the truncation as it would locally.
    """

    def __init__(self, url: str, name: str):
        self.url, self.name = url, name
        self.pos, self.length, self.resumes = 0, None, 0
        self._response = None  # set first: a failed connect still leaves a closable object
        self._response = self._connect()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            try:
                n = self._response.readinto(buffer)
            except (OSError, http.client.HTTPException) as exc:  # reset, timeout, incomplete chunk
                if self.length is None:  # chunked: no known end to resume towards
                    raise ShardUnavailableError(
                        self.name, f"connection failed after {self.pos} bytes ({exc}): {self.url}") from None
                self._resume(exc)
                continue
            if n or self.length is None or self.pos >= self.length:
                self.pos += n
                return n
            self._resume("connection closed early")

    def _resume(self, cause) -> None:
        if self.resumes >= HTTP_ATTEMPTS:
            raise ShardUnavailableError(
                self.name, f"connection dropped {self.resumes + 1} times, last after {self.pos} of {self.length} "
                f"bytes ({cause}): {self.url}")
        self.resumes += 1
        self._response.close()
        self._response = self._connect()

    def _connect(self):
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={self.pos}-"} if self.pos else {})
        try:
            response = urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            raise ShardUnavailableError(self.name, f"HTTP {exc.code} {exc.reason}: {self.url}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ShardUnavailableError(self.name, f"cannot reach {self.url} ({reason})") from None
        resumed_at = response.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
        if self.pos and (response.status != 206 or resumed_at != str(self.pos)):
            # A server without Range support resends from byte 0: appending that would garble the shard.
            response.close()
            raise ShardUnavailableError(self.name, f"connection dropped after {self.pos} bytes and the server "
                                                   f"cannot resume (no Range support): {self.url}")
        if self.length is None and response.headers.get("Content-Length"):
            self.length = int(response.headers["Content-Length"])
        return response

    def close(self) -> None:
        if not self.closed and self._response is not None:
            self._response.close()
        super().close()


class _PipeStream(io.RawIOBase):
    """stdout of `sh -c COMMAND` (shell syntax, as WebDataset's `pipe:` runs it).

    Its exit status is checked where its output ends, before the tar reader sees the end: a command
    that fails (no such key, no credentials) writes nothing or a part, and that must read as "the
    command failed", naming it, not as a truncated shard. stderr goes to a temporary file, not a
    pipe: a command chatty on stderr would otherwise block once a pipe buffer filled.
    """

    def __init__(self, command: str, name: str):
        self.command, self.name = command, name
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=self._stderr, bufsize=0)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._proc.stdout.readinto(buffer)
        if not n:
            code = self._proc.wait()
            if code != 0:
                raise ShardUnavailableError(self.name, f"command exited with {code}{self._stderr_tail()}: "
                                                       f"{PIPE_PREFIX}{self.command}")
        return n

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        lines = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
        return f" ({lines[-1].strip()})" if lines else ""

    def close(self) -> None:
        """Stop the command if its output was not read to the end (a shard cut into pieces, an
        error elsewhere): close our end, so a pipeline's writers get SIGPIPE, then end the shell."""
        if not self.closed:
            self._proc.stdout.close()
            if self._proc.poll() is None:
                self._proc.terminate()
            self._proc.wait()
            self._stderr.close()
        super().close()
