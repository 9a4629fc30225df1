"""`xtalgen` command line: parses arguments and calls into the packages; nothing else.

Each package owns its subcommands in a `cli` module exposing `register(subparsers)`; this file
only collects them. Modules are imported lazily per command so `xtalgen --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from xtalgen.argparse_util import IntermixedParser

# (command names, module that registers them). Order is the order of `xtalgen --help`.
COMMAND_MODULES: list[tuple[tuple[str, ...], str]] = [
    (("quickstart",), "xtalgen.quickstart"),
    (("data", "shard"), "xtalgen.datasets.cli"),
    (("model",), "xtalgen.models.cli"),
    (("train", "finetune"), "xtalgen.train.cli"),
    (("sample",), "xtalgen.sampling.cli"),
    (("evaluate",), "xtalgen.evaluation.cli"),
]

EPILOG = """examples:
  xtalgen quickstart                                  # whole pipeline on the embedded data
  xtalgen shard build perov_5/*.csv --out shards/perov --format lmdb --workers 2
  xtalgen train debug data.shards=shards/perov train.max_steps=300
  xtalgen sample runs/debug/checkpoints/latest --out samples
  xtalgen finetune runs/debug/model.pt dft_band_gap data.shards=shards/perov train.run_dir=runs/gap
  xtalgen evaluate samples --reference shards/perov --out eval
"""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xtalgen",
        description="Train diffusion models that generate inorganic crystals.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Every command accepts its key=value overrides anywhere after the command name.
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=IntermixedParser)
    for names, module_name in COMMAND_MODULES:
        if only is not None and only not in names:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # that package has no commands yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command and _known(command) else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from xtalgen.dirlock import OutputInUseError
    from xtalgen.diskspace import DiskFullError
    from xtalgen.schema import ConfigError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, OutputInUseError, DiskFullError) as exc:
        # Bad input, an output another run is writing, a full disk: one line, exit code 2, and the
        # command has left nothing half-written (each raiser cleans up before raising).
        print(f"xtalgen: error: {exc}", file=sys.stderr)
        return 2


def _known(command: str) -> bool:
    return any(command in names for names, _ in COMMAND_MODULES)


if __name__ == "__main__":
    sys.exit(main())
