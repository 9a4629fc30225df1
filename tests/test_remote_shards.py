"""WebDataset shards streamed from `http://` (a local server in a thread, 127.0.0.1) and `pipe:`
commands: the same batches as the set on disk over 2 ranks x 2 workers, exact resume, the same
corruption errors for a truncated shard, one-line errors naming the URL or command for a missing
shard (404) or a failing command, resumed dropped connections, and `xtalgen train` from a URL."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from http_files import start_file_server, stop_file_server
from test_loader import batches_equal, build, load_real_records

from xtalgen.cli import main as xtalgen_main
from xtalgen.datasets.loader import CrystalLoader
from xtalgen.sharding import ShardCorruptionError, ShardUnavailableError, manifest_hash, open_shards
from xtalgen.sharding.remote import shard_location

# 120 records in 8 shards of 15. Without shuffling, stream s of S reads shards s, s + S, ...: with
# 2 ranks x 2 workers rank 0 reads shards 0, 1, 4, 5, and with 2 ranks x 1 stream 0, 2, 4, 6. So
# rank 0 meets shard 4 either way, rank 1 shard 7.
RECORDS_PER_SHARD = 15
TRUNCATED, MISSING = "wds/train-000004.tar", "wds/train-000007.tar"
OPTIONS = dict(batch_size=7, max_atoms_per_batch=80, shuffle_buffer=10, seed=11, world_size=2, num_workers=2)

pytestmark = pytest.mark.usefixtures("restore_launcher_environment")


def serve_dir(server, prefix: str, root: Path) -> str:
    """Publish every file of `root` under /prefix/; returns the base URL."""
    for path in root.rglob("*"):
        if path.is_file():
            server.files[f"{prefix}/{path.relative_to(root).as_posix()}"] = path.read_bytes()
    return f"{server.base}/{prefix}"


@pytest.fixture(scope="module")
def server():
    httpd = start_file_server()
    yield httpd
    stop_file_server(httpd)


@pytest.fixture(scope="module")
def records(perov_val, carbon_val):
    return load_real_records(perov_val, carbon_val, 60)


@pytest.fixture(scope="module")
def wds_dir(records, tmp_path_factory):
    root = build(tmp_path_factory.mktemp("wds"), records, "webdataset", RECORDS_PER_SHARD)
    assert len(open_shards(root).shards("train")) == 8
    return root


@pytest.fixture(scope="module")
def broken_dir(wds_dir, tmp_path_factory):
    """The same set with one shard cut inside a member and one shard gone."""
    root = tmp_path_factory.mktemp("broken") / "set"
    shutil.copytree(wds_dir, root)
    data = (root / TRUNCATED).read_bytes()
    (root / TRUNCATED).write_bytes(data[: len(data) // 2 + 100])
    (root / MISSING).unlink()
    return root


def source(kind: str, server, root: Path, prefix: str) -> str:
    if kind == "http":
        return serve_dir(server, prefix, root)
    return f"pipe:cat {root}/{{name}}"


@pytest.mark.parametrize("kind", ["http", "pipe"])
def test_remote_stream_gives_the_local_batches_and_resumes_exactly(kind, server, wds_dir):
    remote = source(kind, server, wds_dir, "good")
    for rank in range(2):
        local = list(CrystalLoader(wds_dir, rank=rank, **OPTIONS))
        assert len(local) > 6
        streamed = list(CrystalLoader(remote, rank=rank, **OPTIONS))
        assert all(batches_equal(a, b) for a, b in zip(streamed, local, strict=True))

        interrupted = CrystalLoader(remote, rank=rank, **OPTIONS)
        stream = iter(interrupted)
        head = [next(stream) for _ in range(6)]
        state = interrupted.state_dict()
        del stream
        before = len(server.requests)
        resumed = CrystalLoader(remote, rank=rank, **OPTIONS)
        resumed.load_state_dict(state)
        assert all(batches_equal(a, b) for a, b in zip(head + list(resumed), local, strict=True))
        if kind == "http":  # whole shards before the resume point are skipped, not downloaded
            fetched = {name for name, _ in server.requests[before:] if name.endswith(".tar")}
            assert 0 < len(fetched) < 4

    # A state saved on the set on disk resumes the same stream from the URL, and vice versa.
    on_disk = CrystalLoader(wds_dir, rank=1, **OPTIONS)
    head = [b for _, b in zip(range(5), on_disk)]
    moved = CrystalLoader(remote, rank=1, **OPTIONS)
    moved.load_state_dict(on_disk.state_dict())
    reference = list(CrystalLoader(wds_dir, rank=1, **OPTIONS))
    assert all(batches_equal(a, b) for a, b in zip(head + list(moved), reference, strict=True))


def damage(root, rank: int, workers: int) -> tuple:
    """(type, shard, key, detail, message) of what reading the rank's stream raises. Only these are
    kept: the exception's traceback would keep the DataLoader and its workers alive until a GC."""
    with pytest.raises(ShardCorruptionError) as err:
        list(CrystalLoader(root, rank=rank, **{**OPTIONS, "shuffle": False, "num_workers": workers}))
    exc = err.value
    return type(exc), exc.shard, exc.key, exc.detail, str(exc)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["http", "pipe"])
def test_truncated_shard_fails_as_on_disk_and_missing_shard_names_the_source(kind, workers, server, broken_dir):
    remote = source(kind, server, broken_dir, "broken")
    # Truncated: the bytes arrive and the same tar checks find the same damage at the same key.
    local, streamed = damage(broken_dir, 0, workers), damage(remote, 0, workers)
    assert streamed == local and local[0] is ShardCorruptionError
    assert streamed[1] == TRUNCATED and streamed[2] is not None and "truncated" in streamed[3]

    # Missing: the bytes cannot be had; one line naming the shard and the URL or the command.
    kind_, shard, _, _, message = damage(remote, 1, workers)
    assert kind_ is ShardUnavailableError and shard == MISSING
    assert "\n" not in message and message.startswith(f"cannot read shard {MISSING}: ")
    if kind == "http":
        assert message.endswith(f"HTTP 404 Not Found: {remote}/{MISSING}")
    else:
        assert f"command exited with 1 (cat: {broken_dir}/{MISSING}: No such file or directory)" in message
        assert message.endswith(f"pipe:cat {broken_dir}/{MISSING}")


def test_altered_remote_bytes_fail_the_sha256(server, wds_dir, tmp_path):
    """A flipped byte in tar padding changes no record: only the manifest's sha256 can catch it."""
    root = tmp_path / "set"
    shutil.copytree(wds_dir, root)
    name = "wds/train-000003.tar"
    data = bytearray((root / name).read_bytes())
    data[-1] ^= 0x01  # end-of-archive padding
    (root / name).write_bytes(bytes(data))
    url = serve_dir(server, "altered", root)
    with pytest.raises(ShardCorruptionError, match="sha256 mismatch") as err:
        list(open_shards(url).iter_values("train", [3]))
    assert err.value.shard == name


def test_dropped_connections_resume_with_range_and_change_no_batch(server, wds_dir):
    url = serve_dir(server, "flaky", wds_dir)
    server.cut.update(f"flaky/wds/train-{i:06d}.tar" for i in range(8))
    before = len(server.requests)
    local = list(CrystalLoader(wds_dir, rank=0, **OPTIONS))
    assert all(batches_equal(a, b) for a, b in zip(CrystalLoader(url, rank=0, **OPTIONS), local, strict=True))
    ranges = [r for name, r in server.requests[before:] if name.endswith(".tar") and r]
    assert len(ranges) == 4  # one resume per shard of rank 0


def test_remote_lmdb_and_bad_locations_are_refused_in_one_line(server, records, tmp_path, capsys):
    lmdb_url = serve_dir(server, "lmdb", build(tmp_path / "lmdb", records[:20], "lmdb"))
    cases = {
        lmdb_url: "holds lmdb shards, which are read by random access",
        f"{server.base}/nothing": f"HTTP 404 Not Found: {server.base}/nothing/manifest.json",
        "pipe:cat /shards/manifest.json": "a pipe: command needs {name}",
        f"pipe:cat {tmp_path}/none/{{name}}": "command exited with 1",
    }
    for location, expected in cases.items():
        assert xtalgen_main(["train", "debug", f"data.shards={location}", f"train.run_dir={tmp_path / 'run'}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("xtalgen: error: config key 'data.shards': ") and err.count("\n") == 1
        assert expected in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["wds/$(touch x).tar", "../secrets.tar", "/etc/passwd", "wds/a b.tar"])
def test_a_manifest_cannot_put_a_command_or_a_path_outside_the_set_into_a_source(name, tmp_path):
    for location in (f"pipe:cat {tmp_path}/{{name}}", "http://127.0.0.1:9/set"):
        with pytest.raises(ShardCorruptionError, match="unsafe file name") as err:
            shard_location(location).open(name)
        assert err.value.shard == name
    assert list(tmp_path.iterdir()) == []


TINY = [
    "model.score_net.hidden=16", "model.score_net.num_layers=1", "model.score_net.num_rbf=8",
    "model.score_net.cutoff=4.0", "model.score_net.max_neighbors=12", "train.max_steps=2",
    "train.global_batch_structures=4", "train.micro_batch_structures=4", "train.log_every=1",
    "train.checkpoint_every=2", "train.wandb.enabled=false", "data.loader.shuffle_buffer=16",
]


def test_train_two_steps_from_an_http_shard_set(server, wds_dir, tmp_path):
    """End to end through `xtalgen train`; the stream itself is compared with the disk above."""
    url, run_dir = serve_dir(server, "train", wds_dir), tmp_path / "run"
    before = len(server.requests)
    assert xtalgen_main(["train", "debug", f"data.shards={url}", f"train.run_dir={run_dir}", *TINY]) == 0
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["loss"] > 0 for m in metrics)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["manifest_path"] == f"{url}/manifest.json" and info["manifest_hash"] == manifest_hash(wds_dir)
    assert any(name.startswith("train/wds/") for name, _ in server.requests[before:])
