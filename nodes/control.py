"""MQTT control plane (aiomqtt): node status with a last will, commands, a status watcher.

Topics under ``{topic_prefix}`` (``pdtb/{run_id}``):

- ``nodes/{node}/status`` — retained JSON published by the node every ``heartbeat_s`` and on
  every state change; the node's last will (retained) is ``{"node", "role", "state": "offline"}``
  so a crashed node reads as offline to the router without any timeout guessing.
- ``nodes/{node}/cmd`` — ``{"cmd": "drain"|"resume"|"slowdown"|"crash", "factor": float}``;
  the broker's ACL lets only the ``controller`` user publish here.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import math
import secrets
import time
from typing import Any, Awaitable, Callable, Self

import aiomqtt

from nodes.config import MqttSettings

COMMANDS = ("drain", "resume", "slowdown", "crash")
QOS = 1
_CONNECT_ATTEMPTS_S = 10.0  # wall seconds a first connection retries a broker not yet listening

log = logging.getLogger(__name__)


class ControlError(Exception):
    """The control plane refused us (bad credentials) or could not be reached."""


def status_topic(settings: MqttSettings, node: str) -> str:
    return f"{settings.topic_prefix}/nodes/{node}/status"


def cmd_topic(settings: MqttSettings, node: str) -> str:
    return f"{settings.topic_prefix}/nodes/{node}/cmd"


def parse_command(payload: bytes) -> dict[str, Any]:
    """A validated command dict, or ValueError saying what is wrong with it."""
    try:
        msg = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"command is not JSON: {e}") from None
    if not isinstance(msg, dict) or msg.get("cmd") not in COMMANDS:
        raise ValueError(f"command must be an object with cmd in {COMMANDS}, got {msg!r}")
    factor = msg.get("factor")
    if msg["cmd"] == "slowdown":
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) \
                or not math.isfinite(factor) or factor <= 0:
            raise ValueError(f"slowdown needs a finite factor > 0, got {factor!r}")
        factor = float(factor)
    return {"cmd": msg["cmd"], "factor": factor}


def _client(settings: MqttSettings, identifier: str, will: aiomqtt.Will | None = None) -> aiomqtt.Client:
    return aiomqtt.Client(settings.host, settings.port, username=settings.username,
                          password=settings.password, identifier=identifier, will=will,
                          protocol=aiomqtt.ProtocolVersion.V5, keepalive=max(2, math.ceil(settings.heartbeat_s * 4)),
                          timeout=10.0)


async def _connect(make: Callable[[], aiomqtt.Client], user: str) -> aiomqtt.Client:
    """Enter a fresh client, retrying a broker that is not listening yet; auth errors are final."""
    deadline = time.monotonic() + _CONNECT_ATTEMPTS_S
    while True:
        client = make()
        try:
            await client.__aenter__()
            return client
        except aiomqtt.MqttCodeError as e:
            if getattr(e, "rc", None) is not None and _is_refusal(e.rc):
                raise ControlError(f"MQTT broker refused user {user!r}: {e}") from None
            if time.monotonic() > deadline:
                raise ControlError(f"MQTT broker unreachable: {e}") from None
        except aiomqtt.MqttError as e:
            if time.monotonic() > deadline:
                raise ControlError(f"MQTT broker unreachable: {e}") from None
        await asyncio.sleep(0.2)


def _is_refusal(rc: Any) -> bool:
    """Whether a CONNACK code means the broker refused our credentials (not a network error)."""
    value = getattr(rc, "value", rc)
    return isinstance(value, int) and value in (4, 5, 0x86, 0x87, 0x8C)


class _Subscriber:
    """An MQTT client subscribed to one topic, reconnected in the background if the broker goes
    away; the roles differ only in what they do with a live connection (``_serve``)."""

    def __init__(self, settings: MqttSettings, topic: str, task_name: str, what: str):
        self.settings = settings
        self._topic = topic
        self._task_name = task_name
        self._what = what  # in log lines
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None

    def _make(self) -> aiomqtt.Client:
        raise NotImplementedError

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Use a connected client until its connection fails."""
        raise NotImplementedError

    async def _connected(self, client: aiomqtt.Client) -> None:
        """Before ``async with`` returns: the first connection is up and subscribed."""

    async def _leaving(self, client: aiomqtt.Client) -> None:
        """On a clean exit, before the connection closes."""

    async def _subscribe(self) -> aiomqtt.Client:
        client = await _connect(self._make, self.settings.username)
        await client.subscribe(self._topic, qos=QOS)
        return client

    async def __aenter__(self) -> Self:
        self._client = await self._subscribe()
        await self._connected(self._client)
        self._task = asyncio.create_task(self._run(), name=self._task_name)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        client, self._client = self._client, None
        if client is not None:
            await self._leaving(client)
            with contextlib.suppress(aiomqtt.MqttError, OSError):
                await client.__aexit__(None, None, None)

    async def _run(self) -> None:
        while True:
            client = self._client
            try:
                if client is None:
                    client = self._client = await self._subscribe()
                await self._serve(client)
            except* (aiomqtt.MqttError, ControlError, OSError) as eg:
                log.warning("%s connection lost (%s); reconnecting", self._what, eg.exceptions[0])
                with contextlib.suppress(Exception):
                    await client.__aexit__(None, None, None)
                self._client = None
                await asyncio.sleep(0.5)


class NodeControl(_Subscriber):
    """A daemon's link to the control plane: retained status heartbeats, last will, commands.

    ``status_fn()`` returns the node's load dict (``state``, ``queue_depth``, ``batch_size``,
    ``kv_used_bytes``, ``kv_free_bytes``, ``slowdown``); ``node``, ``role`` and ``t_wall`` are
    added here. ``on_command(cmd)`` receives validated ``{"cmd", "factor"}`` dicts.
    The connection is re-established in the background if the broker goes away.
    """

    def __init__(self, settings: MqttSettings, node: str, role: str,
                 status_fn: Callable[[], dict[str, Any]],
                 on_command: Callable[[dict[str, Any]], Awaitable[None] | None]):
        super().__init__(settings, cmd_topic(settings, node), f"control-{node}", "control plane")
        self.node = node
        self.role = role
        self.status_fn = status_fn
        self.on_command = on_command
        self._wake = asyncio.Event()
        self._offline = json.dumps({"node": node, "role": role, "state": "offline"}).encode()

    def _make(self) -> aiomqtt.Client:
        will = aiomqtt.Will(status_topic(self.settings, self.node), self._offline, qos=QOS, retain=True)
        return _client(self.settings, f"pdtb-{self.node}", will)

    def status(self) -> dict[str, Any]:
        return {**self.status_fn(), "node": self.node, "role": self.role, "t_wall": time.time()}

    def publish_now(self) -> None:
        """Publish the status at once (after a state change) instead of at the next heartbeat."""
        self._wake.set()

    async def _connected(self, client: aiomqtt.Client) -> None:
        await self._publish_status(client)

    async def _leaving(self, client: aiomqtt.Client) -> None:
        # a clean stop says "offline" itself: the will only fires on an unclean disconnect
        with contextlib.suppress(aiomqtt.MqttError, OSError):
            await client.publish(status_topic(self.settings, self.node), self._offline,
                                 qos=QOS, retain=True, timeout=2.0)

    async def _publish_status(self, client: aiomqtt.Client) -> None:
        payload = json.dumps(self.status()).encode()
        await client.publish(status_topic(self.settings, self.node), payload, qos=QOS, retain=True)

    async def _serve(self, client: aiomqtt.Client) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._heartbeat(client))
            tg.create_task(self._commands(client))

    async def _heartbeat(self, client: aiomqtt.Client) -> None:
        while True:
            self._wake.clear()
            await self._publish_status(client)
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that
            # arrives as its timer fires, and the node's shutdown then waits forever
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.heartbeat_s):
                    await self._wake.wait()

    async def _commands(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            try:
                cmd = parse_command(message.payload)
            except ValueError as e:
                log.warning("ignoring command on %s: %s", message.topic, e)
                continue
            log.info("command %s", cmd)
            try:
                result = self.on_command(cmd)
                if inspect.isawaitable(result):
                    await result
            except Exception:  # a failing handler must not end the node's command loop
                log.exception("command %s failed", cmd)
            self._wake.set()


class StatusWatcher(_Subscriber):
    """The latest status dict of every node (router side); offline nodes via their last will."""

    def __init__(self, settings: MqttSettings,
                 on_update: Callable[[str, dict[str, Any] | None], None] | None = None):
        super().__init__(settings, f"{settings.topic_prefix}/nodes/+/status", "status-watcher", "status watcher")
        self.on_update = on_update
        self._status: dict[str, dict[str, Any]] = {}
        self._changed = asyncio.Condition()

    def _make(self) -> aiomqtt.Client:
        return _client(self.settings, f"pdtb-{self.settings.username}-watch-{secrets.token_hex(3)}")

    def status(self, node: str) -> dict[str, Any] | None:
        """The node's last status (``state`` is ``offline`` after its last will), None if unseen."""
        return self._status.get(node)

    def all(self) -> dict[str, dict[str, Any]]:
        return dict(self._status)

    def is_up(self, node: str, max_age_s: float | None = None) -> bool:
        """Up, and (when ``max_age_s`` is given) heard from within that many wall seconds."""
        st = self._status.get(node)
        if st is None or st.get("state") != "up":
            return False
        return max_age_s is None or time.time() - float(st.get("t_wall", 0)) <= max_age_s

    async def wait_for(self, predicate: Callable[["StatusWatcher"], bool], timeout_s: float) -> bool:
        """Wait (wall seconds) until ``predicate(self)`` holds; False on timeout."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: predicate(self)), timeout_s)
                return True
            except asyncio.TimeoutError:
                return False

    async def _serve(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            await self._handle(message)

    async def _handle(self, message: aiomqtt.Message) -> None:
        parts = str(message.topic).split("/")
        if len(parts) < 2 or parts[-1] != "status":
            return
        node = parts[-2]
        status: dict[str, Any] | None
        if not message.payload:
            status = None  # retained message cleared
        else:
            try:
                status = json.loads(message.payload)
            except (json.JSONDecodeError, UnicodeDecodeError):
                log.warning("ignoring malformed status on %s", message.topic)
                return
            if not isinstance(status, dict):
                return
        async with self._changed:
            if status is None:
                self._status.pop(node, None)
            else:
                self._status[node] = status
            self._changed.notify_all()
        if self.on_update:
            self.on_update(node, status)


class Controller:
    """Sends commands to nodes (testbed side); only the ``controller`` user may.

    ``await Controller(settings).send(node, "slowdown", factor=2.0)`` opens a connection per
    call; ``async with Controller(settings) as c`` keeps one open for several.
    """

    def __init__(self, settings: MqttSettings):
        self.settings = settings
        self._client: aiomqtt.Client | None = None

    def _make(self) -> aiomqtt.Client:
        return _client(self.settings, f"pdtb-{self.settings.username}-{secrets.token_hex(3)}")

    async def __aenter__(self) -> "Controller":
        self._client = await _connect(self._make, self.settings.username)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            with contextlib.suppress(aiomqtt.MqttError, OSError):
                await self._client.__aexit__(None, None, None)
            self._client = None

    async def send(self, node: str, cmd: str, factor: float | None = None) -> None:
        payload = json.dumps({"cmd": cmd, "factor": factor}).encode()
        parse_command(payload)  # refuse a malformed command here rather than at the node
        if self._client is not None:
            await self._client.publish(cmd_topic(self.settings, node), payload, qos=QOS)
            return
        async with self:
            await self._client.publish(cmd_topic(self.settings, node), payload, qos=QOS)
