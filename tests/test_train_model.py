"""`xtalgen train` end to end on real Perov-5 shards with the diffusion model (a tiny network).

Covers the wiring (CrystalLoader over LMDB shards, CrystalDiffusion, run directory contents), exact
resume of the real data stream and model noise, and consolidation into a loadable model file.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from xtalgen.cli import main as xtalgen_main
from xtalgen.train import checkpoint as ckpt

TINY = [
    "model.score_net.hidden=16", "model.score_net.num_layers=1", "model.score_net.num_rbf=8",
    "model.score_net.cutoff=4.0", "model.score_net.max_neighbors=12",
    "train.global_batch_structures=4", "train.micro_batch_structures=4", "train.log_every=1",
    "train.checkpoint_every=2", "train.ema_decay=0.5", "train.wandb.enabled=false",
]


# In-process training exports RANK/MASTER_PORT/...; later tests' subprocesses must not inherit them.
pytestmark = pytest.mark.usefixtures("restore_launcher_environment")


@pytest.fixture(scope="module")
def perov_shards(perov_val, tmp_path_factory):
    from xtalgen.datasets.build import build_shards
    from xtalgen.schema import DataConfig

    root = tmp_path_factory.mktemp("perov_shards")
    subset = root / "perov_val_80.csv"
    pd.read_csv(perov_val, nrows=80).to_csv(subset, index=False)
    build_shards([str(subset)], root / "shards", DataConfig(), fmt="lmdb", workers=1, progress=False)
    return root / "shards"


def train(shards, run_dir, *overrides) -> int:
    return xtalgen_main(["train", "debug", f"data.shards={shards}", f"train.run_dir={run_dir}", *TINY, *overrides])


def metrics(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_resume_and_consolidate_on_perov_shards(perov_shards, tmp_path):
    from xtalgen.models.io import load_model
    from xtalgen.sharding.manifest import manifest_hash
    from xtalgen.train.consolidate import consolidated_state_dict

    straight, split = tmp_path / "straight", tmp_path / "split"
    # The straight run also samples periodically: that must not change its training stream.
    sampling = ["train.sample_every=5", "train.sample_count=2", "train.sample_steps=2"]
    assert train(perov_shards, straight, "train.max_steps=5", *sampling) == 0
    assert train(perov_shards, split, "train.max_steps=2") == 0
    assert train(perov_shards, split, "train.max_steps=5", "train.resume=auto") == 0
    a, b = metrics(straight), metrics(split)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5]
    for key in ("loss", "loss_lattice", "loss_coords", "loss_types", "grad_norm"):
        assert [m[key] for m in a] == [m[key] for m in b], key

    sampled = [json.loads(x) for x in (straight / "hooks.jsonl").read_text().splitlines()]
    assert [(h["step"], h["hook"]) for h in sampled] == [(5, "sample")]
    assert sampled[0]["sample/num_structures"] == 2 and 0 <= sampled[0]["sample/novel_rate"] <= 1

    info = json.loads((straight / "run.json").read_text())
    assert info["manifest_hash"] == manifest_hash(perov_shards)
    assert info["stats"]["mean_density"] > 0
    for name in ("config.yaml", "ds_config.json", "summary.json"):
        assert (straight / name).exists(), name

    out = tmp_path / "model.pt"
    assert xtalgen_main(["train", "consolidate", str(straight), "--out", str(out)]) == 0
    model, cfg, stats = load_model(out)
    assert cfg.score_net.hidden == 16 and stats["mean_density"] == pytest.approx(info["stats"]["mean_density"])
    expected = consolidated_state_dict(ckpt.latest_checkpoint(straight / "checkpoints"), use_ema=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_missing_shards_is_a_config_error_naming_the_key(tmp_path, capsys):
    assert xtalgen_main(["train", "debug", f"data.shards={tmp_path / 'none'}"]) == 2
    assert "data.shards" in capsys.readouterr().err


def test_debug_flag_caps_steps_and_prints_every_step(perov_shards, tmp_path, capsys, monkeypatch):
    from xtalgen.train import cli as train_cli

    monkeypatch.setattr(train_cli, "DEBUG_MAX_STEPS", 3)  # the real cap (20) costs minutes here
    run_dir = tmp_path / "debug"
    assert train(perov_shards, run_dir, "train.max_steps=100000", "train.log_every=50", "--debug") == 0
    saved = (run_dir / "config.yaml").read_text()
    assert "debug: true" in saved and "max_steps: 3" in saved and "log_every: 1" in saved
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3]
    out = capsys.readouterr()
    printed = [json.loads(x) for x in (out.out + out.err).splitlines() if x.startswith("{")]
    assert [p["step"] for p in printed] == [1, 2, 3]
    assert "training completed at step 3" in out.out


def test_activation_checkpointing_key_recomputes_the_score_net_layers(perov_shards, tmp_path, monkeypatch):
    """`train.activation_checkpointing=true` reaches the network (each layer runs under
    torch.utils.checkpoint), and the step-1 loss is the plain run's to the bit."""
    from xtalgen.models import score_net

    calls = []

    def counting_checkpoint(fn, *args, **kwargs):
        calls.append(fn)
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(score_net, "checkpoint", counting_checkpoint)
    plain, recomputed = tmp_path / "plain", tmp_path / "recomputed"
    assert train(perov_shards, plain, "train.max_steps=2") == 0
    assert not calls  # off by default
    assert train(perov_shards, recomputed, "train.max_steps=2", "train.activation_checkpointing=true") == 0
    assert calls  # one per layer and forward
    a, b = metrics(plain), metrics(recomputed)
    assert a[0]["loss"] == b[0]["loss"]
    assert [m["loss"] for m in b] == pytest.approx([m["loss"] for m in a], rel=1e-5)
