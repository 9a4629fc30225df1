"""The MatterGen 1.0.3 half of xtalgen's side-by-side benchmarks.

Runs inside `.venv-mattergen` (made by `benchmarks/mattergen/setup.sh`), never inside xtalgen's own
environment: the two stacks pin different numpy/omegaconf versions. The xtalgen benchmarks
(`benchmarks/score_net.py`, `benchmarks/sampling_speed.py`) start it with `subprocess` and read the
one JSON line it prints.

The model is MatterGen's default unconditional model exactly as its released hydra configs define it
(`mattergen/conf/lightning_module/diffusion_module/{default,model/mattergen,corruption/default}.yaml`
and `sampling_conf/default.yaml` of the v1.0.3 tag). The wheel ships no config files, so the same
values are written below as hydra `_target_` dictionaries (interpolations resolved: latent_dim =
hidden_dim * (1 + 0 property embeddings), with_mask_type = True) and built with
`hydra.utils.instantiate`, the way MatterGen's own entry points build them. Weights are random:
only speed is measured.

Modes:
  train   forward + backward of MatterGen's own training loss (`DiffusionModule.calc_loss`: its
          corruption of the batch at random t, GemNet-dT, MaterialsLoss) on real structures.
  sample  MatterGen's default sampler (GuidedPredictorCorrector, 1000 steps, 1 Langevin corrector
          step, guidance 0 = unconditional) on batches of a given number of atoms: seconds per
          step (its predictor + corrector work on prior-sized graphs), times 1000 for a full run.

Example (from the repository root):
  .venv-mattergen/bin/python benchmarks/mattergen/run_mattergen.py train \\
      --csv ../shared/data/perov_5/val.csv --rows 0,1,2,3 --batch 2 --steps 1 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("PROJECT_ROOT", os.path.dirname(__file__))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from mattergen.common.data.collate import collate  # noqa: E402
from mattergen.common.data.dataset import CrystalDataset, structures_to_numpy  # noqa: E402
from mattergen.common.data.transform import set_chemical_system_string, symmetrize_lattice  # noqa: E402
from mattergen.common.utils.globals import MODELS_PROJECT_ROOT  # noqa: E402
from pymatgen.core import Structure  # noqa: E402

# mattergen/conf/data_module/mp_20.yaml: the lattice prior's density. Only sets where the noisy
# lattices start; it changes no shapes, so it does not change the cost measured here.
MP20_AVERAGE_DENSITY = 0.05771451654022283

HIDDEN_DIM = 512


def diffusion_module_config(average_density: float) -> dict:
    """The released default DiffusionModule config (model: mattergen, corruption: default)."""
    model = {
        "_target_": "mattergen.denoiser.GemNetTDenoiser",
        "hidden_dim": HIDDEN_DIM,
        "denoise_atom_types": True,
        "atom_type_diffusion": "mask",
        "property_embeddings_adapt": {},
        "property_embeddings": {},
        "gemnet": {
            "_target_": "mattergen.common.gemnet.gemnet.GemNetT",
            "num_targets": 1,
            "latent_dim": HIDDEN_DIM * (1 + 0),  # 1 for the time encoding, 0 property embeddings
            "atom_embedding": {
                "_target_": "mattergen.common.gemnet.layers.embedding_block.AtomEmbedding",
                "emb_size": HIDDEN_DIM,
                "with_mask_type": True,
            },
            "emb_size_atom": HIDDEN_DIM,
            "emb_size_edge": HIDDEN_DIM,
            "max_neighbors": 50,
            "max_cell_images_per_dim": 5,
            "cutoff": 7.0,
            "num_blocks": 4,
            "regress_stress": True,
            "otf_graph": True,
            "scale_file": f"{MODELS_PROJECT_ROOT}/common/gemnet/gemnet-dT.json",
        },
    }
    corruption = {
        "_target_": "mattergen.diffusion.corruption.multi_corruption.MultiCorruption",
        "sdes": {
            "pos": {
                "_target_": "mattergen.common.diffusion.corruption.NumAtomsVarianceAdjustedWrappedVESDE",
                "wrapping_boundary": 1.0,
                "sigma_max": 5.0,
                "limit_info_key": "num_atoms",
            },
            "cell": {
                "_target_": "mattergen.common.diffusion.corruption.LatticeVPSDE.from_vpsde_config",
                "vpsde_config": {
                    "beta_min": 0.1,
                    "beta_max": 20,
                    "limit_density": average_density,
                    "limit_var_scaling_constant": 0.25,
                },
            },
        },
        "discrete_corruptions": {
            "atomic_numbers": {
                "_target_": "mattergen.diffusion.corruption.d3pm_corruption.D3PMCorruption",
                "offset": 1,
                "d3pm": {
                    "_target_": "mattergen.diffusion.d3pm.d3pm.MaskDiffusion",
                    "dim": 101,
                    "schedule": {
                        "_target_": "mattergen.diffusion.d3pm.d3pm.create_discrete_diffusion_schedule",
                        "kind": "standard",
                        "num_steps": 1000,
                    },
                },
            }
        },
    }
    return {
        "_target_": "mattergen.diffusion.diffusion_module.DiffusionModule",
        "model": model,
        "corruption": corruption,
        "loss_fn": {
            "_target_": "mattergen.common.loss.MaterialsLoss",
            "reduce": "sum",
            "include_pos": True,
            "include_cell": True,
            "include_atomic_numbers": True,
            "d3pm_hybrid_lambda": 0.01,
            "weights": {"cell": 1.0, "pos": 0.1, "atomic_numbers": 1.0},
        },
        "pre_corruption_fn": {
            "_target_": "mattergen.property_embeddings.SetEmbeddingType",
            "p_unconditional": 0.2,
            "dropout_fields_iid": False,
        },
    }


def sampler_config(num_steps: int) -> dict:
    """sampling_conf/default.yaml: 1000 steps, eps_t = 1/N, one Langevin corrector step, guidance 0."""
    wrapped = "mattergen.diffusion.wrapped.wrapped_predictors_correctors"
    lattice = "mattergen.common.diffusion.predictors_correctors"
    return {
        "_target_": "mattergen.diffusion.sampling.classifier_free_guidance.GuidedPredictorCorrector",
        "_partial_": True,
        "N": num_steps,
        "eps_t": 1.0 / num_steps,
        "guidance_scale": 0.0,
        "remove_conditioning_fn": {"_target_": "mattergen.property_embeddings.SetUnconditionalEmbeddingType"},
        "keep_conditioning_fn": {"_target_": "mattergen.property_embeddings.SetConditionalEmbeddingType"},
        "predictor_partials": {
            "pos": {"_target_": f"{wrapped}.WrappedAncestralSamplingPredictor", "_partial_": True},
            "cell": {"_target_": f"{lattice}.LatticeAncestralSamplingPredictor", "_partial_": True},
            "atomic_numbers": {
                "_target_": "mattergen.diffusion.d3pm.d3pm_predictors_correctors.D3PMAncestralSamplingPredictor",
                "predict_x0": True,
                "_partial_": True,
            },
        },
        "corrector_partials": {
            "pos": {
                "_target_": f"{wrapped}.WrappedLangevinCorrector",
                "_partial_": True,
                "max_step_size": 1e6,
                "snr": 0.4,
            },
            "cell": {
                "_target_": f"{lattice}.LatticeLangevinDiffCorrector",
                "_partial_": True,
                "max_step_size": 1e6,
                "snr": 0.2,
            },
        },
        "n_steps_corrector": 1,
    }


def build_diffusion_module(average_density: float = MP20_AVERAGE_DENSITY) -> torch.nn.Module:
    return instantiate(diffusion_module_config(average_density))


def load_structures(csv_path: str, rows: list[int]) -> list[Structure]:
    """Rows of a CDVAE-layout CSV (`cif` column), in the order given, as MatterGen's data prep sees them."""
    frame = pd.read_csv(csv_path, index_col=0)
    structures = []
    for row in rows:
        record = frame.iloc[row]
        structure = Structure.from_str(record["cif"], fmt="cif")
        structure.properties["material_id"] = str(record["material_id"])
        structures.append(structure)
    return structures


def make_batches(structures: list[Structure], batch_size: int) -> list:
    """MatterGen's own pipeline: primitive + Niggli cell, CrystalDataset with the mp_20 transforms, collate."""
    arrays, _ = structures_to_numpy(structures)
    dataset = CrystalDataset(**arrays, transforms=[symmetrize_lattice, set_chemical_system_string])
    return [
        collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        for start in range(0, len(dataset), batch_size)
    ]


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def run_train(args: argparse.Namespace) -> dict:
    module = build_diffusion_module()
    module.train()
    batches = make_batches(load_structures(args.csv, args.rows), args.batch)
    if len(batches) < args.warmup + args.steps:
        raise SystemExit(f"need {args.warmup + args.steps} batches of {args.batch}, got {len(batches)}")
    seconds, cpu_seconds, structures, atoms, losses = 0.0, 0.0, 0, 0, []
    for step, batch in enumerate(batches[: args.warmup + args.steps]):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss, _ = module.calc_loss(batch)
        loss.backward()
        elapsed = time.perf_counter() - start
        cpu_elapsed = time.process_time() - cpu_start
        module.zero_grad(set_to_none=True)
        if step >= args.warmup:
            seconds += elapsed
            cpu_seconds += cpu_elapsed
            structures += int(batch["num_atoms"].numel())
            atoms += int(batch["num_atoms"].sum())
            losses.append(float(loss))
        print(f"[mattergen] step {step}: {elapsed:.2f} s wall, {cpu_elapsed:.2f} s cpu, loss {float(loss):.3f}",
              file=sys.stderr)
    return {
        "params": count_parameters(module.model),
        "structures_per_s": structures / seconds,
        "atoms_per_s": atoms / seconds,
        "seconds_per_step": seconds / args.steps,
        # CPU seconds of this process over all its threads: less sensitive to a busy shared machine
        "cpu_seconds_per_step": cpu_seconds / args.steps,
        "timed_steps": args.steps,
        "timed_atoms": atoms,
        "mean_loss": float(np.mean(losses)),
        "peak_rss_gb": peak_rss_gb(),
    }


def number_of_atoms_batch(num_atoms: list[int]):
    """What MatterGen's NumAtomsCrystalDataset yields for sampling: shapes only, NaN geometry."""
    from mattergen.common.data.chemgraph import ChemGraph

    graphs = []
    for n in num_atoms:
        count = torch.tensor(n)
        graphs.append(
            ChemGraph(
                pos=torch.full((n, 3), torch.nan),
                cell=torch.full((1, 3, 3), torch.nan),
                atomic_numbers=torch.full((n,), -1, dtype=torch.long),
                num_atoms=count,
                num_nodes=count,
            )
        )
    return collate(graphs)


@torch.no_grad()
def run_sample(args: argparse.Namespace) -> dict:
    """Seconds per step of MatterGen's default sampler, each step on a fresh prior draw.

    The loop body is `PredictorCorrector._denoise`'s (corrector: score + `step_given_score`;
    predictor: score + `update_given_score`, through MatterGen's own `apply`), run at `sample_steps`
    times spread over [eps_t, T]. Each step starts from the prior state instead of the previous
    step's output: with random weights the Langevin step size 2 (snr |z| / |score|)^2 explodes,
    the cell blows up and the graph empties (MatterGen then crashes in `repeat_blocks`). A trained
    model keeps the prior's atomic density, so its graphs have the size measured here. Every step
    costs the same, so the full run costs seconds-per-step x 1000.
    """
    from mattergen.diffusion.corruption.multi_corruption import apply
    from mattergen.diffusion.sampling.pc_sampler import _sample_prior

    module = build_diffusion_module()
    partial_sampler = instantiate(sampler_config(args.full_steps))
    sampler = partial_sampler(diffusion_module=module, device=torch.device("cpu"))
    module.eval()
    corruption = module.corruption
    torch.manual_seed(args.seed)
    batch = _sample_prior(corruption, number_of_atoms_batch(args.num_atoms), mask=None)
    batch_idx = corruption._get_batch_indices(batch)
    timesteps = torch.linspace(corruption.T, 1.0 / args.full_steps, args.sample_steps + 1)
    dt = -torch.tensor((corruption.T - 1.0 / args.full_steps) / (args.full_steps - 1))

    def one_step(t: torch.Tensor):
        score = sampler._score_fn(batch, t)
        fns = {k: corrector.step_given_score for k, corrector in sampler._correctors.items()}
        corrected = apply(fns=fns, broadcast={"t": t, "dt": dt}, x=batch, score=score, batch_idx=batch_idx)
        score = sampler._score_fn(batch, t)
        fns = {k: predictor.update_given_score for k, predictor in sampler._predictors.items()}
        predicted = apply(fns=fns, x=batch, score=score, broadcast=dict(t=t, batch=batch, dt=dt),
                          batch_idx=batch_idx)
        return corrected, predicted

    num_structures = len(args.num_atoms)
    one_step(torch.full((num_structures,), float(timesteps[0])))  # warm-up, untimed
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(args.sample_steps):
        corrected, predicted = one_step(torch.full((num_structures,), float(timesteps[i])))
        print(f"[mattergen] sampler step {i}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    if not torch.isfinite(predicted["pos"][0]).all():
        raise SystemExit("MatterGen predictor produced non-finite coordinates")
    per_step = seconds / args.sample_steps
    return {
        "params": count_parameters(module.model),
        "structures": num_structures,
        "num_atoms": args.num_atoms,
        "measured_steps": args.sample_steps,
        "full_steps": args.full_steps,
        "network_evals_per_step": 2,
        "seconds_per_step": per_step,
        "cpu_seconds_per_step": cpu_seconds / args.sample_steps,
        "seconds_per_structure_full": per_step * args.full_steps / num_structures,
        "peak_rss_gb": peak_rss_gb(),
    }


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["train", "sample", "params"])
    parser.add_argument("--csv", help="CDVAE-layout CSV with a cif column (train mode)")
    parser.add_argument("--rows", type=int_list, default=[], help="comma-separated row positions, in batch order")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--num-atoms", type=int_list, default=[], help="atoms per structure to sample")
    parser.add_argument("--sample-steps", type=int, default=4, help="steps actually run")
    parser.add_argument("--full-steps", type=int, default=1000, help="MatterGen's default step count")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.mode == "train":
        result = run_train(args)
    elif args.mode == "sample":
        result = run_sample(args)
    else:
        result = {"params": count_parameters(build_diffusion_module().model)}
    result.update(mode=args.mode, threads=args.threads, torch=torch.__version__)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
