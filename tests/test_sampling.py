"""`xtalgen sample` end to end with a real (tiny, untrained) model saved by `save_model`.

Same seed -> same bytes; a run killed with SIGKILL and rerun equals an uninterrupted run; two ranks
(RANK/WORLD_SIZE) plus the merge equal one rank; conditions are checked against the model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from xtalgen.cli import main
from xtalgen.models.diffusion import build_model
from xtalgen.models.io import save_model
from xtalgen.schema import ConditionConfig, ModelConfig, ScoreNetConfig

STATS = {"mean_density": 0.05, "num_atoms_histogram": {4: 2, 5: 3, 8: 1}}
# 8 batches of 3 (the last has 1), so a kill after the first batch leaves work to resume; few steps
# and no corrector keep each batch cheap (the model is untrained: quality is not the point here).
REQUEST = ["--num-samples", "22", "--batch-size", "3", "--steps", "3", "--seed", "11", "--no-progress",
           "sample.corrector_steps=0"]


def _save(path: Path, conditions=()) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(score_net=ScoreNetConfig(preset="debug"), conditions=list(conditions))
    save_model(path, build_model(cfg, STATS), cfg, STATS)
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("model") / "model.pt")


@pytest.fixture(scope="module")
def reference_run(model_file, tmp_path_factory) -> Path:
    """An uninterrupted single-rank run of REQUEST: what every other route must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "samples"
    assert main(["sample", str(model_file), "--out", str(out), *REQUEST]) == 0
    return out


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every output file's bytes, by path relative to the output directory."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def _cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "xtalgen.cli", "sample", *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _committed_lines(path: Path) -> int:
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0


def test_reference_run_outputs(reference_run):
    rows = [json.loads(line) for line in (reference_run / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"sample-{i:06d}" for i in range(22)]
    assert {r["batch"] for r in rows} == set(range(8))
    for row in rows:
        assert row["seed"] == 11 and row["steps"] == 3 and row["guidance"] == 1.0 and row["conditions"] == {}
        assert row["num_atoms"] in STATS["num_atoms_histogram"]
        assert (reference_run / row["cif"]).is_file()
    assert len(list((reference_run / "cifs").glob("*.cif"))) == 22
    assert (reference_run / "samples.extxyz").read_text().count("Lattice=") == 22
    assert not list(reference_run.glob("samples.rank*"))


def test_same_seed_same_bytes_other_seed_other_structures(model_file, reference_run, tmp_path):
    assert main(["sample", str(model_file), "--out", str(tmp_path / "again"), *REQUEST]) == 0
    assert _snapshot(tmp_path / "again") == _snapshot(reference_run)
    other = [*REQUEST, "--seed", "12", "--num-samples", "3"]  # the last flag wins
    assert main(["sample", str(model_file), "--out", str(tmp_path / "other"), *other]) == 0
    frames = (tmp_path / "other" / "samples.extxyz").read_text()
    assert frames != (reference_run / "samples.extxyz").read_text()[: len(frames)]


def test_rerun_of_a_finished_run_changes_nothing(model_file, reference_run, tmp_path, capsys):
    before = _snapshot(reference_run)
    assert main(["sample", str(model_file), "--out", str(reference_run), *REQUEST]) == 0
    assert "sampled 0 structures" in capsys.readouterr().out
    assert _snapshot(reference_run) == before


def test_resume_after_kill_matches_an_uninterrupted_run(model_file, reference_run, tmp_path):
    out = tmp_path / "killed"
    proc = _cli(str(model_file), "--out", str(out), *REQUEST)
    deadline = time.monotonic() + 120
    while _committed_lines(out / "samples.jsonl") < 3:  # the first batch landed
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "first batch never landed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted = _committed_lines(out / "samples.jsonl")
    assert 3 <= interrupted < 22, "the run finished before the kill: nothing was resumed"

    assert main(["sample", str(model_file), "--out", str(out), *REQUEST]) == 0
    assert _snapshot(out) == _snapshot(reference_run)


def test_two_ranks_from_env_cover_the_request_exactly(model_file, reference_run, tmp_path):
    out = tmp_path / "ranks"
    procs = [_cli(str(model_file), "--out", str(out), *REQUEST, env={"RANK": str(r), "WORLD_SIZE": "2"})
             for r in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "rank 1/2: sampled 10 structures" in logs[1]  # batches 1, 3, 5, 7 (the last has one)
    assert _snapshot(out) == _snapshot(reference_run)  # merged, ordered, parts removed


def test_lost_rank_then_explicit_merge(model_file, reference_run, tmp_path, capsys):
    out = tmp_path / "lost"
    # rank 0 gives up waiting for rank 1: its part is kept, the merge is partial and says so
    args = ["sample", str(model_file), "--out", str(out), *REQUEST, "--world-size", "3"]
    assert main([*args, "--rank", "0", "--merge-wait", "0"]) == 1
    assert "batches missing" in capsys.readouterr().err
    assert main([*args, "--rank", "2"]) == 0
    assert main([*args, "--rank", "1"]) == 0
    assert sorted(p.name for p in out.glob("samples.rank*")) == [
        f"samples.rank{r}.{ext}" for r in range(3) for ext in ("extxyz", "jsonl")
    ]
    assert main(["sample", "--merge", str(out)]) == 0
    assert _snapshot(out) == _snapshot(reference_run)


def test_resume_with_another_request_is_refused(model_file, reference_run, tmp_path, capsys):
    before = _snapshot(reference_run)
    changed = [*REQUEST, "--steps", "4"]
    assert main(["sample", str(model_file), "--out", str(reference_run), *changed]) == 2
    assert "num_steps: 3 -> 4" in capsys.readouterr().err
    other_weights = _save(tmp_path / "other.pt", [ConditionConfig("dft_band_gap", "scalar")])
    assert main(["sample", str(other_weights), "--out", str(reference_run), *REQUEST]) == 2
    assert "model_sha256" in capsys.readouterr().err
    moved = tmp_path / "moved.pt"  # the same weights elsewhere: fine
    moved.write_bytes(model_file.read_bytes())
    assert main(["sample", str(moved), "--out", str(reference_run), *REQUEST]) == 0
    assert _snapshot(reference_run) == before
    assert main(["sample", str(model_file), "--out", str(tmp_path / "x"), "--num-samples", "0"]) == 2
    assert "sample.num_samples" in capsys.readouterr().err


def test_conditions_guidance_and_fixed_atom_count(tmp_path, capsys):
    model = _save(tmp_path / "cond.pt", [ConditionConfig("dft_band_gap", "scalar"),
                                         ConditionConfig("chemical_system", "chemical_system")])
    out = tmp_path / "gap"
    args = ["sample", str(model), "--out", str(out), "--num-samples", "3", "--batch-size", "2",
            "--steps", "4", "--num-atoms", "6", "--guidance", "2.0", "--no-progress",
            "--condition", "dft_band_gap=3.0", "--condition", "chemical_system=O-Li-Co"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["num_atoms"] for r in rows] == [6, 6, 6]
    assert all(r["conditions"] == {"dft_band_gap": 3.0, "chemical_system": "Co-Li-O"} for r in rows)
    assert all(r["guidance"] == 2.0 for r in rows)

    bad = ["sample", str(model), "--out", str(tmp_path / "bad"), "--condition", "band_gap=3"]
    assert main(bad) == 2
    assert "unknown condition 'band_gap'" in capsys.readouterr().err


def test_sample_overrides_and_help(model_file, tmp_path, capsys):
    out = tmp_path / "ovr"
    args = ["sample", str(model_file), "--out", str(out), "--num-samples", "2", "--batch-size", "2",
            "--steps", "3", "--no-progress", "coord_snr=0.3", "sample.corrector_steps=0"]
    assert main(args) == 0
    request = json.loads((out / "request.json").read_text())
    assert request["coord_snr"] == 0.3 and request["corrector_steps"] == 0
    assert main(["sample", str(model_file), "--out", str(out), "sample.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "missing.pt"), "--out", str(out)]) == 2
    assert main(["sample", str(tmp_path), "--out", str(out)]) == 2  # a directory without model.pt
    assert "xtalgen train consolidate" in capsys.readouterr().err
    assert main(["sample", "--merge", str(tmp_path)]) == 2
    assert "not a sampling output directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "xtalgen sample model.pt --out samples" in capsys.readouterr().out
