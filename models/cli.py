"""`xtalgen model ...`: inspect score-network presets."""

from __future__ import annotations

import argparse
import sys

INFO_EXAMPLE = """examples:
  xtalgen model info                 # every preset: hidden, layers, radial basis, parameters
  xtalgen model info --preset base
"""


def register(subparsers) -> None:
    model = subparsers.add_parser("model", help="inspect score-network presets")
    model_sub = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND")
    info = model_sub.add_parser(
        "info",
        help="print the architecture and real parameter count of each preset",
        epilog=INFO_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    info.add_argument("--preset", default=None, help="only this preset (default: all)")
    info.set_defaults(func=run_info)
    model.set_defaults(func=lambda args: model.print_help() or 0)


def run_info(args: argparse.Namespace) -> int:
    from xtalgen.models.score_net import PRESETS, format_count, preset_parameter_count

    names = [args.preset] if args.preset else list(PRESETS)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        print(f"xtalgen: error: unknown preset {unknown[0]!r}; choose from {sorted(PRESETS)}", file=sys.stderr)
        return 2
    print(f"{'preset':<8} {'hidden':>7} {'layers':>7} {'rbf':>5} {'parameters':>15}")
    for name in names:
        arch = PRESETS[name]
        # Built on the meta device: real module, real count, no memory (xl has over 1B parameters).
        count = preset_parameter_count(name)
        print(
            f"{name:<8} {arch['hidden']:>7} {arch['num_layers']:>7} {arch['num_rbf']:>5} "
            f"{count:>11,} ({format_count(count)})"
        )
    return 0
