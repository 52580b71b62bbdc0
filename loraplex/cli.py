"""The `loraplex` console script. Each area registers its own subcommands; heavy imports happen inside the
handlers, so `loraplex --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

# module path -> it defines register(subparsers). Each handler is set with parser.set_defaults(func=...).
COMMAND_MODULES = [
    "serving.cli",          # prepare, chat, serve
    "training.cli",         # train, eval, merge
    "benchmarks.cli",       # bench
    "serving.rag.cli",      # ingest
    "serving.governance.cli",  # keys, usage, audit
]


class CLIError(Exception):
    """A user mistake on the command line: printed as `loraplex: error: ...`, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # that area is not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"loraplex: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run as `python -m loraplex.cli`: use the importable module so CLIError is the same class everywhere.
    from loraplex.cli import main as _main

    sys.exit(_main())
