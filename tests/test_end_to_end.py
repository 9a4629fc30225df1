"""The user's path through the commands, each run as a user runs it (a subprocess per command):
`xtalgen sample` output fed to `xtalgen evaluate`, and `xtalgen quickstart` itself.

The fast quickstart shortens the run through its own options (few training and sampling steps, no
CHGNet relaxation); the default quickstart (300 steps, CHGNet, about 5 minutes) is marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def xtalgen(*args, cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "xtalgen.cli", *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"xtalgen {' '.join(map(str, args))} -> {result.returncode}\n" \
                                   f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr
    return result


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sample_then_evaluate_its_output_directory(perov_val, tmp_path):
    from xtalgen.models.diffusion import build_model
    from xtalgen.models.io import save_model
    from xtalgen.schema import ModelConfig, ScoreNetConfig
    from xtalgen.sharding import open_shards

    pd.read_csv(perov_val, nrows=40).to_csv(tmp_path / "perov40.csv", index=False)
    shards = tmp_path / "shards"
    xtalgen("shard", "build", tmp_path / "perov40.csv", "--out", shards, "--workers", "1", "--quiet")
    # A freshly initialised model with the shard set's priors, written as `train consolidate` writes one.
    stats = open_shards(shards).stats
    torch.manual_seed(0)
    cfg = ModelConfig(score_net=ScoreNetConfig(preset="debug"))
    save_model(tmp_path / "model.pt", build_model(cfg, stats), cfg, stats)

    samples = tmp_path / "samples"
    xtalgen("sample", tmp_path / "model.pt", "--out", samples, "--num-samples", "5", "--batch-size", "3",
            "--steps", "3", "--seed", "1", "--no-progress")
    ids = [row["id"] for row in jsonl(samples / "samples.jsonl")]
    assert len(ids) == 5 and len(set(ids)) == 5

    evaluation = tmp_path / "eval"
    out = xtalgen("evaluate", samples, "--reference", shards, "--out", evaluation, "--no-relax", "--no-plots",
                  "--no-progress").stdout
    assert "evaluated 5 structures" in out
    table = pd.read_csv(evaluation / "per_structure.csv")
    assert len(table) == 5 and sorted(table["id"]) == sorted(ids)
    summary = json.loads((evaluation / "summary.json").read_text())
    assert summary["num_structures"] == 5
    assert summary["reference_size"] > 0  # novelty was judged against the training shards
    for key in ("novel_rate", "unique_rate", "struct_valid_rate"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary.get("stable_rate") is None  # no relaxation asked for, none reported


def _check_quickstart(out: Path, stdout: str, steps: int, samples: int) -> dict:
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["num_records"] == 250  # of the 288 AFLOW prototypes (README)
    assert (out / "shards" / "rejects.csv").read_text().count("too_many_atoms") == 38
    metrics = jsonl(out / "run" / "metrics.jsonl")
    assert metrics[-1]["step"] == steps
    assert (out / "model.pt").is_file()
    assert len(jsonl(out / "samples" / "samples.jsonl")) == samples
    assert len(pd.read_csv(out / "eval" / "per_structure.csv")) == samples
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["num_structures"] == samples
    assert "quickstart finished" in stdout and str(out / "eval") in stdout
    return summary


def test_quickstart_shortened_through_its_options(tmp_path):
    out = tmp_path / "qs"
    result = xtalgen("quickstart", "--out", out, "--steps", "4", "--samples", "3", "--sample-steps", "2",
                     "--no-relax", cwd=tmp_path)
    summary = _check_quickstart(out, result.stdout, steps=4, samples=3)
    assert summary.get("stable_rate") is None  # --no-relax: stability is not claimed


@pytest.mark.slow
def test_quickstart_with_its_defaults(tmp_path):
    """Exactly `make quickstart`: 300 steps, 16 samples of 50 steps, CHGNet relaxation and stability."""
    result = xtalgen("quickstart", cwd=tmp_path, timeout=3600)
    summary = _check_quickstart(tmp_path / "quickstart", result.stdout, steps=300, samples=16)
    assert summary["stable_rate"] is not None and 0.0 <= summary["stable_rate"] <= 1.0
