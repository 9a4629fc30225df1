"""`xtalgen data` / `xtalgen shard` end to end, as a user runs them (subprocesses): download from a
local HTTP server, build, verify (and catch a damaged shard), stats, subset."""

from __future__ import annotations

import hashlib
import http.server
import json
import subprocess
import sys
import threading
import zipfile
from functools import partial
from pathlib import Path

import pandas as pd
import pytest

from xtalgen.cli import main
from xtalgen.datasets.cli import split_inputs_and_overrides
from xtalgen.sharding import open_shards


def xtalgen(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "xtalgen.cli", *map(str, args)], capture_output=True, text=True,
                            timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"xtalgen {' '.join(map(str, args))} -> {result.returncode}\n{result.stderr}")
    return result


@pytest.fixture()
def http_root(tmp_path):
    """A local HTTP server (127.0.0.1) serving a folder the test fills."""
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_overrides_are_told_apart_from_inputs(tmp_path):
    odd = tmp_path / "a=b.csv"
    odd.write_text("x")
    inputs, overrides = split_inputs_and_overrides([str(odd), "x.csv", "shard.workers=2", "data.seed=1"])
    assert inputs == [str(odd), "x.csv"] and overrides == ["data.shard.workers=2", "data.seed=1"]


def test_download_build_verify_stats_subset(http_root, perov_val, tmp_path, capsys):
    www, base = http_root
    rows = pd.read_csv(perov_val, index_col=0, nrows=80)
    rows.to_csv(tmp_path / "alex_mp_20.csv")
    with zipfile.ZipFile(www / "alex_mp_20.zip", "w") as zf:
        zf.write(tmp_path / "alex_mp_20.csv", "alex_mp_20/train.csv")
    digest = hashlib.sha256((www / "alex_mp_20.zip").read_bytes()).hexdigest()

    bad = xtalgen("data", "download", "alex_mp_20", "--out", tmp_path / "bad", "--url", f"{base}/alex_mp_20.zip",
                  "--sha256", "0" * 64, "--quiet", check=False)
    assert bad.returncode != 0 and "sha256" in (bad.stderr + bad.stdout).lower()

    out = xtalgen("data", "download", "alex_mp_20", "--out", tmp_path / "data", "--url", f"{base}/alex_mp_20.zip",
                  "--sha256", digest, "--quiet")
    folder = Path(out.stdout.split("downloaded alex_mp_20 to ")[1].splitlines()[0])
    assert (folder / "train.csv").exists()

    shards = tmp_path / "shards"
    built = xtalgen("shard", "build", folder, "--out", shards, "--format", "webdataset", "--quiet",
                    "reader.properties=[{column: heat_all, name: heat_all}]", "shard.records_per_shard=25")
    assert "read 80 = accepted 80 + rejected 0" in built.stdout and str(shards / "manifest.json") in built.stdout
    manifest = open_shards(shards).manifest
    assert manifest["num_records"] == 80 and manifest["splits"]["train"]["num_records"] == 80  # named train.csv
    assert manifest["config"]["shard"]["records_per_shard"] == 25

    def run(*args: str) -> str:  # in-process: the same entry point, without another interpreter start
        assert main([*map(str, args)]) == 0
        return capsys.readouterr().out

    assert "80 records checked: OK" in run("shard", "verify", shards, "--quiet")
    stats = json.loads(run("shard", "stats", shards, "--json"))
    assert stats["prior"]["num_atoms_histogram"] == {"5": 80} and stats["prior"]["property_coverage"]["heat_all"] == 80
    assert "atoms per structure" in run("shard", "stats", shards)
    assert "30 of 80 carrying heat_all" in run("shard", "subset", shards, "--property", "heat_all", "--max", "30")
    assert len(json.loads((shards / "subsets" / "heat_all-30.json").read_text())["splits"]["train"]["indices"]) == 30

    damaged = shards / "wds" / "train-000002.tar"
    data = bytearray(damaged.read_bytes())
    data[3000] ^= 0xFF
    damaged.write_bytes(bytes(data))
    broken = xtalgen("shard", "verify", shards, "--quiet", check=False)
    assert broken.returncode == 1 and "BROKEN wds/train-000002.tar" in broken.stdout
    assert "train-000001" not in broken.stdout


def test_every_command_has_help_with_an_example(capsys):
    for command in (["data", "download"], ["data", "list"], ["shard", "build"], ["shard", "verify"], ["shard", "stats"],
                    ["shard", "subset"]):
        with pytest.raises(SystemExit) as exit_:
            main([*command, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert "example" in text and f"xtalgen {' '.join(command)}" in text


def test_data_list_names_the_public_sets(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("mp_20", "alex_mp_20", "perov_5", "carbon_24"))


def test_verify_of_a_folder_without_manifest_fails_clearly(tmp_path, capsys):
    assert main(["shard", "verify", str(tmp_path)]) == 1
    assert "manifest.json" in capsys.readouterr().err


def test_build_of_a_missing_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "shards"
    result = xtalgen("shard", "build", tmp_path / "missing.csv", "--out", out, check=False)
    assert result.returncode == 2
    assert result.stderr == f"xtalgen: error: input {tmp_path / 'missing.csv'}: no such file or folder\n"
    assert not out.exists()
    # one missing input among good ones still stops the build before anything is written
    good = tmp_path / "good.csv"
    good.write_text("material_id,cif\n")
    out.mkdir()
    assert main(["shard", "build", str(good), str(tmp_path / "gone.extxyz"), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gone.extxyz: no such file or folder" in err
    assert list(out.iterdir()) == []
    assert main(["shard", "build", "builtin:aflw", "--out", str(out), "--quiet"]) == 2
    assert "unknown builtin set 'aflw'; available: builtin:aflow" in capsys.readouterr().err
    assert list(out.iterdir()) == []
