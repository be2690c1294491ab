"""``pdtb analyze RUN_DIR [--json]``: rebuild each KV transfer from the run's packet captures
and compare it with the daemons' timeline."""
from __future__ import annotations

import argparse
import json
import sys

from core.config import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="rebuild each KV transfer of a run from its packet captures "
                                       "(RUN_DIR/pcap/*.pcap, made with pdtb run --pcap efa)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="print the analysis as JSON instead of a table")
    p.add_argument("--bin-ms", type=float, default=10.0, metavar="MS",
                   help="throughput series bin, wall milliseconds (default 10)")
    p.add_argument("--kv-port", type=int, action="append", metavar="PORT",
                   help="KV port, for connections whose start was not captured (default 7470; repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nodes.kvproto import DEFAULT_KV_PORT
    from testbed.analyze import analyze_run, format_table

    if args.bin_ms <= 0:
        raise ConfigError("pdtb analyze", [("--bin-ms", f"expected a positive number, got {args.bin_ms:g}")])
    ports = args.kv_port or [DEFAULT_KV_PORT]
    bad = [p for p in ports if not 0 < p < 65536]
    if bad:
        raise ConfigError("pdtb analyze", [("--kv-port", f"not a TCP port: {bad[0]}")])
    result = analyze_run(args.run_dir, bin_s=args.bin_ms / 1e3, kv_ports=ports)
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(format_table(result))
    return 0
