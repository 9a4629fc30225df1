"""Argument parsing shared by every `xtalgen` command."""

from __future__ import annotations

import argparse


class IntermixedParser(argparse.ArgumentParser):
    """Accepts `key=value` overrides after options (`--out DIR train.max_steps=10`), as people type them.

    argparse does this only through parse_known_intermixed_args, which calls back into
    parse_known_args; the flag routes that inner call to the plain implementation. A parser with
    subcommands parses plainly (argparse cannot intermix those) and hands the rest to the subcommand.
    """

    _inner = False

    def parse_known_args(self, args=None, namespace=None):
        has_subcommands = any(isinstance(a, argparse._SubParsersAction) for a in self._actions)
        if self._inner or has_subcommands:
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False
