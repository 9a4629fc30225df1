"""Argument parsing shared by every `xtalgen` command."""

from __future__ import annotations

import argparse
import sys


class IntermixedParser(argparse.ArgumentParser):
    """Accepts `key=value` overrides after options (`--out DIR train.max_steps=10`), as people type them.

    argparse does this only through parse_known_intermixed_args, which calls back into
    parse_known_args; the flag routes that inner call to the plain implementation. A parser with
    subcommands parses plainly (argparse cannot intermix those) and hands the rest to the subcommand.

    `default_subcommand`: arguments whose first word names none of this parser's subcommands go to
    that one, as if it had been typed first (`xtalgen train CONFIG ...` runs `train`'s `run`, while
    `xtalgen train consolidate ...` is its own subcommand). Help with no subcommand is the default's.
    """

    _inner = False
    default_subcommand: str | None = None

    def parse_known_args(self, args=None, namespace=None):
        subcommands = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
        if subcommands and self.default_subcommand is not None:
            args = list(sys.argv[1:] if args is None else args)
            first = next((a for a in args if not a.startswith("-")), None)
            if first not in subcommands[0].choices:
                args = [self.default_subcommand, *args]
        if self._inner or subcommands:
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False
