"""Downloads against a local HTTP server (127.0.0.1, in a thread) serving files the test makes."""

from __future__ import annotations

import csv
import hashlib
import sys
import zipfile
from dataclasses import replace
from itertools import islice
from pathlib import Path

import pytest
from http_files import start_file_server, stop_file_server

from xtalgen.datasets.download import (
    DATASETS,
    ChecksumError,
    DownloadError,
    download_dataset,
    fetch_source,
    file_hashes,
    resolve_source,
    safe_unzip,
)
from xtalgen.datasets.readers import iter_raw_items
from xtalgen.schema import ReaderConfig

csv.field_size_limit(sys.maxsize)


@pytest.fixture
def server():
    httpd = start_file_server()
    yield httpd
    stop_file_server(httpd)


def _csv_bytes(src: Path, n: int) -> bytes:
    with open(src, newline="") as handle:
        lines = list(islice(csv.reader(handle), n + 1))
    import io

    out = io.StringIO()
    csv.writer(out).writerows(lines)
    return out.getvalue().encode()


def _alex_like_zip(perov_val: Path) -> bytes:
    import io

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("alex_mp_20/train.csv", _csv_bytes(perov_val, 20))
        zf.writestr("alex_mp_20/val.csv", _csv_bytes(perov_val, 5))
    return buffer.getvalue()


def test_zip_download_verifies_unpacks_and_is_ready_to_build(server, tmp_path, perov_val):
    data = _alex_like_zip(perov_val)
    server.files["alex_mp_20.zip"] = data
    folder = download_dataset("alex_mp_20", tmp_path / "alex", url=f"{server.base}/alex_mp_20.zip",
                              sha256=hashlib.sha256(data).hexdigest(), progress=False)
    assert folder == (tmp_path / "alex" / "alex_mp_20").resolve()
    assert (tmp_path / "alex" / ".downloads" / "alex_mp_20.zip").read_bytes() == data
    for inputs in ([folder], [tmp_path / "alex"]):  # the archive itself is not read a second time
        items = list(iter_raw_items([str(i) for i in inputs], ReaderConfig()))
        assert len(items) == 25 and {i.split for i in items} == {"train", "val"}
    # A second call finds everything in place and downloads nothing.
    requests = len(server.requests)
    assert download_dataset("alex_mp_20", tmp_path / "alex", url=f"{server.base}/alex_mp_20.zip",
                            sha256=hashlib.sha256(data).hexdigest(), progress=False) == folder
    assert len(server.requests) == requests


def test_truncated_download_resumes_with_range(server, tmp_path, perov_val):
    data = _alex_like_zip(perov_val)
    server.files["alex_mp_20.zip"] = data
    out = tmp_path / "alex"
    (out / ".downloads").mkdir(parents=True)
    # An earlier, interrupted run left the first 1000 bytes.
    (out / ".downloads" / "alex_mp_20.zip.part").write_bytes(data[:1000])
    download_dataset("alex_mp_20", out, url=f"{server.base}/alex_mp_20.zip",
                     sha256=hashlib.sha256(data).hexdigest(), progress=False)
    assert server.requests == [("alex_mp_20.zip", "bytes=1000-")]
    assert (out / ".downloads" / "alex_mp_20.zip").read_bytes() == data
    assert not (out / ".downloads" / "alex_mp_20.zip.part").exists()


def test_connection_dropped_midway_is_resumed_in_the_same_call(server, tmp_path, perov_val):
    data = _alex_like_zip(perov_val)
    server.files["alex_mp_20.zip"] = data
    server.cut.add("alex_mp_20.zip")
    download_dataset("alex_mp_20", tmp_path, url=f"{server.base}/alex_mp_20.zip",
                     sha256=hashlib.sha256(data).hexdigest(), progress=False)
    assert server.requests == [("alex_mp_20.zip", None), ("alex_mp_20.zip", f"bytes={len(data) // 2}-")]
    assert (tmp_path / ".downloads" / "alex_mp_20.zip").read_bytes() == data


def test_wrong_hash_is_rejected_and_not_kept(server, tmp_path, perov_val):
    server.files["alex_mp_20.zip"] = _alex_like_zip(perov_val)
    with pytest.raises(ChecksumError, match="expected " + "0" * 64):
        download_dataset("alex_mp_20", tmp_path, url=f"{server.base}/alex_mp_20.zip", sha256="0" * 64,
                         progress=False)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "neither the file nor its partial download may remain"


def test_missing_file_and_unknown_dataset(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        download_dataset("alex_mp_20", tmp_path, url=f"{server.base}/nothing.zip", progress=False)
    with pytest.raises(KeyError, match="mp_20"):
        download_dataset("mp_21", tmp_path)


def test_known_hashes_match_the_published_files(server, tmp_path, shared_data):
    """The registry's hashes are those of the real CDVAE files (served here from ../shared/data)."""
    perov = DATASETS["perov_5"]
    for remote in perov.files[1:]:  # val, test: the files available here
        sha256, blob = file_hashes(shared_data / "perov_5" / remote.name)
        assert (sha256, blob) == (remote.sha256, remote.git_blob_sha1)
        server.files[f"mirror/{remote.name}"] = (shared_data / "perov_5" / remote.name).read_bytes()
    mirror = resolve_source(replace(perov, files=perov.files[1:]), url=f"{server.base}/mirror/")
    assert [f.git_blob_sha1 for f in mirror.files] == [f.git_blob_sha1 for f in perov.files[1:]]
    folder = fetch_source(mirror, tmp_path, progress=False)
    assert sorted(p.name for p in folder.glob("*.csv")) == ["test.csv", "val.csv"]
    for name in ("val.csv", "test.csv"):
        assert (folder / name).read_bytes() == (shared_data / "perov_5" / name).read_bytes()
    # A mirror serving a different file under the same name is caught by the git blob id.
    server.files["mirror/val.csv"] = b"tampered"
    with pytest.raises(ChecksumError, match="git blob"):
        fetch_source(mirror, tmp_path / "again", progress=False)


def test_zip_members_cannot_escape_the_folder(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../outside.csv", "x")
    with pytest.raises(ValueError, match="outside"):
        safe_unzip(archive, tmp_path / "out")
    assert not (tmp_path / "outside.csv").exists()


def _hull_file_bytes() -> bytes:
    """A small hull file in the layout of the published one (gzipped pandas frame, `entry` column)."""
    import gzip
    import json

    from pymatgen.core import Composition
    from pymatgen.entries.computed_entries import ComputedEntry

    entries = [ComputedEntry(Composition(f), e, parameters={"run_type": "GGA"}, entry_id=f"mp-{i}").as_dict()
               for i, (f, e) in enumerate([("Na", -1.3), ("Cl2", -3.6), ("NaCl", -6.6)])]
    frame = {"material_id": {str(i): e["entry_id"] for i, e in enumerate(entries)},
             "entry": {str(i): e for i, e in enumerate(entries)}}
    return gzip.compress(json.dumps(frame).encode(), mtime=0)


def test_hull_reference_is_registered_with_its_published_hashes():
    source = DATASETS["mp_hull"]
    (remote,) = source.files
    assert remote.name == "2023-02-07-mp-computed-structure-entries.json.gz"  # JSON, never a pickle
    assert remote.url == "https://figshare.com/ndownloader/files/40344436"
    assert len(remote.sha256) == 64 and len(remote.md5) == 32 and not remote.unzip
    assert "--hull" in source.next_step


def test_hull_reference_download_is_checked_and_readable(server, tmp_path):
    from xtalgen.datasets.download import RemoteFile, verify_file
    from xtalgen.evaluation.hull import load_hull_entries

    data = _hull_file_bytes()
    server.files["hull.json.gz"] = data
    name = DATASETS["mp_hull"].files[0].name
    folder = download_dataset("mp_hull", tmp_path / "hull", url=f"{server.base}/hull.json.gz",
                              sha256=hashlib.sha256(data).hexdigest(), progress=False)
    assert (folder / name).read_bytes() == data
    rows = load_hull_entries(folder)  # the folder holds exactly the one hull file
    assert [r["id"] for r in rows] == ["mp-0", "mp-1", "mp-2"]
    assert [r["energy_per_atom"] for r in rows] == pytest.approx([-1.3, -1.8, -3.3])
    # A wrong sha256 leaves nothing behind.
    with pytest.raises(ChecksumError, match="sha256 .*expected " + "1" * 64):
        download_dataset("mp_hull", tmp_path / "bad", url=f"{server.base}/hull.json.gz", sha256="1" * 64,
                         progress=False)
    assert not [p for p in (tmp_path / "bad").rglob("*") if p.is_file()]
    # The publisher's md5 is checked too.
    copy = tmp_path / "copy.json.gz"
    copy.write_bytes(data)
    with pytest.raises(ChecksumError, match="md5"):
        verify_file(copy, RemoteFile(name="copy", url="-", sha256=hashlib.sha256(data).hexdigest(), md5="0" * 32))
    assert not copy.exists()
