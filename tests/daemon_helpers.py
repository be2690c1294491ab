"""Helpers for tests (and benchmarks) that run compute daemons in-process on loopback:
ports, a running node with an HTTP session, its timeline events and its KV size on the wire."""
from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from typing import AsyncIterator

import aiohttp

from nodes.auth import internal_headers
from nodes.config import NodeConfig
from nodes.engine import ComputeNode
from nodes.profiles import load_model
from nodes.timeline import read_timeline


INTERNAL_SECRET = "cd" * 32  # the internal API secret of in-process test nodes


def free_port() -> int:
    """A free port below the ephemeral range, so no outgoing connection of ours takes it meanwhile."""
    while True:
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


@contextlib.asynccontextmanager
async def running(node_cls: type[ComputeNode], cfg: NodeConfig
                  ) -> AsyncIterator[tuple[ComputeNode, aiohttp.ClientSession]]:
    """``node_cls(cfg)`` serving until the block ends, once its ``/health`` answers."""
    node = node_cls(cfg)
    task = asyncio.create_task(node.serve())
    headers = internal_headers(cfg.internal_secret_hex) if cfg.internal_secret_hex else None
    async with aiohttp.ClientSession(headers=headers) as session:
        for _ in range(200):
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{cfg.http.url}/health") as r:
                    if r.status == 200:
                        break
            assert not task.done(), task.exception()
            await asyncio.sleep(0.02)
        try:
            yield node, session
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def events(cfg: NodeConfig, name: str | None = None, rid: str | None = None) -> list[dict]:
    """The node's timeline events, optionally only those named ``name`` / of request ``rid``."""
    return [e for e in read_timeline(cfg.timeline_path)
            if (name is None or e["event"] == name) and (rid is None or e["request_id"] == rid)]


def wire_bytes(cfg: NodeConfig, tokens: int) -> int:
    """Bytes on the wire of a ``tokens``-token KV cache, computed here independently of the daemons."""
    return max(1, round(load_model(cfg.model).kv_bytes_per_token * tokens * cfg.byte_scale))
