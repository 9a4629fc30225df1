"""The recipes in slurm/, submitted for real to a one-node Slurm started on localhost.

`slurm/local/start.sh` starts slurmctld, slurmd and munge from a temporary directory (Debian's
slurm-wlm, installed by `make slurm-deps`); the node declares more CPUs than the machine has, so
2 tasks of one node stand in for the 2 nodes of a multi-node job. Every job runs the real recipe
with tiny CPU configs. Under CI a Slurm that cannot start fails this module; elsewhere it skips.

Jobs are waited for by polling `scontrol` every half second, except where the test is about
`sbatch --wait` itself: `sbatch --wait` polls at 2, 4, 8, 16, then every 32 s, which would add up
to half a minute to every job here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, running_in_ci

SLURM_DIR = REPO_ROOT / "slurm"
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
TINY_MODEL = [
    "model.score_net.hidden=16", "model.score_net.num_layers=1", "model.score_net.num_rbf=8",
    "model.score_net.cutoff=4.0", "model.score_net.max_neighbors=12",
]
STEPS = 200  # long enough (several seconds) for a signal to land mid-run
TRAIN = ["train.global_batch_structures=4", "train.micro_batch_structures=2", "train.log_every=1",
         "train.checkpoint_every=1000", "train.zero_stage=2", "train.wandb.enabled=false", f"train.max_steps={STEPS}"]
TWO_RANKS = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]
ONE_TASK = ["--gpus=0", "--cpus-per-task=1"]


# --- the cluster --------------------------------------------------------------------------------------
def _unavailable(reason: str):
    """Under CI a missing Slurm is a broken setup, never a skip (the recipes would go untested)."""
    if running_in_ci():
        pytest.fail(f"CI is set but the local Slurm cannot start: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    """The environment jobs are submitted from: SLURM_CONF of the local cluster, xtalgen on PATH."""
    if os.geteuid() != 0:
        _unavailable("the local Slurm needs root")
    missing = [tool for tool in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(tool) is None]
    if missing:
        _unavailable(f"{', '.join(missing)} not installed (run `make slurm-deps`)")
    state = tmp_path_factory.mktemp("slurm")
    started = subprocess.run([str(SLURM_DIR / "local" / "start.sh"), str(state)], capture_output=True, text=True,
                             timeout=120)
    if started.returncode != 0:
        subprocess.run([str(SLURM_DIR / "local" / "stop.sh"), str(state)], capture_output=True, timeout=60)
        _unavailable(f"slurm/local/start.sh failed: {started.stderr.strip()[-2000:]}")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env |= {"SLURM_CONF": str(state / "slurm.conf"), "PATH": f"{Path(sys.executable).parent}:{env['PATH']}",
            "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    yield env
    subprocess.run([str(SLURM_DIR / "local" / "stop.sh"), str(state)], capture_output=True, timeout=120)


def sbatch(env: dict, recipe: str, args: list[str], options: list[str], output: Path) -> str:
    """Submit `slurm/<recipe>` from the repository root; returns the job id."""
    command = ["sbatch", "--parsable", f"--output={output}", f"--chdir={REPO_ROOT}", *options,
               str(SLURM_DIR / recipe), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_rows(env: dict, job: str) -> list[dict[str, str]]:
    """`scontrol show job` as one dict per job (one per array task once they have started)."""
    result = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in result.stdout.splitlines() if line.strip()]


def wait_for(env: dict, job: str, timeout: float = 600) -> list[dict[str, str]]:
    """Poll until every task of `job` is in a final state; returns their rows, ordered by task id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = job_rows(env, job)
        if rows and all(row["JobState"] in TERMINAL for row in rows):
            return sorted(rows, key=lambda row: int(row.get("ArrayTaskId") or 0))
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not finish within {timeout} s: {job_rows(env, job)}")


def run_job(env: dict, recipe: str, args: list[str], options: list[str], output: Path) -> list[dict[str, str]]:
    rows = wait_for(env, sbatch(env, recipe, args, options, output))
    return rows


def exit_codes(rows: list[dict[str, str]]) -> list[int]:
    return [int(row["ExitCode"].split(":")[0]) for row in rows]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- data -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def perov60(perov_val, tmp_path_factory) -> Path:
    import pandas as pd

    path = tmp_path_factory.mktemp("perov") / "perov60.csv"
    pd.read_csv(perov_val, nrows=60).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def shards(perov60, tmp_path_factory) -> Path:
    from xtalgen.datasets.build import build_shards
    from xtalgen.schema import DataConfig

    out = tmp_path_factory.mktemp("train") / "shards"
    build_shards([str(perov60)], out, DataConfig(), fmt="lmdb", workers=1, progress=False)
    return out


def pretrain_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["configs/debug.yaml", f"data.shards={shards}", f"train.run_dir={run_dir}", *TINY_MODEL, *TRAIN, *extra]


def finetune_args(base: Path, shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [str(base), "chemical_system", f"data.shards={shards}", f"train.run_dir={run_dir}", *TRAIN, *extra]


@pytest.fixture(scope="module")
def pretrained(slurm, shards, tmp_path_factory) -> tuple[Path, list[dict], str]:
    """An uninterrupted 2-rank pre-training job: (run dir, its job rows, its output)."""
    root = tmp_path_factory.mktemp("pretrain")
    rows = run_job(slurm, "pretrain.sbatch", pretrain_args(shards, root / "run"), TWO_RANKS, root / "job.out")
    return root / "run", rows, (root / "job.out").read_text()


# --- pre-training -----------------------------------------------------------------------------------
def test_pretraining_on_two_ranks_reaches_its_last_step(pretrained):
    run_dir, rows, output = pretrained
    assert [row["JobState"] for row in rows] == ["COMPLETED"] and exit_codes(rows) == [0], output[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "completed" and summary["step"] == STEPS
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert "2 ranks" in output and json.loads((run_dir / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2


def test_finetuning_recipe_starts_from_the_pretraining_run(slurm, shards, pretrained, tmp_path):
    """finetune.sbatch with the pre-training run directory as BASE: its EMA weights are consolidated
    once into RUN_DIR/base.pt, then two srun ranks train adapters on the chemical system."""
    import torch

    base_run, *_ = pretrained
    run_dir = tmp_path / "ft"
    rows = run_job(slurm, "finetune.sbatch", finetune_args(base_run, shards, run_dir), TWO_RANKS, tmp_path / "ft.out")
    output = (tmp_path / "ft.out").read_text()
    assert exit_codes(rows) == [0], output[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == STEPS
    info = json.loads((run_dir / "run.json").read_text())["finetune"]
    assert info["base"] == str(run_dir / "base.pt") and info["base_source"] == str(base_run)
    assert output.count("fine-tuning on") == 1
    from xtalgen.train.consolidate import consolidated_state_dict

    base = torch.load(run_dir / "base.pt", weights_only=True)["state_dict"]
    tuned = consolidated_state_dict(run_dir / "checkpoints" / f"step_{STEPS:08d}")
    assert base and all(torch.equal(tuned[name], value) for name, value in base.items())  # base kept
    assert any(name.startswith("score_net.adapters.") for name in set(tuned) - set(base))


def test_a_preemption_signal_checkpoints_requeues_and_resumes_exactly(slurm, shards, pretrained, tmp_path):
    run_dir = tmp_path / "run"
    job = sbatch(slurm, "pretrain.sbatch", pretrain_args(shards, run_dir), TWO_RANKS, tmp_path / "job.out")
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        time.sleep(0.05)
    # What `--signal=B:USR1@120` does near the time limit: USR1 to the batch script only.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True, timeout=60)
    rows = wait_for(slurm, job)
    output = (tmp_path / "job.out").read_text()
    assert exit_codes(rows) == [0] and rows[0]["Restarts"] == "1", output[-3000:]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    preempted = [e for e in events if e["event"] == "preempted"]
    assert [e["signal"] for e in preempted] == ["SIGUSR1"] and 5 <= preempted[0]["step"] < STEPS, output[-3000:]
    assert f"requeueing job {job}" in output and "(restart 1)" in output
    assert json.loads((run_dir / "summary.json").read_text())["step"] == STEPS
    assert losses(run_dir) == losses(pretrained[0])  # every step, bit for bit


# --- shard array ------------------------------------------------------------------------------------
def _files(root: Path) -> dict[str, bytes]:
    """Every file of a shard set but the build state (which names its own folder)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".build" not in p.parts}


def test_shard_array_matches_a_single_process_build_byte_for_byte(slurm, perov60, tmp_path):
    out, single = tmp_path / "array", tmp_path / "single"
    args = [str(out), str(perov60), "shard.chunk_size=8", "shard.records_per_shard=16"]  # 8 chunks
    rows = run_job(slurm, "shard_array.sbatch", args, ["--array=0-2", *ONE_TASK], tmp_path / "part-%a.out")
    assert exit_codes(rows) == [0, 0, 0]
    assert sorted(p.name for p in (out / ".build").glob("chunk-*")) == [f"chunk-{k:06d}.msgpack" for k in range(8)]

    # Task 1 failed (its chunks are lost): the finalize step says so in one line and writes nothing.
    for k in (1, 4, 7):
        (out / ".build" / f"chunk-{k:06d}.msgpack").unlink()
    rows = run_job(slurm, "shard_finalize.sbatch", args, ONE_TASK, tmp_path / "final-1.out")
    assert exit_codes(rows) == [2] and not (out / "manifest.json").exists()
    assert (tmp_path / "final-1.out").read_text().strip() == (
        "xtalgen: error: 3 of 8 chunks are not built yet: 1, 4, 7 (part 1/3); rerun those parts, or build "
        "without --assemble to make them here")

    # Rerun task 1 alone, then the finalize step after it (a dependency, as in slurm/README.md).
    rerun = sbatch(slurm | {"PARTS": "3"}, "shard_array.sbatch", args, ["--array=1", *ONE_TASK],
                   tmp_path / "rerun.out")
    final = sbatch(slurm, "shard_finalize.sbatch", args, [f"--dependency=afterok:{rerun}", *ONE_TASK],
                   tmp_path / "final-2.out")
    assert exit_codes(wait_for(slurm, rerun)) == [0]
    assert exit_codes(wait_for(slurm, final)) == [0], (tmp_path / "final-2.out").read_text()[-3000:]
    assert (tmp_path / "final-2.out").read_text().rstrip().endswith("60 records checked: OK")  # shard verify

    build = subprocess.run([sys.executable, "-m", "xtalgen.cli", "shard", "build", str(perov60), "--out", str(single),
                            "shard.chunk_size=8", "shard.records_per_shard=16", "--quiet"],
                           env=slurm, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    array_files, single_files = _files(out), _files(single)
    assert len(single_files) > 3 and array_files.keys() == single_files.keys()
    for name, data in single_files.items():
        assert array_files[name] == data, name


# --- sample array, merge, evaluation ----------------------------------------------------------------
SAMPLE = ["--num-samples", "6", "--batch-size", "2", "--steps", "3", "--seed", "7"]


@pytest.fixture(scope="module")
def sampled(slurm, pretrained, tmp_path_factory) -> Path:
    """6 structures from a 2-task sample array and its merge job."""
    root = tmp_path_factory.mktemp("samples")
    out = root / "samples"
    array = sbatch(slurm, "sample_array.sbatch", [str(pretrained[0]), str(out), *SAMPLE], ["--array=0-1", *ONE_TASK],
                   root / "task-%a.out")
    merge = sbatch(slurm, "sample_merge.sbatch", [str(out)], [f"--dependency=afterok:{array}", *ONE_TASK],
                   root / "merge.out")
    assert exit_codes(wait_for(slurm, array)) == [0, 0], (root / "task-0.out").read_text()[-3000:]
    assert exit_codes(wait_for(slurm, merge)) == [0], (root / "merge.out").read_text()[-3000:]
    return out


def test_sample_array_merges_without_duplicates_and_matches_one_process(slurm, pretrained, sampled, tmp_path):
    rows = [json.loads(line) for line in (sampled / "samples.jsonl").read_text().splitlines()]
    ids = [row["id"] for row in rows]
    assert ids == [f"sample-{i:06d}" for i in range(6)]  # every structure once, in order
    assert sorted(p.stem for p in (sampled / "cifs").glob("*.cif")) == ids
    assert (sampled / "samples.extxyz").read_text().count("Lattice=") == 6
    # Each task was one rank: rank r of 2 made batches r, r + 2 (of 2 structures each).
    tasks = [(sampled.parent / f"task-{r}.out").read_text() for r in range(2)]
    assert "rank 0/2: sampled 4 structures" in tasks[0] and "rank 1/2: sampled 2 structures" in tasks[1]
    assert sorted({row["batch"] for row in rows}) == [0, 1, 2]

    # Seeds do not depend on the array size: one process makes the very same file.
    single = tmp_path / "single"
    result = subprocess.run([sys.executable, "-m", "xtalgen.cli", "sample", str(pretrained[0]), "--out", str(single),
                             *SAMPLE, "--no-progress"], env=slurm, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (single / "samples.jsonl").read_bytes() == (sampled / "samples.jsonl").read_bytes()
    assert (single / "samples.extxyz").read_bytes() == (sampled / "samples.extxyz").read_bytes()


def test_the_evaluation_job_writes_its_summary(slurm, sampled, tmp_path):
    out = tmp_path / "eval"
    rows = run_job(slurm, "evaluate.sbatch", [str(sampled), str(out), "--no-relax", "--no-plots"],
                   ["--cpus-per-task=2"], tmp_path / "eval.out")
    assert exit_codes(rows) == [0], (tmp_path / "eval.out").read_text()[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluated_count"] + summary["not_evaluated_count"] == 6
    assert len((out / "per_structure.csv").read_text().splitlines()) == 7  # header + one row each


# --- bad input --------------------------------------------------------------------------------------
def _cli_error(env: dict, *args: str) -> str:
    """The one line `xtalgen` itself prints for this input (run directly, no Slurm)."""
    result = subprocess.run([sys.executable, "-m", "xtalgen.cli", *args], env=env, capture_output=True, text=True,
                            timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 2, result.stderr
    return result.stderr.strip()


def test_recipes_given_bad_input_fail_fast_with_the_clis_one_line(slurm, shards, tmp_path):
    missing = tmp_path / "missing"
    cases = {  # recipe, its arguments, sbatch options, the equivalent direct command
        "config key": ("pretrain.sbatch", pretrain_args(shards, tmp_path / "a", "train.max_stepz=3"), TWO_RANKS,
                       ["train", *pretrain_args(shards, tmp_path / "a", "train.max_stepz=3"), "--check"]),
        "shards": ("pretrain.sbatch", pretrain_args(missing, tmp_path / "b"), TWO_RANKS,
                   ["train", *pretrain_args(missing, tmp_path / "b"), "--check"]),
        "base": ("finetune.sbatch", finetune_args(missing, shards, tmp_path / "c"), TWO_RANKS,
                 ["finetune", *finetune_args(missing, shards, tmp_path / "c"), "--check"]),
        "input": ("shard_array.sbatch", [str(tmp_path / "d"), str(missing)], ["--array=0-1", *ONE_TASK],
                  ["shard", "build", str(missing), "--out", str(tmp_path / "d"), "--part", "0/2"]),
        "model": ("sample_array.sbatch", [str(missing), str(tmp_path / "e")], ["--array=0-1", *ONE_TASK],
                  ["sample", str(missing), "--out", str(tmp_path / "e"), "--rank", "0", "--world-size", "2"]),
    }
    for name, (recipe, args, options, _) in cases.items():  # Slurm's own validation of the request
        test_only = subprocess.run(["sbatch", "--test-only", *options, str(SLURM_DIR / recipe), *args], env=slurm,
                                   capture_output=True, text=True, timeout=60)
        assert test_only.returncode == 0 and "to start at" in test_only.stderr, (name, test_only.stderr)

    # Submitted together with `sbatch --wait`, which returns the job's exit code.
    waits = {name: subprocess.Popen(["sbatch", "--wait", f"--output={tmp_path / name}-%a.out", f"--chdir={REPO_ROOT}",
                                     *options, str(SLURM_DIR / recipe), *args], env=slurm, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
             for name, (recipe, args, options, _) in cases.items()}
    codes = {name: (process.wait(timeout=300), process.stdout.read()) for name, process in waits.items()}
    for name, (*_, direct) in cases.items():
        assert codes[name][0] == 2, (name, codes[name][1])
        output = "\n".join(p.read_text() for p in sorted(tmp_path.glob(f"{name}-*.out")))
        errors = [line for line in output.splitlines() if line.startswith("xtalgen: error:")]
        assert errors and set(errors) == {_cli_error(slurm, *direct)}, (name, output[-3000:])
        assert "DeepSpeed" not in output and "step/s" not in output, name  # no rank started
