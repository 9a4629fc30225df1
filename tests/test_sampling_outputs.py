"""Sampling outputs without a model: the plan, seeds, conditions, the commit log, recovery, merging.

Structures are real Perov-5 crystals standing in for sampler output, so these tests pin the file
protocol itself; tests/test_sampling.py runs the whole command with a real model.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pandas as pd
import pytest
import torch
from ase.io import read as ase_read
from pymatgen.core import Structure

from xtalgen.property_encoding import chemical_system_multi_hot
from xtalgen.sampling.conditions import (
    condition_tensors,
    draw_targets,
    parse_conditions,
    split_assignments,
)
from xtalgen.sampling.driver import resolve_checkpoint
from xtalgen.sampling.plan import NUM_ATOMS_STREAM, SamplingPlan, batch_seed, rank_from_env
from xtalgen.sampling.writer import (
    PartWriter,
    batch_to_structures,
    check_or_write_request,
    committed_batches,
    iter_extxyz_frames,
    merge_parts,
    read_samples,
    structures_from_rows,
)
from xtalgen.schema import ConditionConfig, ConfigError


@pytest.fixture(scope="module")
def perov_structures(perov_val) -> list[Structure]:
    frame = pd.read_csv(perov_val, nrows=11)
    return [Structure.from_str(cif, fmt="cif") for cif in frame["cif"]]


def _rows(plan: SamplingPlan, batch: int, structures) -> list[dict]:
    return [
        {"id": plan.sample_id(i), "index": i, "batch": batch, "seed": plan.seed,
         "num_atoms": len(s), "formula": s.composition.reduced_formula}
        for i, s in zip(plan.batch_indices(batch), structures)
    ]


def _write(writer: PartWriter, plan: SamplingPlan, batch: int, structures) -> None:
    chunk = [structures[i] for i in plan.batch_indices(batch)]
    writer.write_batch(_rows(plan, batch, chunk), chunk)


# --- plan -------------------------------------------------------------------------------------
def test_plan_covers_every_index_once_for_any_rank_count():
    plan = SamplingPlan(num_samples=103, batch_size=10, seed=7)
    assert plan.num_batches == 11
    assert len(plan.batch_indices(10)) == 3
    for world in (1, 2, 3, 8, 16):
        indices = [i for r in range(world) for b in plan.batches_for_rank(r, world) for i in plan.batch_indices(b)]
        assert sorted(indices) == list(range(103))
    ids = [plan.sample_id(i) for i in range(103)]
    assert sorted(ids) == ids and len(set(ids)) == 103


def test_batch_seeds_are_distinct_and_do_not_alias_across_base_seeds():
    seeds = {batch_seed(s, b, stream) for s in range(4) for b in range(50) for stream in (0, 1)}
    assert len(seeds) == 4 * 50 * 2
    assert batch_seed(0, 1) != batch_seed(1, 0)
    assert all(0 <= s < 2**63 for s in seeds)
    plan = SamplingPlan(4, 2, seed=3)
    a = torch.randn(5, generator=plan.generator(1))
    assert torch.equal(a, torch.randn(5, generator=plan.generator(1)))
    assert not torch.equal(a, torch.randn(5, generator=plan.generator(1, NUM_ATOMS_STREAM)))


def test_rank_from_torchrun_and_slurm_env():
    assert rank_from_env({}) == (0, 1)
    assert rank_from_env({"RANK": "1", "WORLD_SIZE": "4"}) == (1, 4)
    assert rank_from_env({"SLURM_PROCID": "2", "SLURM_NTASKS": "3"}) == (2, 3)
    # a lone process in a 4-task allocation's batch step is the whole job
    assert rank_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1"}) == (0, 1)
    # torchrun's variables win over the enclosing Slurm allocation's
    assert rank_from_env({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "SLURM_NTASKS": "8"}) == (0, 2)
    with pytest.raises(ValueError, match="outside"):
        rank_from_env({"RANK": "3", "WORLD_SIZE": "2"})


def test_slurm_array_elements_are_blocks_of_ranks():
    array = {"SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_STEP": "5", "SLURM_ARRAY_TASK_COUNT": "3"}
    one_task = [rank_from_env({**array, "SLURM_ARRAY_TASK_ID": str(i), "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
                for i in (10, 15, 20)]
    assert one_task == [(0, 3), (1, 3), (2, 3)]
    two_tasks = sorted(
        rank_from_env({**array, "SLURM_ARRAY_TASK_ID": str(i), "SLURM_PROCID": str(p), "SLURM_NTASKS": "2"})
        for i in (10, 15, 20) for p in (0, 1)
    )
    assert two_tasks == [(r, 6) for r in range(6)]


# --- conditions -------------------------------------------------------------------------------
CONDITIONS = [
    ConditionConfig(name="dft_band_gap", kind="scalar"),
    ConditionConfig(name="chemical_system", kind="chemical_system"),
    ConditionConfig(name="space_group", kind="space_group"),
    ConditionConfig(name="magnetic", kind="categorical", num_classes=2),
]


def test_conditions_parse_to_typed_values_and_tensors():
    raw = split_assignments(["dft_band_gap=3.0", "chemical_system=O-Li-Co", "space_group=225", "magnetic=1"])
    values = parse_conditions(raw, CONDITIONS)
    assert values == {"dft_band_gap": 3.0, "chemical_system": "Co-Li-O", "space_group": 225, "magnetic": 1}
    tensors = condition_tensors(draw_targets(values, {}, 4, torch.Generator()), CONDITIONS)
    assert tensors["dft_band_gap"].shape == (4,) and tensors["dft_band_gap"].dtype == torch.float32
    assert tensors["space_group"].dtype == torch.long and tensors["space_group"].tolist() == [225] * 4
    hot = tensors["chemical_system"]
    assert hot.shape == (4, 100)
    assert torch.nonzero(hot[0]).flatten().tolist() == [2, 7, 26]  # Li (3), O (8), Co (27): column Z-1
    assert torch.equal(torch.from_numpy(chemical_system_multi_hot("Co-Li-O")).float(), hot[3])


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["band_gap=3"], "unknown condition 'band_gap'"),
        (["dft_band_gap=high"], "bad value"),
        (["dft_band_gap=nan"], "not finite"),
        (["chemical_system=Li-Xx"], "not an element"),
        (["space_group=231"], "1..230"),
        (["magnetic=2"], "outside 0..1"),
        (["dft_band_gap"], "name=value"),
        (["dft_band_gap=1", "dft_band_gap=2"], "twice"),
    ],
)
def test_bad_conditions_are_clear_errors(items, message):
    with pytest.raises(ConfigError, match=message):
        parse_conditions(split_assignments(items), CONDITIONS)


def test_unconditional_model_names_that_it_has_no_conditions():
    with pytest.raises(ConfigError, match="unconditional"):
        parse_conditions({"dft_band_gap": "3"}, [])


# --- writing, recovery, merging ---------------------------------------------------------------
def test_written_outputs_read_back_as_the_same_structures(tmp_path, perov_structures):
    plan = SamplingPlan(len(perov_structures), 4)
    writer = PartWriter(tmp_path, plan)
    for batch in range(plan.num_batches):
        _write(writer, plan, batch, perov_structures)
    merge_parts(tmp_path, plan)
    rows = read_samples(tmp_path)
    assert [r["id"] for r in rows] == [plan.sample_id(i) for i in range(plan.num_samples)]
    frames = ase_read(tmp_path / "samples.extxyz", index=":", format="extxyz")
    for row, original, cif_structure, atoms in zip(rows, perov_structures, structures_from_rows(rows, tmp_path), frames):
        assert atoms.info["id"] == row["id"]
        assert atoms.get_atomic_numbers().tolist() == [s.specie.Z for s in original]
        np.testing.assert_allclose(atoms.cell.array, original.lattice.matrix, atol=1e-6)
        np.testing.assert_allclose(atoms.get_scaled_positions(wrap=False), original.frac_coords, atol=1e-6)
        assert cif_structure.composition == original.composition
        np.testing.assert_allclose(cif_structure.lattice.abc, original.lattice.abc, atol=1e-5)


def test_recovery_drops_a_torn_batch_and_keeps_committed_ones(tmp_path, perov_structures):
    plan = SamplingPlan(len(perov_structures), 4)
    writer = PartWriter(tmp_path, plan)
    _write(writer, plan, 0, perov_structures)
    _write(writer, plan, 1, perov_structures)
    committed_jsonl = (tmp_path / "samples.jsonl").read_bytes()
    committed_extxyz = (tmp_path / "samples.extxyz").read_bytes()
    # A kill during batch 2: its frames landed, and its JSONL write stopped one line and a half in.
    _write(writer, plan, 2, perov_structures)
    lines = (tmp_path / "samples.jsonl").read_text().splitlines(keepends=True)
    torn = "".join(lines[:9]) + lines[9][: len(lines[9]) // 2]
    (tmp_path / "samples.jsonl").write_text(torn)
    with (tmp_path / "samples.extxyz").open("a") as handle:
        handle.write("5\nLattice=")  # and a frame of a next batch cut short
    assert committed_batches(tmp_path, plan) == {0, 1}

    reopened = PartWriter(tmp_path, plan)
    assert reopened.recovered_batches == {0, 1}
    assert (tmp_path / "samples.jsonl").read_bytes() == committed_jsonl
    assert (tmp_path / "samples.extxyz").read_bytes() == committed_extxyz
    _write(reopened, plan, 2, perov_structures)
    assert committed_batches(tmp_path, plan) == {0, 1, 2}


def _single_rank_reference(out_dir, plan, structures):
    """All batches written by one rank and merged: the bytes every multi-rank run must reproduce."""
    writer = PartWriter(out_dir, plan)
    for batch in range(plan.num_batches):
        _write(writer, plan, batch, structures)
    merge_parts(out_dir, plan)
    return out_dir


def test_rank_parts_merge_to_the_single_rank_bytes(tmp_path, perov_structures):
    plan = SamplingPlan(len(perov_structures), 2)
    single = _single_rank_reference(tmp_path / "single", plan, perov_structures)

    multi = tmp_path / "multi"
    writers = [PartWriter(multi, plan, rank=r, world_size=3) for r in range(3)]
    for rank in (2, 0, 1):  # finishing order does not matter
        for batch in plan.batches_for_rank(rank, 3):
            _write(writers[rank], plan, batch, perov_structures)
    assert sorted(p.name for p in multi.glob("samples.rank*")) == [
        f"samples.rank{r}.{ext}" for r in range(3) for ext in ("extxyz", "jsonl")
    ]
    report = merge_parts(multi, plan)
    assert report.complete and report.num_structures == plan.num_samples
    assert not list(multi.glob("samples.rank*"))  # complete: parts are folded in and removed
    for name in ("samples.jsonl", "samples.extxyz"):
        assert (multi / name).read_bytes() == (single / name).read_bytes()
    for cif in (single / "cifs").iterdir():
        assert (multi / "cifs" / cif.name).read_bytes() == cif.read_bytes()
    assert merge_parts(multi, plan).num_structures == plan.num_samples  # idempotent


def test_incomplete_merge_keeps_parts_and_names_missing_batches(tmp_path, perov_structures):
    plan = SamplingPlan(len(perov_structures), 2)
    writers = [PartWriter(tmp_path, plan, rank=r, world_size=2) for r in range(2)]
    for batch in plan.batches_for_rank(0, 2):
        _write(writers[0], plan, batch, perov_structures)
    _write(writers[1], plan, 1, perov_structures)
    report = merge_parts(tmp_path, plan)
    assert not report.complete and report.missing_batches == [3, 5]
    assert (tmp_path / "samples.rank1.jsonl").exists()
    ids = [frame.id for frame in iter_extxyz_frames(tmp_path / "samples.extxyz")]
    assert ids == [r["id"] for r in read_samples(tmp_path)]
    assert ids == [plan.sample_id(i) for b in (0, 1, 2, 4) for i in plan.batch_indices(b)]
    # the lost rank comes back and finishes; the next merge is complete and ordered
    for batch in (3, 5):
        _write(PartWriter(tmp_path, plan, rank=1, world_size=2), plan, batch, perov_structures)
    assert merge_parts(tmp_path, plan).complete
    assert [r["index"] for r in read_samples(tmp_path)] == list(range(plan.num_samples))


def test_resume_refuses_a_different_request(tmp_path):
    check_or_write_request(tmp_path, {"num_samples": 8, "seed": 0})
    check_or_write_request(tmp_path, {"num_samples": 8, "seed": 0})  # same request: fine
    with pytest.raises(ValueError, match="seed: 0 -> 1"):
        check_or_write_request(tmp_path, {"num_samples": 8, "seed": 1})
    assert json.loads((tmp_path / "request.json").read_text()) == {"num_samples": 8, "seed": 0}
    check_or_write_request(tmp_path, {"num_samples": 8, "seed": 0, "path": "b"}, informational=["path"])


def test_compiled_and_eager_runs_do_not_resume_each_other_and_older_eager_runs_still_resume(tmp_path):
    from xtalgen.sampling.driver import request_record
    from xtalgen.schema import SampleConfig

    eager, compiled = request_record(SampleConfig(), {}, ""), request_record(SampleConfig(compile=True), {}, "")
    assert "compile" not in eager  # the request of a run made before `sample.compile` existed
    check_or_write_request(tmp_path, eager)
    with pytest.raises(ValueError, match="compile: None -> True"):
        check_or_write_request(tmp_path, compiled)
    check_or_write_request(tmp_path, eager)


def test_degenerate_lattices_are_recorded_not_fatal(tmp_path):
    """An untrained model can return NaN or collapsed cells: the run records them and goes on."""
    lattice = np.stack([np.full((3, 3), np.nan), np.zeros((3, 3)), 4.0 * np.eye(3)])  # (3, 3, 3)
    frac = np.linspace(0.0, 0.9, 18).reshape(6, 3)
    structures = batch_to_structures(lattice, frac, np.array([3, 8] * 3), np.array([2, 2, 2]))
    plan = SamplingPlan(3, 3)
    PartWriter(tmp_path, plan).write_batch(_rows(plan, 0, structures), structures)
    assert merge_parts(tmp_path, plan).complete
    assert [frame.id for frame in iter_extxyz_frames(tmp_path / "samples.extxyz")] == plan.batch_ids(0)
    good = ase_read(tmp_path / "samples.extxyz", index=2)
    np.testing.assert_allclose(good.get_scaled_positions(wrap=False), frac[4:], atol=1e-7)


def test_checkpoint_is_a_model_file_or_a_run_directory(tmp_path, capsys):
    model_file = tmp_path / "m.pt"
    model_file.write_bytes(b"")
    assert resolve_checkpoint(model_file) == model_file
    run = tmp_path / "run"
    (run / "checkpoints" / "step_10").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=f"xtalgen train consolidate {run} --out {run}/model.pt"):
        resolve_checkpoint(run)
    (run / "model.pt").write_bytes(b"")
    assert resolve_checkpoint(run) == run / "model.pt"
    assert resolve_checkpoint(run / "checkpoints" / "step_10") == run / "model.pt"
    assert capsys.readouterr().err == ""
    newer = run / "checkpoints" / "step_20"
    newer.mkdir()
    os.utime(newer, (time.time() + 10, time.time() + 10))
    assert resolve_checkpoint(run) == run / "model.pt"
    assert "older than checkpoint step_20" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope.pt")


def test_frame_ids_fast_path_and_ase_fallback(tmp_path):
    path = tmp_path / "f.extxyz"
    path.write_text(
        '1\nLattice="2 0 0 0 2 0 0 0 2" Properties=species:S:1:pos:R:3 id=sample-000007 pbc="T T T"\nH 0 0 0\n'
        '1\nProperties=species:S:1:pos:R:3 grid_id=3 id="two words" pbc="T T T"\nH 0 0 0\n'
        '1\nProperties=species:S:1:pos:R:3 pbc="T T T"\nH 0 0 0\n'  # no id: skipped
        '2\nid=cut-short\nH 0 0 0\n'  # a frame torn by a kill: iteration stops
    )
    frames = list(iter_extxyz_frames(path))
    assert [f.id for f in frames] == ["sample-000007", "two words"]
    raw = path.read_bytes()
    assert raw[frames[1].offset:frames[1].offset + frames[1].length].startswith(b"1\nProperties")


def test_merge_interrupted_between_its_two_renames_completes_on_rerun(tmp_path, perov_structures):
    plan = SamplingPlan(len(perov_structures), 2)
    single = _single_rank_reference(tmp_path / "single", plan, perov_structures)

    multi = tmp_path / "multi"
    writers = [PartWriter(multi, plan, rank=r, world_size=2) for r in range(2)]
    for batch in range(plan.num_batches):
        _write(writers[batch % 2], plan, batch, perov_structures)
    # The state a crash right after the extxyz rename leaves: merged frames, no merged lines yet.
    (multi / "samples.extxyz").write_bytes((single / "samples.extxyz").read_bytes())
    assert committed_batches(multi, plan) == set(range(plan.num_batches))  # the parts still hold all
    assert merge_parts(multi, plan).complete
    for name in ("samples.jsonl", "samples.extxyz"):
        assert (multi / name).read_bytes() == (single / name).read_bytes()
