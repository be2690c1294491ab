"""``pdtb validate FILE...``: check config files of any kind."""
from __future__ import annotations

import argparse
import sys

from testbed.config.kinds import load_any
from core.config import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="validate config files (hardware, model, topology, scenario) by their 'kind'")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for path in args.files:
        try:
            kind, _ = load_any(path)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"ok: {path} ({kind})")
    return 0
