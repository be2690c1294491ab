"""The ``pdtb`` command line. Each subcommand lives in its own module with a ``register``."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from typing import Sequence

from testbed import __version__
from core.config import ConfigError


def command_modules() -> list[str]:
    """Every module of this package is a subcommand group: it defines ``register(subparsers)``
    and sets its handler with ``set_defaults(func=...)``; the handler returns the exit code."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdtb", description="Disaggregated LLM inference testbed")
    parser.add_argument("--version", action="version", version=f"pdtb {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in command_modules():
        importlib.import_module(f"testbed.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
