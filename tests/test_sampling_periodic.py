"""The periodic sampling pass the trainer calls: metrics, determinism, and no side effects."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from pymatgen.core import Structure

from xtalgen.models.diffusion import build_model
from xtalgen.record import CrystalRecord
from xtalgen.sampling.driver import sample_batch_structures
from xtalgen.sampling.periodic import PREFIX, TABLE_KEY, _periodic_sample_config, make_periodic_sampler
from xtalgen.sampling.plan import SamplingPlan
from xtalgen.schema import load_config

STATS = {"mean_density": 0.05, "num_atoms_histogram": {4: 1, 5: 2}}


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(overrides=["model.score_net.preset=debug", "train.sample_count=4", "train.sample_steps=3",
                                 "sample.batch_size=3", "sample.corrector_steps=0", "train.seed=5"])
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, STATS)


@pytest.fixture(scope="module")
def perov_records(perov_val) -> list[CrystalRecord]:
    frame = pd.read_csv(perov_val, nrows=5)
    return [CrystalRecord.from_structure(Structure.from_str(c, fmt="cif"), id=i)
            for i, c in zip(frame["material_id"], frame["cif"])]


def test_metrics_rows_and_no_side_effects(setup, perov_records):
    cfg, model = setup
    fn = make_periodic_sampler(cfg, perov_records)
    model.train()
    rng_before = torch.get_rng_state()
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    first = fn(model, 100)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the training RNG stream is untouched
    assert model.training  # mode restored for the next training step
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights_before.items())

    for key in ("valid_rate", "struct_valid_rate", "comp_valid_rate", "unique_rate", "novel_rate"):
        assert 0.0 <= first[PREFIX + key] <= 1.0, key
    assert first[PREFIX + "num_structures"] == 4.0 and first[PREFIX + "step"] == 100
    table = first[TABLE_KEY]
    assert [row["id"] for row in table] == [f"sample-{i:06d}" for i in range(4)]
    assert all(row["num_atoms"] in STATS["num_atoms_histogram"] for row in table)
    assert first[PREFIX + "unique_rate"] == sum(r["unique"] for r in table) / 4
    json.dumps(first)  # the trainer writes it to hooks.jsonl as it is

    # Same noise on every call: the curves compare models, not draws.
    second = fn(model, 200)
    assert second[TABLE_KEY] == table
    assert {k: v for k, v in second.items() if "seconds" not in k and k != PREFIX + "step"} == {
        k: v for k, v in first.items() if "seconds" not in k and k != PREFIX + "step"
    }


def test_novelty_against_the_samples_themselves_is_zero(setup, perov_val, tmp_path):
    cfg, model = setup
    # The very structures the pass will make (same plan, same seeds) as the "training set".
    sample_cfg = _periodic_sample_config(cfg)
    plan = SamplingPlan(sample_cfg.num_samples, sample_cfg.batch_size, sample_cfg.seed)
    made = [s for b in range(plan.num_batches)
            for s in sample_batch_structures(model, cfg.model, model.stats, sample_cfg, plan, b, {}, "cpu")[0]]
    metrics = make_periodic_sampler(cfg, made)(model, 1)
    assert metrics[PREFIX + "novel_rate"] == 0.0
    assert metrics[PREFIX + "reference_size"] == 4.0
    csv = tmp_path / "reference.csv"
    pd.read_csv(perov_val, nrows=20).to_csv(csv, index=False)
    from_csv = make_periodic_sampler(cfg, str(csv))(model, 1)  # a path: read by the evaluator
    assert from_csv[PREFIX + "reference_size"] == 20.0 and from_csv[PREFIX + "novel_rate"] == 1.0
    without = make_periodic_sampler(cfg)(model, 1)
    assert PREFIX + "novel_rate" not in without  # not computed, rather than a made-up number
    assert all(math.isfinite(v) for k, v in without.items() if k != TABLE_KEY)


def test_zero_count_is_a_clear_error(setup):
    cfg, _ = setup
    bad = load_config(overrides=["train.sample_count=0"])
    with pytest.raises(ValueError, match="sample_count"):
        make_periodic_sampler(bad)
