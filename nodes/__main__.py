"""``python -m nodes --config FILE``: run the daemon for the role named in the file.

Each role module exposes ``async def serve(config: NodeConfig) -> None``. SIGTERM and
SIGINT cancel it so it can flush its timeline and exit cleanly.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import signal
import sys

from nodes.config import NodeConfig

ROLE_MODULES = {
    "router": "nodes.router",
    "prefill": "nodes.prefill",
    "decode": "nodes.decode",
    "colocated": "nodes.colocated",
    "client": "nodes.client",
}


async def _run(config: NodeConfig) -> None:
    serve = importlib.import_module(ROLE_MODULES[config.role]).serve
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await serve(config)
    except asyncio.CancelledError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodes")
    parser.add_argument("--config", required=True, help="per-node JSON file written by the testbed")
    args = parser.parse_args(argv)
    config = NodeConfig.load(args.config)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {config.name} %(levelname)s %(name)s: %(message)s")
    asyncio.run(_run(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
