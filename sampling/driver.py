"""Sample many structures into an output directory: batched, seeded, resumable, multi-rank.

The loop is deliberately plain: decide which batches this rank still owes (its round-robin share
minus what any part of the directory already committed), sample each with its own generator, write
it (CIFs, extxyz, then the JSONL commit), and on rank 0 merge every part once all batches are in.
No torch.distributed: ranks coordinate only through the files, so the same code runs under
torchrun, srun, a Slurm array or by hand with RANK/WORLD_SIZE.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from xtalgen.dirlock import DirectoryLock
from xtalgen.sampling.conditions import (
    ConditionRequest,
    Range,
    check_ranges_samplable,
    condition_tensors,
    draw_targets,
    parse_conditions,
    request_to_json,
)
from xtalgen.sampling.plan import CONDITION_STREAM, NUM_ATOMS_STREAM, TEMPLATE_STREAM, SamplingPlan
from xtalgen.sampling.templates import TemplateSet, read_templates
from xtalgen.sampling.writer import (
    MergeReport,
    PartWriter,
    batch_to_structures,
    check_or_write_request,
    committed_batches,
    merge_parts,
)
from xtalgen.schema import ModelConfig, SampleConfig

RUN_MODEL_FILE = "model.pt"  # the consolidated (EMA) model inside a training run directory
# A sampled cell is "physical" when its volume per atom lies within this factor of the lattice
# prior's, 1 / rho (Alex-MP-20: 17.3 Å^3/atom, so 5.8-52). Real crystals sit at ~10-30 Å^3/atom; a
# cell outside the band has collapsed or blown up. Such samples are still written (they are what the
# model made) but flagged `physical_cell: false` in samples.jsonl and counted in the summary.
PHYSICAL_BAND_FACTOR = 3.0


def physical_band(prior_density: float) -> tuple[float, float]:
    """(low, high) Å^3 per atom around the prior's volume per atom 1 / rho."""
    prior_volume = 1.0 / prior_density
    return prior_volume / PHYSICAL_BAND_FACTOR, prior_volume * PHYSICAL_BAND_FACTOR


@dataclass
class SamplingSummary:
    out_dir: Path
    rank: int
    world_size: int
    num_new: int  # structures made by this rank in this run
    num_already_done: int  # structures of this rank's share found committed at start
    seconds: float
    merge: MergeReport | None  # rank 0 only
    num_unphysical: int = 0  # of num_new: cells outside `band` (flagged in samples.jsonl)
    band: tuple[float, float] | None = None  # Å^3 per atom, see `physical_band`

    @property
    def structures_per_second(self) -> float:
        return self.num_new / self.seconds if self.seconds > 0 else 0.0


def resolve_checkpoint(path: str | Path) -> Path:
    """A single-file model, or a training run directory holding its consolidated `model.pt`.

    Sampling never loads the training stack: a run's ZeRO checkpoints are turned into one model
    file by `xtalgen train consolidate` (EMA weights), which this points to when it is missing.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.parent.name == "checkpoints":  # RUN/checkpoints/<tag>: that run's model file
        path = path.parent.parent
    model_file = path / RUN_MODEL_FILE
    consolidate = f"xtalgen train consolidate {path} --out {model_file}"
    if not model_file.is_file():
        raise FileNotFoundError(f"{path} has no {RUN_MODEL_FILE}; make it from the latest checkpoint: {consolidate}")
    checkpoints = [p for p in (path / "checkpoints").glob("*") if p.is_dir()]
    newest = max(checkpoints, key=lambda p: p.stat().st_mtime, default=None)
    if newest is not None and newest.stat().st_mtime > model_file.stat().st_mtime:
        print(f"warning: {model_file} is older than checkpoint {newest.name}; to sample the newer weights "
              f"run: {consolidate}", file=sys.stderr)
    return model_file


def default_device() -> torch.device:
    """cuda:LOCAL_RANK (torchrun) or cuda:SLURM_LOCALID (srun) if CUDA is available, else cpu."""
    if torch.cuda.is_available():
        from xtalgen.launcher import launch_env

        return torch.device("cuda", launch_env(os.environ).local_rank)
    return torch.device("cpu")


def request_record(cfg: SampleConfig, conditions: dict[str, ConditionRequest], checkpoint: str | Path) -> dict:
    """What determines the structures; a resumed run must ask for exactly the same.

    The model is identified by the sha256 of its file, not its path: a moved file resumes, a
    re-consolidated one (other weights, same path) is refused.
    """
    record = asdict(cfg)
    record.pop("out", None)
    if not record.get("compile"):  # eager, as every run before the option: those still resume
        record.pop("compile", None)
    if not record.get("space_group"):  # unconstrained, as every run before the option
        record.pop("space_group", None)
        record.pop("templates", None)
    record["checkpoint"] = str(checkpoint)
    record["model_sha256"] = file_sha256(checkpoint) if checkpoint and Path(checkpoint).is_file() else ""
    record["conditions"] = request_to_json(conditions)
    return record


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def batch_templates(templates: TemplateSet | None, plan: SamplingPlan, batch: int, cfg: SampleConfig) -> list | None:
    """The symmetry templates of one batch (one per structure, its own random stream), or None."""
    if templates is None:
        return None
    size = len(plan.batch_indices(batch))
    return templates.draw(size, plan.generator(batch, TEMPLATE_STREAM, "cpu"), cfg.num_atoms)


def sample_batch_structures(model, model_cfg: ModelConfig, stats: dict, cfg: SampleConfig,
                            plan: SamplingPlan, batch: int, conditions: dict[str, ConditionRequest],
                            device: torch.device, templates: list | None = None) -> tuple[list, dict[str, list]]:
    """Run the sampler for one batch of the plan: (pymatgen structures in plan order, the
    per-structure condition targets it was given, {name: [value per structure]}). `templates`
    (`batch_templates`) constrains each structure to one template's symmetry and size."""
    from xtalgen.models.sampler import sample, sample_num_atoms
    from xtalgen.models.symmetry import SymmetryConstraint

    size = len(plan.batch_indices(batch))
    symmetry = None
    if templates is not None:
        symmetry = SymmetryConstraint(templates, device, model.work_dtype)
        num_atoms = symmetry.num_atoms.cpu()
    elif cfg.num_atoms > 0:
        num_atoms = torch.full((size,), cfg.num_atoms, dtype=torch.long)
    else:
        num_atoms = sample_num_atoms(stats, size, plan.generator(batch, NUM_ATOMS_STREAM, "cpu"))
    targets = draw_targets(conditions, stats, size, plan.generator(batch, CONDITION_STREAM, "cpu"))
    cond = condition_tensors(targets, model_cfg.conditions, device) if targets else None
    with torch.no_grad():
        out = sample(
            model,
            num_atoms.to(device),
            num_steps=cfg.num_steps,
            corrector_steps=cfg.corrector_steps,
            coord_snr=cfg.coord_snr,
            lattice_snr=cfg.lattice_snr,
            time_power=cfg.time_power,
            eta=cfg.eta,
            predictor=cfg.predictor,
            guidance_scale=cfg.guidance_scale,
            conditions=cond,
            generator=plan.generator(batch, device=device),
            symmetry=symmetry,
        )
    structures = batch_to_structures(
        out.lattice.detach().double().cpu().numpy(),
        out.frac_coords.detach().double().cpu().numpy(),
        out.atomic_numbers.detach().cpu().numpy(),
        out.num_atoms.detach().cpu().numpy(),
    )
    return structures, targets


def batch_rows(plan: SamplingPlan, batch: int, cfg: SampleConfig,
               conditions: dict[str, ConditionRequest], structures: list,
               band: tuple[float, float] | None = None, targets: dict[str, list] | None = None,
               templates: list | None = None) -> list[dict]:
    """Per-structure metadata lines. No rank or time in them: parts merge to the same bytes.

    Each line has the cell's volume per atom and, given a band (`physical_band`), `physical_cell`.
    `conditions` is the request as asked (a range as ">=3", what the evaluator judges against);
    `targets` holds the point value this structure was given (a range's draw); `templates` the
    symmetry template each structure was made under (its source id and Wyckoff letters).
    """
    requested = {k: str(v) if isinstance(v, Range) else v for k, v in conditions.items()}
    rows = []
    for position, (index, structure) in enumerate(zip(plan.batch_indices(batch), structures)):
        volume_per_atom = structure.volume / len(structure)
        rows.append({
            "id": plan.sample_id(index),
            "index": index,
            "batch": batch,
            "seed": plan.seed,
            "batch_seed": plan.batch_seed(batch),
            "num_atoms": len(structure),
            "formula": structure.composition.reduced_formula,
            "conditions": requested,
            **({"targets": {k: v[position] for k, v in targets.items()}} if targets else {}),
            "guidance": cfg.guidance_scale,
            "steps": cfg.num_steps,
            "volume_per_atom": round(volume_per_atom, 4),
            **({"physical_cell": band[0] <= volume_per_atom <= band[1]} if band else {}),
            **({"template": {"space_group": templates[position].space_group, "source": templates[position].source,
                             "wyckoffs": templates[position].wyckoffs}} if templates else {}),
        })
    return rows


def sample_to_directory(
    model,
    model_cfg: ModelConfig,
    stats: dict,
    cfg: SampleConfig,
    out_dir: str | Path,
    *,
    checkpoint: str = "",
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
    progress: bool = True,
    merge_wait_s: float = 600.0,
    poll_s: float = 2.0,
    merge: bool = True,
) -> SamplingSummary:
    """Make this rank's share of `cfg.num_samples` structures in `out_dir` (resuming), then merge.

    Each rank holds its own lock in `out_dir` while it writes (`xtalgen.dirlock`): a second
    `xtalgen sample` of the same rank into the same folder would write the same part files, so it
    is refused at once (OutputInUseError naming the holder); the ranks of one run never block
    each other, and the merge reads only committed batches. `merge=False` leaves the merge to a
    later `merge_parts` (a separate job after a Slurm array), so rank 0 does not wait.
    """
    out_dir = Path(out_dir)
    templates = symmetry_templates(cfg, model_cfg)  # refused, like the conditions, before out_dir exists
    conditions = parse_conditions(cfg.conditions, model_cfg.conditions)
    check_ranges_samplable(conditions, stats)
    with DirectoryLock(out_dir, name=f".xtalgen-sample-rank{rank}.lock"):  # creates out_dir
        device = torch.device(device) if device is not None else default_device()
        plan = SamplingPlan(cfg.num_samples, cfg.batch_size, cfg.seed)
        request = request_record(cfg, conditions, checkpoint)
        if templates is not None:
            request["templates_sha256"] = templates.digest()  # the path may move; the templates may not change
        check_or_write_request(out_dir, request, informational=("checkpoint", "templates"))

        writer = PartWriter(out_dir, plan, rank, world_size)
        done = committed_batches(out_dir, plan)
        mine = plan.batches_for_rank(rank, world_size)
        todo = [b for b in mine if b not in done]
        already = sum(len(plan.batch_indices(b)) for b in mine if b in done)

        model = model.to(device).eval()
        if cfg.compile and todo:
            from xtalgen.models.score_net import compile_layers

            compile_layers(model.score_net)  # compiles at the first batch (progress bar: its first update)
        band = physical_band(stats["mean_density"]) if stats.get("mean_density") else None
        start = time.perf_counter()
        made = unphysical = 0
        bar = tqdm(total=sum(len(plan.batch_indices(b)) for b in todo), unit="structure",
                   desc=f"sampling (rank {rank}/{world_size})", disable=not progress, dynamic_ncols=True)
        with bar:
            for batch in todo:
                picks = batch_templates(templates, plan, batch, cfg)
                structures, targets = sample_batch_structures(model, model_cfg, stats, cfg, plan, batch,
                                                              conditions, device, picks)
                rows = batch_rows(plan, batch, cfg, conditions, structures, band, targets, picks)
                writer.write_batch(rows, structures)
                made += len(structures)
                unphysical += sum(not row.get("physical_cell", True) for row in rows)
                bar.update(len(structures))
                bar.set_postfix(unphysical=unphysical, refresh=False)
        seconds = time.perf_counter() - start
        if unphysical:
            print(f"warning: {unphysical} of {made} sampled cells have a volume per atom outside "
                  f"{band[0]:.1f}-{band[1]:.1f} Å³ (the prior's {1 / stats['mean_density']:.1f} Å³/atom "
                  f"x/÷ {PHYSICAL_BAND_FACTOR:g}); they are flagged physical_cell=false in samples.jsonl",
                  file=sys.stderr)

        report = None
        if rank == 0 and merge:
            wait_for_all_batches(out_dir, plan, merge_wait_s, poll_s)
            report = merge_parts(out_dir, plan)
        return SamplingSummary(out_dir, rank, world_size, made, already, seconds, report, unphysical, band)


def effective_conditions(cfg: SampleConfig, model_cfg: ModelConfig) -> dict[str, str]:
    """The request's conditions, plus space_group = N where `--space-group N` meets a model
    fine-tuned on space_group and the request does not name the condition itself."""
    if cfg.space_group and "space_group" not in cfg.conditions \
            and any(c.name == "space_group" for c in model_cfg.conditions):
        return {**cfg.conditions, "space_group": str(cfg.space_group)}
    return dict(cfg.conditions)


def symmetry_templates(cfg: SampleConfig, model_cfg: ModelConfig) -> TemplateSet | None:
    """The templates of `cfg.space_group` (None when unconstrained); a model conditioned on
    `space_group` is also given that group as its condition, unless the request names another."""
    from xtalgen.schema import ConfigError

    if not cfg.space_group:
        if cfg.templates:
            raise ConfigError("sample.templates is set but sample.space_group is not: give --space-group N")
        return None
    if not cfg.templates:
        raise ConfigError(f"space group {cfg.space_group} needs structures to take its templates from: "
                          "give --templates PATH (the training shards, CSV or CIFs)")
    asked = cfg.conditions.get("space_group")
    if asked is not None and str(asked).strip() != str(cfg.space_group):
        raise ConfigError(f"--space-group {cfg.space_group} contradicts --condition space_group={asked}")
    cfg.conditions = effective_conditions(cfg, model_cfg)
    templates = read_templates(cfg.templates, cfg.space_group)
    templates.check_size(cfg.num_atoms)
    print(f"space group {cfg.space_group}: {len(templates.templates)} templates of {templates.read} structures "
          f"in {cfg.templates}" + (f" ({dict(templates.skipped)} skipped)" if templates.skipped else ""),
          file=sys.stderr)
    return templates


def wait_for_all_batches(out_dir: Path, plan: SamplingPlan, timeout_s: float, poll_s: float) -> bool:
    """Poll the parts until every batch is committed (other ranks finishing) or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    announced = False
    while (done := len(committed_batches(out_dir, plan))) < plan.num_batches:
        if time.monotonic() >= deadline:
            return False
        if not announced:
            print(f"rank 0: {done}/{plan.num_batches} batches committed; waiting up to {timeout_s:.0f} s "
                  "for the other ranks before merging", file=sys.stderr)
            announced = True
        time.sleep(poll_s)
    return True
