"""Fine-tuning: `xtalgen finetune` over real Perov-5 structures with every recipe, the base kept bit
for bit, subsets, guidance, range targets, exact resume and a 2-rank torchrun run.

The labels other than Perov-5's own (`dir_gap` as dft_band_gap) are made up from the row number:
these tests check the workflow, not what a property means; the benchmark measures that.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_train_dist import clean_env, free_port

from xtalgen.cli import main
from xtalgen.models.diffusion import NoisyCrystals, build_model
from xtalgen.models.io import load_model, save_model
from xtalgen.schema import ConditionConfig, ConfigError, ModelConfig, ScoreNetConfig, load_config
from xtalgen.sharding import load_subset, make_subset, open_shards

RECIPES = sorted(p.stem for p in (Path(__file__).parents[1] / "configs" / "finetune").glob("*.yaml"))
TINY_NET = ScoreNetConfig(preset="debug", hidden=16, num_layers=2, num_rbf=8, cutoff=5.0, max_neighbors=16)
ROWS = 40
RUN = ["train.global_batch_structures=4", "train.micro_batch_structures=4", "train.log_every=1",
       "train.checkpoint_every=2", "train.wandb.enabled=false", "train.ema_decay=0.5",
       "train.optim.lr=1e-2", "train.optim.scheduler=constant"]

pytestmark = pytest.mark.usefixtures("restore_launcher_environment")


@pytest.fixture(scope="module")
def shards(perov_val, tmp_path_factory) -> Path:
    """40 Perov-5 structures carrying every recipe's property; dft_bulk_modulus on every 4th only."""
    root = tmp_path_factory.mktemp("finetune")
    frame = pd.read_csv(perov_val, nrows=ROWS)
    row = np.arange(ROWS, dtype=float)
    frame["dft_band_gap"] = frame["dir_gap"]
    frame["dft_mag_density"] = 0.01 * (row % 7)
    frame["ml_bulk_modulus"] = 50.0 + 5.0 * row
    frame["dft_bulk_modulus"] = np.where(row % 4 == 0, 80.0 + row, np.nan)
    frame["energy_above_hull"] = 0.005 * (row % 9)
    frame.to_csv(root / "train.csv", index=False)
    from xtalgen.datasets.build import build_shards

    data = load_config([], ["data.reader.compute_hhi=true", "data.reader.compute_space_group=true"]).data
    build_shards([str(root / "train.csv")], root / "shards", data, fmt="lmdb", workers=1, progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def base(shards) -> Path:
    """An unconditional tiny model, written as a user's `model.pt` would be."""
    torch.manual_seed(0)
    cfg = ModelConfig(score_net=TINY_NET)
    stats = open_shards(shards).stats
    path = shards.parent / "base.pt"
    save_model(path, build_model(cfg, stats), cfg, stats)
    return path


def finetune(base: Path, recipe: str, shards: Path, run_dir: Path, *overrides: str) -> int:
    return main(["finetune", str(base), recipe, f"data.shards={shards}", f"train.run_dir={run_dir}", *RUN,
                 *overrides])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def consolidate(run_dir: Path) -> Path:
    out = run_dir / "model.pt"
    assert main(["train", "consolidate", str(run_dir), "--out", str(out)]) == 0
    return out


# --- the base, kept -----------------------------------------------------------------------------
def _noisy_batch(model, shards: Path, seed: int = 0) -> tuple[NoisyCrystals, torch.Tensor]:
    from xtalgen.batch import collate

    records = list(open_shards(shards).iter_records("train"))[:6]
    batch = collate(records)
    generator = torch.Generator().manual_seed(seed)
    t = torch.rand(batch.num_structures, generator=generator) * 0.9 + 0.05
    noisy = NoisyCrystals(batch.atomic_numbers, batch.frac_coords.float() + 0.01, batch.lattice.float() * 1.05,
                          batch.num_atoms, batch.batch_index)
    return noisy, t


@pytest.mark.parametrize("recipe", ["dft_band_gap", "chemical_system"])
def test_step_zero_reproduces_the_base_bit_for_bit(recipe, base, shards):
    from xtalgen.property_encoding import chemical_system_multi_hot
    from xtalgen.train.finetune import finetune_model_config, load_base_weights

    base_model, base_cfg, stats = load_model(base)
    model = build_model(finetune_model_config(base_cfg, load_config([f"configs/finetune/{recipe}.yaml"]).model),
                        stats).eval()
    load_base_weights(model, weights(base))
    x, t = _noisy_batch(model, shards)
    x.atomic_numbers[::2] = 0  # masked atoms: the element-set gate has elements left to place
    b = t.shape[0]
    conditions = ({"dft_band_gap": torch.full((b,), 2.5)} if recipe == "dft_band_gap" else
                  {"chemical_system": torch.from_numpy(chemical_system_multi_hot("Ba-O-Ti")).float().expand(b, -1)})
    with torch.no_grad():
        expected, got = base_model.predict(x, t), model.predict(x, t, conditions)
    for name in ("type_logits", "coords", "lattice"):
        assert torch.equal(getattr(expected, name), getattr(got, name)), name
    # The control: once an adapter's last layer is not zero, the property changes the output.
    with torch.no_grad():
        model.score_net.adapters[0][-1].bias.fill_(0.1)
        assert not torch.equal(model.predict(x, t, conditions).coords, expected.coords)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_trains_two_steps_and_keeps_the_base(recipe, base, shards, tmp_path):
    run_dir = tmp_path / "run"
    assert finetune(base, recipe, shards, run_dir, "train.max_steps=2") == 0
    tuned = weights(consolidate(run_dir))
    original = weights(base)
    for name, value in original.items():  # adapters only: every base tensor unchanged, bit for bit
        assert torch.equal(tuned[name], value), name
    new = {k: v for k, v in tuned.items() if k not in original}
    assert any(k.startswith("score_net.adapters.") for k in new)
    last_layers = [v for k, v in new.items() if k.startswith("score_net.adapters.") and ".2." in k]
    assert any(v.abs().max() > 0 for v in last_layers)  # the zero-initialised layers did train
    info = json.loads((run_dir / "run.json").read_text())["finetune"]
    assert info["base_sha256"] == __import__("hashlib").sha256(base.read_bytes()).hexdigest()
    names = [c.name for c in load_config([run_dir / "config.yaml"]).model.conditions]
    records = list(open_shards(shards).iter_records("train"))
    labelled = sum(all(r.properties.get(n) is not None for n in names) for r in records)
    assert info["labelled_records"] == labelled


def test_full_finetuning_changes_the_base(base, shards, tmp_path):
    assert finetune(base, "dft_band_gap", shards, tmp_path / "run", "train.max_steps=2", "finetune.full=true") == 0
    tuned, original = weights(consolidate(tmp_path / "run")), weights(base)
    changed = [k for k in original if not torch.equal(tuned[k], original[k])]
    assert len(changed) > len(original) // 2


# --- data -------------------------------------------------------------------------------------------
def test_multi_property_subsets_count_nest_and_carry_value_statistics(shards):
    records = list(open_shards(shards).iter_records("train"))
    both = [i for i, r in enumerate(records) if "dft_bulk_modulus" in r.properties and "hhi_score" in r.properties]
    assert 0 < len(both) < ROWS
    full = load_subset(shards, make_subset(shards, ["hhi_score", "dft_bulk_modulus"]))
    assert full["properties"] == ["dft_bulk_modulus", "hhi_score"]
    assert full["splits"]["train"]["indices"].tolist() == both
    values = full["splits"]["train"]["values"]["dft_bulk_modulus"]
    truth = np.array([records[i].properties["dft_bulk_modulus"] for i in both])
    assert values["count"] == len(both) and values["mean"] == pytest.approx(truth.mean(), rel=1e-12)
    assert values["quantiles"][0] == truth.min() and values["quantiles"][-1] == truth.max()
    small = load_subset(shards, make_subset(shards, "dft_bulk_modulus+hhi_score", max_n=4))
    assert small["splits"]["train"]["count"] == 4
    assert set(small["splits"]["train"]["indices"]) <= set(both)


def test_finetuning_reads_only_the_capped_subset(base, shards, tmp_path, capsys):
    assert finetune(base, "ml_bulk_modulus", shards, tmp_path / "run", "train.max_steps=1",
                    "finetune.max_labels=12") == 0
    assert f"fine-tuning on 12 of the {ROWS} train records carrying ml_bulk_modulus" in capsys.readouterr().out
    subset = load_subset(shards, "ml_bulk_modulus-12")
    assert subset["splits"]["train"]["count"] == 12


def test_collate_and_the_loader_encode_properties_alike(shards):
    from xtalgen.batch import collate
    from xtalgen.datasets.loader import CrystalLoader

    names = ["chemical_system", "space_group", "dft_bulk_modulus", "dft_band_gap"]
    loader = CrystalLoader(shards, batch_size=ROWS, shuffle=False, property_names=names)
    streamed = next(iter(loader))
    reference = collate(list(open_shards(shards).iter_records("train")), names)
    for name in names:
        assert torch.equal(streamed.properties[name], reference.properties[name]), name
        assert torch.equal(streamed.property_mask[name], reference.property_mask[name]), name
    assert reference.properties["chemical_system"].shape == (ROWS, 100)
    assert reference.property_mask["dft_bulk_modulus"].sum() == ROWS // 4


def test_space_group_computed_at_build_is_spglibs(shards):
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    from xtalgen.sampling.writer import batch_to_structures

    records = list(open_shards(shards).iter_records("train"))[:8]
    for record in records:
        structure = batch_to_structures(record.lattice[None], record.frac_coords, record.atomic_numbers,
                                        np.array([record.num_atoms]))[0]
        assert record.properties["space_group"] == SpacegroupAnalyzer(structure, symprec=0.1).get_space_group_number()


# --- sampling -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tuned(base, shards, tmp_path_factory) -> Path:
    """A band-gap model after 4 steps at a high learning rate: adapters far from zero."""
    run_dir = tmp_path_factory.mktemp("tuned") / "run"
    assert finetune(base, "dft_band_gap", shards, run_dir, "train.max_steps=4") == 0
    return consolidate(run_dir)


def _sample(model_path: Path, out: Path, *args: str) -> list[dict]:
    assert main(["sample", str(model_path), "--out", str(out), "--num-samples", "4", "--batch-size", "4",
                 "--steps", "4", "--no-progress", *args]) == 0
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def _frames(out: Path) -> str:
    return (out / "samples.extxyz").read_text()


def test_guidance_zero_gives_the_unconditional_samples(tuned, tmp_path):
    _sample(tuned, tmp_path / "none")
    _sample(tuned, tmp_path / "zero", "--condition", "dft_band_gap=3.0", "--guidance", "0")
    _sample(tuned, tmp_path / "one", "--condition", "dft_band_gap=3.0", "--guidance", "1")
    assert _frames(tmp_path / "zero") == _frames(tmp_path / "none")
    assert _frames(tmp_path / "one") != _frames(tmp_path / "none")  # the condition does act


def test_guidance_zero_through_the_two_pass_path_is_unconditional(tuned, shards):
    """lerp(uncond, cond, 0) from one doubled batch equals the unconditional pass exactly."""
    from xtalgen.models.sampler import guided_prediction

    model, _, _ = load_model(tuned)
    x, t = _noisy_batch(model, shards, seed=1)
    gap = {"dft_band_gap": torch.full((t.shape[0],), 3.0)}
    with torch.no_grad():
        plain = model.predict(x, t)
        two_pass = guided_prediction(model, x, t, gap, 0.0, single_pass_shortcuts=False)
    torch.testing.assert_close(two_pass.coords, plain.coords, rtol=0, atol=1e-6)
    torch.testing.assert_close(two_pass.lattice, plain.lattice, rtol=0, atol=1e-6)


def test_range_targets_are_drawn_from_the_training_values_in_range(tuned, tmp_path):
    rows = _sample(tuned, tmp_path / "range", "--condition", "dft_band_gap=0.1..5", "--seed", "3")
    quantiles = np.array(torch.load(tuned, weights_only=True)["stats"]["property_quantiles"]["dft_band_gap"])
    allowed = set(quantiles[(quantiles >= 0.1) & (quantiles <= 5)].tolist())
    assert allowed and all(r["targets"]["dft_band_gap"] in allowed for r in rows)
    assert all(r["conditions"] == {"dft_band_gap": "0.1..5"} for r in rows)
    again = _sample(tuned, tmp_path / "again", "--condition", "dft_band_gap=0.1..5", "--seed", "3")
    assert [r["targets"] for r in again] == [r["targets"] for r in rows]  # seeded by the plan


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        ("dft_band_gap>=50", "no training structure lies in that range"),
        ("space_group=225", "trained on: dft_band_gap"),
        ("dft_band_gap=5..1", "low end 5 is above its high end 1"),
        ("dft_band_gap=>3", "bad value"),
    ],
)
def test_bad_sampling_conditions_exit_2_and_write_nothing(tuned, tmp_path, condition, message, capsys):
    out = tmp_path / "out"
    assert main(["sample", str(tuned), "--out", str(out), "--steps", "2", "--condition", condition]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_ranges_are_for_scalar_properties_only():
    from xtalgen.sampling.conditions import Range, parse_conditions, split_assignments

    conditions = [ConditionConfig(name="dft_band_gap"), ConditionConfig(name="space_group", kind="space_group")]
    parsed = parse_conditions(split_assignments(["dft_band_gap<=2", "space_group=12"]), conditions)
    assert parsed == {"dft_band_gap": Range(high=2.0), "space_group": 12}
    with pytest.raises(ConfigError, match="scalar properties only"):
        parse_conditions(split_assignments(["space_group>=12"]), conditions)


# --- errors, resume, ranks ---------------------------------------------------------------------------------
def test_a_conditioned_base_and_a_missing_base_are_refused(tuned, shards, tmp_path, capsys):
    assert finetune(tuned, "dft_band_gap", shards, tmp_path / "a", "train.max_steps=1") == 2
    assert "already conditioned on dft_band_gap" in capsys.readouterr().err
    assert finetune(tmp_path / "nothing.pt", "dft_band_gap", shards, tmp_path / "b") == 2
    assert "does not exist" in capsys.readouterr().err
    assert finetune(tuned, "no_such_recipe", shards, tmp_path / "c") == 2
    assert "known: chemical_system" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_stopped_and_resumed_finetuning_equals_the_straight_run(base, shards, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert finetune(base, "hhi_score", shards, straight, "train.max_steps=6") == 0
    assert finetune(base, "hhi_score", shards, split, "train.max_steps=3") == 0
    assert finetune(base, "hhi_score", shards, split, "train.max_steps=6", "train.resume=auto") == 0
    losses = [[json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (straight, split)]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    a, b = weights(consolidate(straight)), weights(consolidate(split))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_without_a_newer_network_part_is_refused_on_resume(base, shards, tmp_path, capsys):
    """A run checkpointed before the element-set gate existed cannot resume exactly (the optimizer has no
    state for it): one clear line and exit 2, not a DeepSpeed traceback; the checkpoint is untouched."""
    run_dir = tmp_path / "run"
    assert finetune(base, "chemical_system", shards, run_dir, "train.max_steps=2") == 0
    states = run_dir / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt"
    payload = torch.load(states, weights_only=True)
    payload["module"] = {k: v for k, v in payload["module"].items() if "element_set_gate" not in k}
    torch.save(payload, states)
    written = states.read_bytes()
    capsys.readouterr()
    assert finetune(base, "chemical_system", shards, run_dir, "train.max_steps=4", "train.resume=auto") == 2
    error = capsys.readouterr().err
    assert "cannot resume" in error and "element_set_gate" in error and "Traceback" not in error
    assert states.read_bytes() == written


def test_two_ranks_finetune_under_torchrun(base, shards, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node=2",
               f"--master_port={free_port()}", "-m", "xtalgen.cli", "finetune", str(base), "chemical_system",
               f"data.shards={shards}", f"train.run_dir={run_dir}", *RUN, "train.zero_stage=2",
               "train.max_steps=3", "train.micro_batch_structures=2"]
    result = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 3
    assert result.stdout.count("fine-tuning on") == 1  # rank 0 says it once
    tuned, original = weights(consolidate(run_dir)), weights(base)
    assert all(torch.equal(tuned[k], v) for k, v in original.items())


def test_periodic_sampling_during_finetuning_reports_adherence(base, shards, tmp_path):
    """The recipe's sample.conditions are asked for every train.sample_every steps; the rate at which
    samples meet them reaches the run's hooks.jsonl (and W&B)."""
    run_dir = tmp_path / "run"
    assert finetune(base, "chemical_system", shards, run_dir, "train.max_steps=2", "train.sample_every=2",
                    "train.sample_count=3", "train.sample_steps=2", "sample.conditions.chemical_system=Ba-O-Ti") == 0
    logged = [json.loads(line) for line in (run_dir / "hooks.jsonl").read_text().splitlines()]
    rates = [entry["sample/meets_chemical_system_rate"] for entry in logged]
    assert len(rates) == 1 and 0.0 <= rates[0] <= 1.0
    table = logged[0]["sample/structures"]
    made = [row["formula"] for row in table]
    expected = sum(sorted({el for el in __import__("pymatgen.core", fromlist=["Composition"]).Composition(f).chemical_system.split("-")}) == ["Ba", "O", "Ti"] for f in made) / len(made)
    assert rates[0] == pytest.approx(expected)


def test_a_model_saved_before_the_type_adapter_loads_as_it_was(tuned, tmp_path, shards):
    """The element-logit adapter came later, zero-initialised: a file without it loads with its zeros and
    gives the predictions of the same file with explicit zeros; non-zero weights would be refused."""
    payload = torch.load(tuned, weights_only=True)
    payload["state_dict"]["score_net.type_adapter.weight"].zero_()
    payload["state_dict"]["score_net.type_adapter.bias"].zero_()
    explicit = tmp_path / "explicit.pt"
    torch.save(payload, explicit)
    payload["state_dict"] = {k: v for k, v in payload["state_dict"].items() if "type_adapter" not in k}
    older = tmp_path / "older.pt"
    torch.save(payload, older)
    (a, _, _), (b, _, _) = load_model(explicit), load_model(older)
    x, t = _noisy_batch(a, shards, seed=2)
    gap = {"dft_band_gap": torch.full((t.shape[0],), 1.0)}
    with torch.no_grad():
        assert torch.equal(a.predict(x, t, gap).type_logits, b.predict(x, t, gap).type_logits)
