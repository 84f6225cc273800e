"""The `skcdf` command line: one sub-command per job.

Each area of the package owns one module here with a ``register(subparsers)`` function that adds
its sub-commands; every sub-command sets ``func`` to a callable taking the parsed arguments and
returning an exit status. Bad input (:class:`skcdf.utils.InputError`) is reported here, once, as
``error: <message>`` with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

# Modules (under skcdf.cli) that contribute sub-commands, in the order they appear in --help.
_COMMAND_MODULES = ("data", "network", "train", "predict", "watch", "evaluate", "compare", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skcdf",
        description="SKCDF: semi-supervised, class-imbalanced 3D multi-organ segmentation.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f"skcdf.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"skcdf.cli.{name}":
                continue  # area not present in this build
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from skcdf.utils import InputError

    args = build_parser().parse_args(argv)
    # One line per warning, without the source line that Python's default format adds.
    warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `skcdf stats DIR | head`: the reader left, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
