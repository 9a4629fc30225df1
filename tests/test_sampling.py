"""`xtalgen sample` end to end with a real (tiny, untrained) model saved by `save_model`.

Same seed -> same bytes; a run killed with SIGKILL and rerun equals an uninterrupted run; two ranks
(RANK/WORLD_SIZE) plus the merge equal one rank; conditions are checked against the model. A
training run (directory, checkpoints/, checkpoints/latest, one checkpoint) samples exactly like its
consolidated model file; anything that is not a model is a one-line error that writes nothing.
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
    # The same intra-op thread count as this process, whose in-process runs are the reference:
    # float sums are split by thread count, so other counts give other last bits.
    threads = {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen(
        [sys.executable, "-m", "xtalgen.cli", "sample", *args],
        env={**os.environ, **threads, **(env or {})},
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
    assert "guidance" not in capsys.readouterr().err  # with a condition the scale is used: no warning
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["num_atoms"] for r in rows] == [6, 6, 6]
    assert all(r["conditions"] == {"dft_band_gap": 3.0, "chemical_system": "Co-Li-O"} for r in rows)
    assert all(r["guidance"] == 2.0 for r in rows)

    bad = ["sample", str(model), "--out", str(tmp_path / "bad"), "--condition", "band_gap=3"]
    assert main(bad) == 2
    assert "unknown condition 'band_gap'" in capsys.readouterr().err


@pytest.mark.parametrize("how", [pytest.param(["--guidance", "-1"], id="flag"),
                                 pytest.param(["sample.guidance_scale=-0.5"], id="override")])
def test_negative_guidance_is_refused_in_one_line_before_anything_is_written(model_file, tmp_path, capsys, how):
    out = tmp_path / "neg"
    assert main(["sample", str(model_file), "--out", str(out), "--no-progress", *how]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("xtalgen: error: config key 'sample.guidance_scale'"), err
    assert ">= 0" in err and not out.exists()


def test_guidance_without_a_condition_warns_once_and_changes_nothing(model_file, tmp_path, capsys):
    small = ["--num-samples", "2", "--batch-size", "2", "--steps", "2", "--seed", "3", "--no-progress",
             "sample.corrector_steps=0"]
    assert main(["sample", str(model_file), "--out", str(tmp_path / "plain"), *small]) == 0
    assert "guidance" not in capsys.readouterr().err
    assert main(["sample", str(model_file), "--out", str(tmp_path / "guided"), *small, "--guidance", "3"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "guidance" in line]
    assert warnings == ["xtalgen: warning: guidance scale 3 has no effect without a --condition: "
                        "the samples are unconditional"]
    # Ignored indeed: the very same structures as without it (the scale is still recorded as given).
    assert (tmp_path / "guided" / "samples.extxyz").read_bytes() == (tmp_path / "plain" / "samples.extxyz").read_bytes()
    assert json.loads((tmp_path / "guided" / "request.json").read_text())["guidance_scale"] == 3.0


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
    assert "missing.pt: no such file or directory" in capsys.readouterr().err
    assert main(["sample", str(tmp_path), "--out", str(out)]) == 2  # neither checkpoints nor model.pt
    assert f"no checkpoint found at {tmp_path}" in capsys.readouterr().err
    assert main(["sample", "--merge", str(tmp_path)]) == 2
    assert "not a sampling output directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "xtalgen sample model.pt --out samples" in capsys.readouterr().out


# --- what CHECKPOINT may be --------------------------------------------------------------------------
TINY_TRAIN = [
    "model.score_net.hidden=16", "model.score_net.num_layers=1", "model.score_net.num_rbf=8",
    "model.score_net.cutoff=4.0", "model.score_net.max_neighbors=12", "train.max_steps=3",
    "train.global_batch_structures=4", "train.micro_batch_structures=4", "train.log_every=1",
    "train.checkpoint_every=2", "train.ema_decay=0.5", "train.wandb.enabled=false",
]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
SMALL = ["--num-samples", "3", "--batch-size", "3", "--steps", "2", "--seed", "5", "--no-progress",
         "sample.corrector_steps=0"]


def _fresh_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xtalgen.cli", *args], env=_fresh_env(),
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def training_run(perov_val, tmp_path_factory) -> Path:
    """A real 3-step training run of the diffusion model (one process, DeepSpeed, tiny network)."""
    import pandas as pd

    from xtalgen.datasets.build import build_shards
    from xtalgen.schema import DataConfig

    root = tmp_path_factory.mktemp("training_run")
    pd.read_csv(perov_val, nrows=16).to_csv(root / "perov16.csv", index=False)
    build_shards([str(root / "perov16.csv")], root / "shards", DataConfig(), fmt="lmdb", workers=1, progress=False)
    result = _run("train", "debug", f"data.shards={root / 'shards'}", f"train.run_dir={root / 'run'}", *TINY_TRAIN)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return root / "run"


def test_sample_takes_a_run_its_checkpoints_latest_or_one_checkpoint(training_run, tmp_path):
    # The example `xtalgen --help` prints, as a user types it: `latest` is a text file naming a tag.
    latest = training_run / "checkpoints" / "latest"
    assert latest.read_text().strip() == "step_00000003"
    result = _run("sample", str(latest), "--out", str(tmp_path / "latest"), *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    # the consolidated EMA weights of the newest checkpoint: the same samples as `train consolidate`
    model = tmp_path / "model.pt"
    assert main(["train", "consolidate", str(training_run), "--out", str(model)]) == 0
    assert main(["sample", str(model), "--out", str(tmp_path / "file"), *SMALL]) == 0
    expected = (tmp_path / "file" / "samples.extxyz").read_text()
    assert expected.count("Lattice=") == 3
    sources = {"run": training_run, "checkpoints": training_run / "checkpoints",
               "tag": training_run / "checkpoints" / "step_00000003"}
    for name, source in sources.items():
        assert main(["sample", str(source), "--out", str(tmp_path / name), *SMALL]) == 0, name
    for name in ("latest", *sources):
        assert (tmp_path / name / "samples.extxyz").read_text() == expected, name
        request = json.loads((tmp_path / name / "request.json").read_text())
        assert request["checkpoint"] == str((training_run / "checkpoints" / "step_00000003").resolve())
    # an older checkpoint is other weights (3 steps apart): other structures
    assert main(["sample", str(training_run / "checkpoints" / "step_00000002"), "--out", str(tmp_path / "old"),
                 *SMALL]) == 0
    assert (tmp_path / "old" / "samples.extxyz").read_text() != expected


def test_resuming_an_output_with_another_checkpoint_is_refused(training_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sample", str(training_run), "--out", str(out), *SMALL]) == 0
    before = _snapshot(out)
    older = training_run / "checkpoints" / "step_00000002"
    assert main(["sample", str(older), "--out", str(out), *SMALL]) == 2
    assert "step_00000002" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_sampling_a_run_never_imports_deepspeed(training_run):
    """Consolidation for sampling reads weights-only files; a model file does not even load training."""
    code = (
        "import sys\n"
        "from xtalgen.sampling.cli import load_for_sampling\n"
        f"load_for_sampling({str(training_run)!r})\n"
        "assert 'deepspeed' not in sys.modules, 'deepspeed imported'\n"
        f"load_for_sampling({str(training_run / 'checkpoints' / 'latest')!r})\n"
        "assert 'deepspeed' not in sys.modules, 'deepspeed imported'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=_fresh_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_model_file_sampling_never_imports_training(model_file, tmp_path):
    code = (
        "import sys\n"
        "from xtalgen.cli import main\n"
        f"assert main(['sample', {str(model_file)!r}, '--out', {str(tmp_path / 'out')!r}, "
        "'--num-samples', '1', '--steps', '1', '--no-progress']) == 0\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('xtalgen.train', 'deepspeed', 'wandb')))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=_fresh_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


class _RunsCode:
    """Unpickling this would create a folder: the weights-only loader must refuse it instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_file_that_is_not_a_model_is_one_line_naming_it(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "xtalgen-model-v1", "state_dict": _RunsCode(marker)}, evil)
    result = _run("sample", str(evil), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr  # one line, no traceback
    assert result.stderr.startswith("xtalgen: error: ") and str(evil) in result.stderr
    assert "weights-only" in result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, why", [
    (b"", "EOFError"),
    (b"cif,formula\nnot,a model\n", "not an xtalgen model file"),
    (b"\x80\x02garbage", "not an xtalgen model file"),
    ("tensors", "format None, expected 'xtalgen-model-v1'"),
    ("latest_pointing_nowhere", "no checkpoint found"),
])
def test_unreadable_checkpoints_are_one_line_errors_that_write_nothing(content, why, tmp_path, capsys):
    path = tmp_path / "thing.pt"
    if content == "tensors":
        torch.save({"weights": torch.zeros(3)}, path)
    elif content == "latest_pointing_nowhere":
        path = tmp_path / "checkpoints" / "latest"
        path.parent.mkdir()
        path.write_text("step_00000007")
    else:
        path.write_bytes(content)
    out = tmp_path / "out"
    assert main(["sample", str(path), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("xtalgen: error: "), err
    assert str(path) in err and why in err, err
    assert not out.exists()
