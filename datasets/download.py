"""Download the public crystal datasets: resumable, verified, unpacked, ready for `shard build`.

    folder = download_dataset("mp_20", "data/mp_20")
    # then: xtalgen shard build data/mp_20 --out shards/mp_20

Sources (defaults; every URL and hash can be overridden):
  mp_20        CDVAE release, txie-93/cdvae `data/mp_20/{train,val,test}.csv` (45,231 structures)
  alex_mp_20   MatterGen release, microsoft/mattergen `data-release/alex-mp/alex_mp_20.zip`
               (607,683 train+val; a Git LFS file, so the LFS media URL is used)
  mp_20_mattergen  MatterGen's copy of MP-20, `data-release/mp-20/mp_20.zip` (Git LFS)
  perov_5      CDVAE release, `data/perov_5/{train,val,test}.csv`
  carbon_24    CDVAE release, `data/carbon_24/{train,val,test}.csv`
  mp_hull      convex-hull reference for `xtalgen evaluate --hull`: the Materials Project's
               ComputedStructureEntries of 2023-02-07 (154,719 entries; GGA/GGA+U energies with
               the MP2020 corrections in `energy_adjustments`) as Matbench Discovery publishes them,
               `2023-02-07-mp-computed-structure-entries.json.gz` (JSON; MatterGen's own
               `reference_MP2020correction.gz` is an LMDB of pickles, which is never loaded here)

Each file is fetched with urllib into `NAME.part`; an interrupted download resumes with an HTTP
Range request. It is checked against its sha256 (from the Git LFS pointer, or computed from the
published file), its git blob id (what GitHub itself stores for the CDVAE CSVs) and/or the md5 its
publisher lists (figshare), and only then renamed to its final name; a mismatch deletes the partial file and raises `ChecksumError`.
Zips are kept in `OUT/.downloads/` and unpacked into OUT (members may not escape it).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

CDVAE_RAW = "https://raw.githubusercontent.com/txie-93/cdvae/main/data"
MATTERGEN_LFS = "https://media.githubusercontent.com/media/microsoft/mattergen/main/data-release"
FIGSHARE = "https://figshare.com/ndownloader/files"
CHUNK_BYTES = 1 << 20
ARCHIVE_DIR = ".downloads"  # inside the output folder: downloaded zips (and their .part files)
ATTEMPTS = 3  # connection drops resume from where they stopped, this many times per call


class DownloadError(OSError):
    """The server could not be reached or the transfer failed."""


class _TransientError(DownloadError):
    """A dropped connection or a server-side error: worth another try (resuming)."""


class ChecksumError(ValueError):
    """A downloaded file does not have the expected hash; it was deleted."""


@dataclass(frozen=True)
class RemoteFile:
    name: str  # file name inside the output folder
    url: str
    sha256: str | None = None
    git_blob_sha1: str | None = None  # `git hash-object` of the file, as GitHub stores it
    md5: str | None = None  # as the publisher lists it (figshare); checked besides the sha256
    size: int | None = None
    unzip: bool = False


@dataclass(frozen=True)
class DatasetSource:
    name: str
    description: str
    files: tuple[RemoteFile, ...]
    next_step: str = "xtalgen shard build {folder} --out shards/{name}"  # what to run on the download


def _cdvae(dataset: str, blobs: dict[str, str], sha256: dict[str, str] | None = None) -> tuple[RemoteFile, ...]:
    sha256 = sha256 or {}
    return tuple(
        RemoteFile(name=f"{split}.csv", url=f"{CDVAE_RAW}/{dataset}/{split}.csv",
                   sha256=sha256.get(split), git_blob_sha1=blobs[split])
        for split in ("train", "val", "test")
    )


DATASETS: dict[str, DatasetSource] = {
    "mp_20": DatasetSource(
        "mp_20", "MP-20 (45,231 structures, <= 20 atoms), CDVAE release",
        _cdvae("mp_20", {"train": "b1c9d498565ac2fd8d075a51ff2ef5e51ba6c21f",
                         "val": "7efe4d7ebeb4f460ceaad35e5326c42111d9c9a1",
                         "test": "5dc643041df53f5ce4970a79930ad262b4f07acd"}),
    ),
    "alex_mp_20": DatasetSource(
        "alex_mp_20", "Alex-MP-20 (607,683 train+val structures), MatterGen release",
        (RemoteFile(name="alex_mp_20.zip", url=f"{MATTERGEN_LFS}/alex-mp/alex_mp_20.zip",
                    sha256="6688e652e45fac4ac8b016dbc4a3280afde9ba687bdacfd8c676775ed19b6228",
                    size=186506244, unzip=True),),
    ),
    "mp_20_mattergen": DatasetSource(
        "mp_20_mattergen", "MP-20 as released with MatterGen",
        (RemoteFile(name="mp_20.zip", url=f"{MATTERGEN_LFS}/mp-20/mp_20.zip",
                    sha256="5f44d6ad75299b6c08a3679ebcbd166def45c6d7733baacdce3972c2ec452e3a",
                    size=12254159, unzip=True),),
    ),
    "perov_5": DatasetSource(
        "perov_5", "Perov-5 (18,928 perovskites, 5 atoms), CDVAE release",
        _cdvae("perov_5",
               {"train": "0769074b5d51d293b765c4371b8f55c468c9c9f2",
                "val": "4a2c8dde98347dd0e01fa83dcf3982c2abe98f9f",
                "test": "d3c5d5af4b27a2a139149f2bb73c8a3dba9d8ac1"},
               {"val": "326f401219901270374b71e2faff63df3a29a99fd26f469993b9f476b693daf2",
                "test": "a85878c685037f0a578257f6d4fcdde00e968dbab73c5f1e90ecef65218513f6"}),
    ),
    "carbon_24": DatasetSource(
        "carbon_24", "Carbon-24 (10,153 carbon structures, 6-24 atoms), CDVAE release",
        _cdvae("carbon_24",
               {"train": "5e7ae970fbad8ddc46b6963e8cd6e425f11783a6",
                "val": "b3e29b927883642426ca1d9632d00359b412742b",
                "test": "9beca843fde489de1fe288b32f9e3ff710d42803"},
               {"val": "36c00689cd63073c954a58bc6ed6e2adb7aeed5a630c994970959a1babffd50e",
                "test": "386b17c08816f434818d51e46687bf72ff3f92348f3ba24823e4758f1fe8a969"}),
    ),
    # Matbench Discovery's data-files.yml lists this file (figshare file 40344436) with its md5.
    "mp_hull": DatasetSource(
        "mp_hull", "Materials Project entries 2023-02-07 (MP2020-corrected GGA/GGA+U) for "
        "`xtalgen evaluate --hull`, Matbench Discovery release",
        (RemoteFile(name="2023-02-07-mp-computed-structure-entries.json.gz", url=f"{FIGSHARE}/40344436",
                    sha256="553d6272f049a8f4ec26e503b89751e2616dd3af53d086545f6ea00f317a361f",
                    md5="76fc748db6b175bb80de4c276d27c235"),),
        next_step="xtalgen evaluate SAMPLES --hull {folder} --reference TRAINING_SHARDS --out eval",
    ),
}


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------
def download_dataset(
    name: str, out_dir: str | Path, *, url: str | None = None, sha256: str | None = None, progress: bool = True
) -> Path:
    """Fetch, verify and unpack dataset `name` into `out_dir`; returns the folder holding the CSVs.

    `url` replaces the source: for a one-file dataset the file's URL (then `sha256` is what it is
    checked against; without it the file is not verified), for a several-file dataset a base URL
    to which each file name is appended (a mirror of the same files: the known hashes still apply).
    """
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}")
    source = resolve_source(DATASETS[name], url=url, sha256=sha256)
    return fetch_source(source, out_dir, progress=progress)


def resolve_source(source: DatasetSource, *, url: str | None = None, sha256: str | None = None) -> DatasetSource:
    if url is None:
        if sha256 is not None:
            if len(source.files) != 1:
                raise ValueError(f"{source.name} has {len(source.files)} files; --sha256 applies to one file")
            return replace(source, files=(replace(source.files[0], sha256=sha256.lower(), git_blob_sha1=None,
                                                  md5=None),))
        return source
    if len(source.files) == 1:
        only = source.files[0]
        return replace(source, files=(replace(only, url=url, sha256=sha256.lower() if sha256 else None,
                                              git_blob_sha1=None, md5=None, size=None),))
    if sha256 is not None:
        raise ValueError(f"{source.name} has {len(source.files)} files; --sha256 applies to one file")
    base = url.rstrip("/")
    return replace(source, files=tuple(replace(f, url=f"{base}/{f.name}") for f in source.files))


def fetch_source(source: DatasetSource, out_dir: str | Path, *, progress: bool = True) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    extracted: list[Path] = []
    for remote in source.files:
        # Archives are kept in a hidden folder: `shard build OUT` must read the unpacked CSVs
        # once, not also the zip (readers skip hidden files and folders).
        dest = out_dir / ARCHIVE_DIR / remote.name if remote.unzip else out_dir / remote.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        path = download_file(remote, dest, progress=progress)
        if remote.unzip:
            extracted.extend(safe_unzip(path, out_dir))
    return csv_folder(out_dir, extracted)


# ---------------------------------------------------------------------------------------------
# One file: resumable transfer + verification
# ---------------------------------------------------------------------------------------------
def download_file(remote: RemoteFile, dest: Path, *, progress: bool = True) -> Path:
    """Download `remote` to `dest` (via `dest.part`, resumed with HTTP Range); verify; rename."""
    dest = Path(dest)
    if dest.exists():  # only ever renamed into place after verification
        return dest
    part = dest.with_name(dest.name + ".part")
    for attempt in range(1, ATTEMPTS + 1):
        try:
            _transfer(remote.url, part, expected_size=remote.size, progress=progress)
            break
        except _TransientError:
            if attempt == ATTEMPTS:
                raise
            time.sleep(min(2.0**attempt, 10.0))
    verify_file(part, remote)
    os.replace(part, dest)
    return dest


def _transfer(url: str, part: Path, *, expected_size: int | None, progress: bool) -> None:
    from tqdm import tqdm

    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "xtalgen"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left to fetch: the part file is already whole
            return
        error = _TransientError if exc.code >= 500 else DownloadError
        raise error(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(f"{url}: cannot connect ({getattr(exc, 'reason', exc)}); "
                            "without internet access, download on another machine or pass --url to a mirror") from None
    with response:
        if offset and response.status != 206:  # the server ignored Range: start again
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else expected_size
        with open(part, "ab" if offset else "wb") as handle, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, desc=part.name.removesuffix(".part"),
            disable=not progress, file=sys.stderr,
        ) as bar:
            try:
                while block := response.read(CHUNK_BYTES):
                    handle.write(block)
                    bar.update(len(block))
            except (OSError, urllib.error.URLError) as exc:  # connection dropped: resumable
                raise _TransientError(f"{url}: transfer interrupted ({exc}); run again to resume") from None
    size = part.stat().st_size
    if total is not None and size < total:
        raise _TransientError(f"{url}: got {size} of {total} bytes; run again to resume")


def file_hashes(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file, in one pass."""
    digests = file_digests(path)
    return digests["sha256"], digests["git_blob_sha1"]


def file_digests(path: Path) -> dict[str, str]:
    """{"sha256", "git_blob_sha1", "md5"} of a file, in one pass."""
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    blob = hashlib.sha1(f"blob {size}\0".encode())  # git's object id of the file's content
    md5 = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK_BYTES):
            sha256.update(block)
            blob.update(block)
            md5.update(block)
    return {"sha256": sha256.hexdigest(), "git_blob_sha1": blob.hexdigest(), "md5": md5.hexdigest()}


def verify_file(path: Path, remote: RemoteFile) -> None:
    """Raise ChecksumError (and delete `path`) unless every known hash matches."""
    expected = {"sha256": remote.sha256, "git_blob_sha1": remote.git_blob_sha1, "md5": remote.md5}
    expected = {k: v for k, v in expected.items() if v is not None}
    if not expected:
        print(f"warning: {remote.name}: no known hash, not verified", file=sys.stderr)
        return
    found = file_digests(path)
    labels = {"sha256": "sha256", "git_blob_sha1": "git blob id", "md5": "md5"}
    problems = [f"{labels[k]} {found[k]}, expected {v}" for k, v in expected.items() if found[k] != v]
    if problems:
        path.unlink()
        raise ChecksumError(f"{remote.name} from {remote.url}: {'; '.join(problems)}. "
                            "The file was deleted; run again to download it afresh.")


# ---------------------------------------------------------------------------------------------
# Unpacking
# ---------------------------------------------------------------------------------------------
def safe_unzip(archive: Path, out_dir: Path) -> list[Path]:
    """Extract every member under `out_dir` (refusing paths that escape it); returns the files.

    Members already extracted with the right size are left alone, so a re-run is cheap.
    """
    root = out_dir.resolve()
    files = []
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            target = (out_dir / info.filename).resolve()
            if root not in target.parents and target != root:
                raise ValueError(f"{archive}: member {info.filename!r} would be written outside {out_dir}")
            if info.is_dir() or "__MACOSX" in info.filename:
                continue
            files.append(target)
            if target.exists() and target.stat().st_size == info.file_size:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".tmp")
            with zf.open(info) as src, open(tmp, "wb") as dst:
                while block := src.read(CHUNK_BYTES):
                    dst.write(block)
            os.replace(tmp, target)
    return files


def csv_folder(out_dir: Path, extracted: list[Path]) -> Path:
    """The folder that holds the CSV files (a zip may put them in a subfolder)."""
    csvs = [p for p in extracted if p.suffix.lower() == ".csv"] or list(out_dir.glob("*.csv"))
    parents = {p.parent for p in csvs}
    return parents.pop() if len(parents) == 1 else out_dir
