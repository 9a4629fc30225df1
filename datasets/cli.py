"""`xtalgen data ...` and `xtalgen shard ...`: parse arguments, call the library, print a summary."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from xtalgen.argparse_util import IntermixedParser

RAW = argparse.RawDescriptionHelpFormatter

DATA_EPILOG = """examples:
  xtalgen data list
  xtalgen data download mp_20 --out data/mp_20
  xtalgen data download alex_mp_20 --out data/alex_mp_20 --url https://mirror.example/alex_mp_20.zip \\
      --sha256 <expected sha256>
"""

SHARD_EPILOG = """examples:
  xtalgen shard build data/mp_20/*.csv --out shards/mp_20 --format lmdb --workers 8
  xtalgen shard build builtin:aflow --out shards/aflow validation.max_atoms=40
  xtalgen shard verify shards/mp_20
  xtalgen shard stats shards/mp_20
  xtalgen shard subset shards/alex_mp_20 --property dft_mag_density --max 5000
"""

BUILD_EPILOG = """examples:
  xtalgen shard build perov_5/train.csv perov_5/val.csv --out shards/perov --format lmdb --workers 2
  xtalgen shard build data/alex_mp_20 --out shards/alex --format webdataset --config my.yaml \\
      shard.records_per_shard=50000 validation.min_distance=0.4

Overrides (key=value) apply to the `data` section of the config (`data.` may be omitted).
Outputs: OUT/manifest.json, OUT/lmdb/ or OUT/wds/, OUT/index/, OUT/rejects.csv.
A killed build resumes when the same command is run again.

As an array job (one machine per part, OUT on a shared file system), then one assembly:
  xtalgen shard build data/alex_mp_20 --out shards/alex --part 0/8     # ... --part 7/8
  xtalgen shard build data/alex_mp_20 --out shards/alex --assemble     # same bytes as one process
"""




def register(subparsers) -> None:
    _register_data(subparsers)
    _register_shard(subparsers)


def _register_data(subparsers) -> None:
    data = subparsers.add_parser("data", help="download public crystal datasets",
                                 description="Download public crystal datasets.", epilog=DATA_EPILOG,
                                 formatter_class=RAW)
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    download = sub.add_parser("download", help="download, verify and unpack a dataset",
                              description="Download (resumable), check sha256 and unpack a public dataset.",
                              epilog=DATA_EPILOG, formatter_class=RAW)
    download.add_argument("name", help="mp_20, alex_mp_20, perov_5, carbon_24 (see `xtalgen data list`)")
    download.add_argument("--out", required=True, type=Path, help="folder to put the CSV files in")
    download.add_argument("--url", help="download from this URL instead of the default source")
    download.add_argument("--sha256", help="expected sha256 of the downloaded file")
    download.add_argument("--quiet", action="store_true", help="no progress bar")
    download.set_defaults(func=_download)
    listing = sub.add_parser("list", help="the datasets `download` knows, with their sources",
                             description="List the public datasets and where they are downloaded from.",
                             epilog="example:\n  xtalgen data list", formatter_class=RAW)
    listing.set_defaults(func=_list)
    data.set_defaults(func=lambda args: _help(data))


def _register_shard(subparsers) -> None:
    shard = subparsers.add_parser("shard", help="build, verify, inspect and subset shard sets",
                                  description="Build, verify, inspect and subset shard sets.",
                                  epilog=SHARD_EPILOG, formatter_class=RAW)
    sub = shard.add_subparsers(dest="shard_command", metavar="SUBCOMMAND", parser_class=IntermixedParser)

    build = sub.add_parser("build", help="validate inputs and write LMDB or WebDataset shards",
                           description="Read, validate and shard crystal structures (parallel, "
                                       "deterministic, resumable).", epilog=BUILD_EPILOG, formatter_class=RAW)
    build.add_argument("inputs", nargs="+", metavar="INPUT",
                       help="CSV files with a cif column, folders/zips of CIFs, .extxyz, ASE .db, builtin:aflow; "
                            "and key=value config overrides")
    build.add_argument("--out", required=True, type=Path, help="shard directory to write")
    build.add_argument("--format", choices=("lmdb", "webdataset"), help="shard format (default: config)")
    build.add_argument("--workers", type=int, help="parallel worker processes (default: config)")
    build.add_argument("--config", action="append", default=[], metavar="YAML",
                       help="config file or preset to merge (repeatable)")
    build.add_argument("--restart", action="store_true", help="discard an unfinished build in OUT and start over")
    build.add_argument("--part", metavar="I/N", type=_part,
                       help="build only part I of N (0-based) of the chunks, without the manifest: one task of an "
                            "array job sharing OUT (slurm/shard_array.sbatch); then run with --assemble")
    build.add_argument("--assemble", action="store_true",
                       help="write the shards and manifest from the chunks the --part tasks built; names the "
                            "missing chunks and their parts if any is not built")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.set_defaults(func=_build)

    verify = sub.add_parser("verify", help="recheck checksums, counts and every record",
                            description="Recheck a shard set against its manifest: sha256 and size of every "
                                        "file, every record's crc32 and decoding, record counts. Exits 1 and "
                                        "names each broken shard.",
                            epilog="example:\n  xtalgen shard verify shards/mp_20", formatter_class=RAW)
    verify.add_argument("dir", type=Path)
    verify.add_argument("--quiet", action="store_true", help="no progress bar")
    verify.set_defaults(func=_verify)

    stats = sub.add_parser("stats", help="counts, atoms histogram, density, elements, property coverage",
                           description="Print the statistics of a shard set as tables.",
                           epilog="examples:\n  xtalgen shard stats shards/mp_20\n"
                                  "  xtalgen shard stats shards/mp_20 --json > stats.json", formatter_class=RAW)
    stats.add_argument("dir", type=Path)
    stats.add_argument("--recompute", action="store_true", help="rescan every record instead of the manifest")
    stats.add_argument("--json", action="store_true", help="print JSON instead of tables")
    stats.set_defaults(func=_stats)

    subset = sub.add_parser("subset", help="index of the records that carry a property (no data copied)",
                            description="Write DIR/subsets/<property>[-N].json: the indices of records carrying "
                                        "a property, capped at N in a seeded hash order (nested: the 5k subset "
                                        "is inside the 50k one). Loaders take it as `subset=<name>`.",
                            epilog="examples:\n  xtalgen shard subset shards/alex --property dft_mag_density\n"
                                   "  xtalgen shard subset shards/alex --property dft_bulk_modulus --max 5000\n"
                                   "  xtalgen shard subset shards/alex --property dft_mag_density --property hhi_score",
                            formatter_class=RAW)
    subset.add_argument("dir", type=Path)
    subset.add_argument("--property", required=True, action="append", dest="property_names",
                        help="property the records must carry; repeat (or join with +) for several: all of them")
    subset.add_argument("--max", type=int, dest="max_n", help="keep at most N records per split")
    subset.add_argument("--split", action="append", help="split(s) to index (default: train)")
    subset.add_argument("--all-splits", action="store_true", help="index every split")
    subset.add_argument("--seed", type=int, default=0, help="seed of the hash order used with --max")
    subset.set_defaults(func=_subset)
    shard.set_defaults(func=lambda args: _help(shard))


# --- handlers ----------------------------------------------------------------------------------------
def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0


def _fail(message: str) -> int:
    print(f"xtalgen: error: {message}", file=sys.stderr)
    return 2


def split_inputs_and_overrides(tokens: list[str]) -> tuple[list[str], list[str]]:
    """INPUT tokens vs `key=value` overrides (a token with '=' that is not an existing path)."""
    inputs, overrides = [], []
    for token in tokens:
        is_override = "=" in token and not Path(token).exists() and not token.startswith("builtin:")
        (overrides if is_override else inputs).append(token)
    return inputs, [o if o.startswith("data.") else f"data.{o}" for o in overrides]


def _build(args) -> int:
    from xtalgen.datasets.build import build_shards
    from xtalgen.schema import load_config

    inputs, overrides = split_inputs_and_overrides(args.inputs)
    if not inputs:
        return _fail("no INPUT given (only key=value overrides)")
    cfg = load_config(args.config, overrides).data
    summary = build_shards(inputs, args.out, cfg, fmt=args.format, workers=args.workers,
                           progress=not args.quiet, restart=args.restart, part=args.part,
                           assemble_only=args.assemble)
    if args.part:
        print(summary.describe())
        if not summary.assembled:
            print(f"next: once every part is done, the same command with --assemble instead of "
                  f"--part {args.part[0]}/{args.part[1]}")
        return 0
    print(f"read {summary.read} = accepted {summary.accepted} + rejected {summary.rejected}")
    for split, count in summary.by_split.items():
        print(f"  {split:<10}{count:>10}")
    for reason, count in summary.by_reason.items():
        print(f"  rejected {reason:<22}{count:>8}")
    print(f"shards:   {summary.out_dir}\nmanifest: {summary.manifest_path}\nrejects:  {summary.rejects_path}")
    return 0


def _part(text: str) -> tuple[int, int]:
    """`I/N` -> (I, N); argparse turns the ValueError into its usage error (exit code 2)."""
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit()) or int(count) < 1:
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, got {text!r}")
    return int(index), int(count)


def _verify(args) -> int:
    from xtalgen.sharding import verify_shards

    try:
        report = verify_shards(args.dir, progress=not args.quiet)
    except (FileNotFoundError, ValueError) as exc:
        print(f"xtalgen: error: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0 if report.ok else 1


def _stats(args) -> int:
    from xtalgen.sharding import format_stats, shard_stats

    try:
        stats = shard_stats(args.dir, recompute=args.recompute, progress=args.recompute)
    except (FileNotFoundError, ValueError) as exc:
        return _fail(str(exc))
    print(json.dumps(stats, indent=1, sort_keys=True) if args.json else format_stats(stats))
    return 0


def _subset(args) -> int:
    from xtalgen.sharding import load_subset, make_subset
    from xtalgen.sharding.subset import property_list

    split = None if args.all_splits else (args.split or "train")
    try:
        names = property_list("+".join(args.property_names))
        path = make_subset(args.dir, names, max_n=args.max_n, split=split, seed=args.seed, progress=True)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        return _fail(str(exc).strip("'\""))
    for name, info in load_subset(args.dir, path)["splits"].items():
        print(f"  {name:<10}{info['count']:>10} of {info['available']} carrying {' and '.join(names)}")
    print(f"subset: {path.stem}  ({path})")
    return 0


def _list(args) -> int:
    from xtalgen.datasets.download import DATASETS

    for name, source in DATASETS.items():
        print(f"{name:<18}{source.description}")
        for remote in source.files:
            print(f"{'':<20}{remote.name:<18}{remote.url}")
    return 0


def _download(args) -> int:
    from xtalgen.datasets.download import DATASETS, download_dataset

    try:
        folder = download_dataset(args.name, args.out, url=args.url, sha256=args.sha256, progress=not args.quiet)
    except (KeyError, ValueError, OSError) as exc:
        return _fail(str(exc).strip("'\""))
    print(f"downloaded {args.name} to {folder}")
    print("next: " + DATASETS[args.name].next_step.format(folder=folder, name=args.name))
    return 0
