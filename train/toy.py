"""A tiny crystal denoiser for exercising the training engine without a score network or shards.

`python -m xtalgen.train.toy --csv perov_5/val.csv --rows 64 train.zero_stage=2 ...` trains it
through the real Trainer (DeepSpeed, checkpoints, logging) under any launcher; it is the quickest
way to check a cluster's launcher/NCCL/ZeRO setup before a long run, and what the engine tests use.

The model follows the `loss(batch) -> dict` contract of `CrystalDiffusion`: it draws a time and
Gaussian noise from torch's global generator, corrupts fractional coordinates and the lattice,
and regresses the noise from per-atom features pooled per structure. It is not a generative model.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from xtalgen.batch import CrystalBatch
from xtalgen.record import MAX_ATOMIC_NUMBER, CrystalRecord


class ToyDenoiser(nn.Module):
    def __init__(self, hidden: int = 64):
        super().__init__()
        self.embed = nn.Embedding(MAX_ATOMIC_NUMBER + 1, hidden)
        self.atom_mlp = nn.Sequential(nn.Linear(hidden + 7, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.coord_head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, 3))
        self.lattice_head = nn.Sequential(nn.Linear(hidden + 10, hidden), nn.SiLU(), nn.Linear(hidden, 9))
        self.type_head = nn.Linear(2 * hidden, MAX_ATOMIC_NUMBER)

    def loss(self, batch: CrystalBatch) -> dict[str, torch.Tensor]:
        num_structures = batch.num_structures
        t = torch.rand(num_structures, device=batch.lattice.device) * 0.9 + 0.1  # (B,)
        t_atom = t[batch.batch_index]  # (N,)
        coord_noise = torch.randn_like(batch.frac_coords)  # (N, 3)
        noisy_frac = batch.frac_coords + 0.1 * t_atom[:, None] * coord_noise  # (N, 3)
        lattice_noise = torch.randn_like(batch.lattice)  # (B, 3, 3)
        noisy_lattice = batch.lattice + t[:, None, None] * lattice_noise

        angle = 2 * torch.pi * noisy_frac
        atom_in = torch.cat([self.embed(batch.atomic_numbers), angle.sin(), angle.cos(), t_atom[:, None]], -1)
        h = self.atom_mlp(atom_in)  # (N, H)
        pooled = torch.zeros(num_structures, h.shape[1], dtype=h.dtype, device=h.device)
        pooled = pooled.index_add(0, batch.batch_index, h) / batch.num_atoms[:, None].to(h.dtype)  # (B, H)
        context = torch.cat([h, pooled[batch.batch_index]], -1)  # (N, 2H)

        loss_coords = (self.coord_head(context) - coord_noise).square().mean()
        lattice_in = torch.cat([pooled, noisy_lattice.reshape(-1, 9) / 10.0, t[:, None]], -1)
        loss_lattice = (self.lattice_head(lattice_in) - lattice_noise.reshape(-1, 9)).square().mean()
        loss_types = nn.functional.cross_entropy(self.type_head(context).float(), batch.atomic_numbers - 1)
        total = loss_lattice + 0.1 * loss_coords + loss_types
        return {"loss": total, "loss_lattice": loss_lattice, "loss_coords": loss_coords,
                "loss_types": loss_types}


def read_csv_records(path: str, rows: int) -> list[CrystalRecord]:
    """The first `rows` structures of a CSV with `material_id` and `cif` columns."""
    import pandas as pd
    from pymatgen.core import Structure

    frame = pd.read_csv(path, nrows=rows)
    return [
        CrystalRecord.from_structure(Structure.from_str(cif, fmt="cif"), id=str(mid))
        for mid, cif in zip(frame["material_id"], frame["cif"])
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train the toy denoiser through the full engine (launcher/ZeRO smoke test).",
        epilog="example: torchrun --nproc_per_node 2 -m xtalgen.train.toy --csv val.csv "
               "train.zero_stage=3 train.max_steps=20 train.run_dir=runs/toy",
    )
    parser.add_argument("--csv", required=True, help="CSV with material_id and cif columns")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args(argv)

    from xtalgen.schema import load_config
    from xtalgen.train.distributed import init_distributed, shutdown_distributed_at_exit
    from xtalgen.train.memory_loader import InMemoryLoader
    from xtalgen.train.trainer import Trainer, run_and_report

    cfg = load_config([], args.overrides)
    dist_info = init_distributed()
    records = read_csv_records(args.csv, args.rows)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = ToyDenoiser(args.hidden)
    loader = InMemoryLoader(records, cfg.train.micro_batch_structures, dist_info.rank,
                            dist_info.world_size, seed=cfg.train.seed)
    trainer = Trainer(cfg, model, loader, dist_info=dist_info, stats={"toy": True})
    code = run_and_report(trainer)
    # A finished run: every rank has left its collectives, so the gloo group can go at exit (a
    # group left alive can abort the process at interpreter shutdown, exit -6 instead of 0).
    shutdown_distributed_at_exit()
    return code


if __name__ == "__main__":
    sys.exit(main())
