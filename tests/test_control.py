"""Control plane against a real per-run mosquitto: auth, ACL, last will, commands."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiomqtt
import pytest

from nodes.config import MqttSettings
from nodes.control import Controller, ControlError, NodeControl, StatusWatcher, parse_command
from testbed.broker import Broker

REPO = Path(__file__).resolve().parents[1]
NODES = ["router", "p1", "d1"]


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path, "t1", "127.0.0.1", NODES)
    b.start()
    yield b
    b.stop()
    assert not (tmp_path / "broker" / "mosquitto.pid").exists()


def settings(b: Broker, user: str, heartbeat_s: float = 0.2) -> MqttSettings:
    return b.mqtt_settings(user, heartbeat_s=heartbeat_s)


def load(n: int = 0) -> dict:
    return {"state": "up", "queue_depth": n, "batch_size": 0, "kv_used_bytes": 0,
            "kv_free_bytes": 100, "slowdown": 1.0}


def test_generated_files(broker):
    conf = broker.conf_path.read_text()
    assert "allow_anonymous false" in conf and "per_listener_settings false" in conf
    assert f"listener {broker.port} 127.0.0.1" in conf
    acl = broker.acl_path.read_text()
    assert "topic write pdtb/t1/nodes/+/cmd" in acl.split("user controller")[1]
    assert "topic write pdtb/t1/nodes/d1/status" in acl
    assert oct(broker.passwd_path.stat().st_mode & 0o777) == "0o600"
    # hashed, not plain text
    assert broker.password("d1") not in broker.passwd_path.read_text()
    assert broker.pid and int(broker.pid_path.read_text()) == broker.pid


def test_broker_rejects_hostile_names(tmp_path):
    from core.config import ConfigError
    with pytest.raises(ConfigError, match="user name"):
        Broker(tmp_path, "t1", "127.0.0.1", ["ok", "bad/#"])
    with pytest.raises(ConfigError, match="run_id"):
        Broker(tmp_path, "t 1", "127.0.0.1", ["ok"])


async def test_wrong_password_is_refused(broker):
    bad = settings(broker, "d1").model_copy(update={"password": "not-the-password"})
    with pytest.raises(ControlError, match="refused"):
        async with NodeControl(bad, "d1", "decode", load, lambda c: None):
            pass
    anon = aiomqtt.Client("127.0.0.1", broker.port, identifier="anon")
    with pytest.raises(aiomqtt.MqttError):
        async with anon:
            pass


async def test_node_cannot_publish_command_or_others_status(broker):
    seen: list[tuple[str, bytes]] = []
    ctl = settings(broker, "controller")
    async with aiomqtt.Client("127.0.0.1", broker.port, username="controller",
                              password=ctl.password, identifier="spy") as spy:
        await spy.subscribe("pdtb/t1/#", qos=1)

        async def collect():
            async for m in spy.messages:
                seen.append((str(m.topic), m.payload))
        task = asyncio.create_task(collect())
        d1 = settings(broker, "d1")
        async with aiomqtt.Client("127.0.0.1", broker.port, username="d1", password=d1.password,
                                  identifier="d1-rogue") as rogue:
            await rogue.publish("pdtb/t1/nodes/p1/cmd", b'{"cmd": "crash"}', qos=1)
            await rogue.publish("pdtb/t1/nodes/d1/cmd", b'{"cmd": "crash"}', qos=1)
            await rogue.publish("pdtb/t1/nodes/p1/status", b'{"state": "offline"}', qos=1)
            await rogue.publish("pdtb/t1/nodes/d1/status", b'{"state": "up"}', qos=1)
        # the controller's command goes through, and after everything the rogue sent
        await Controller(ctl).send("p1", "drain")
        for _ in range(100):
            if any(t == "pdtb/t1/nodes/p1/cmd" for t, _ in seen):
                break
            await asyncio.sleep(0.05)
        task.cancel()
    topics = [t for t, _ in seen]
    assert "pdtb/t1/nodes/d1/status" in topics  # its own status: allowed
    assert "pdtb/t1/nodes/p1/status" not in topics  # another node's status: dropped
    cmds = [json.loads(p) for t, p in seen if t.endswith("/cmd")]
    assert cmds == [{"cmd": "drain", "factor": None}]


async def test_status_heartbeat_and_commands(broker):
    got: list[dict] = []
    depth = {"n": 3}

    async def on_command(cmd):
        got.append(cmd)
        depth["n"] = 7

    async with StatusWatcher(settings(broker, "router")) as w:
        async with NodeControl(settings(broker, "d1"), "d1", "decode", lambda: load(depth["n"]), on_command):
            assert await w.wait_for(lambda w: w.is_up("d1"), 5)
            st = w.status("d1")
            assert st["node"] == "d1" and st["role"] == "decode" and st["queue_depth"] == 3
            assert {"kv_used_bytes", "kv_free_bytes", "batch_size", "slowdown", "t_wall"} <= set(st)
            await Controller(settings(broker, "controller")).send("d1", "slowdown", factor=2.5)
            assert await w.wait_for(lambda w: w.status("d1")["queue_depth"] == 7, 5)
            assert got == [{"cmd": "slowdown", "factor": 2.5}]
            t1 = w.status("d1")["t_wall"]
            assert await w.wait_for(lambda w: w.status("d1")["t_wall"] > t1, 2)  # heartbeats go on
        # a clean exit says offline itself
        assert await w.wait_for(lambda w: w.status("d1")["state"] == "offline", 5)


async def test_controller_refuses_malformed_commands(broker):
    c = Controller(settings(broker, "controller"))
    with pytest.raises(ValueError):
        await c.send("d1", "reboot")
    with pytest.raises(ValueError):
        await c.send("d1", "slowdown", factor=0)
    with pytest.raises(ValueError):
        parse_command(b'{"cmd": "slowdown", "factor": "2"}')


async def test_killed_node_last_will_reaches_router(broker, tmp_path):
    cfg = tmp_path / "mqtt.json"
    cfg.write_text(settings(broker, "p1").model_dump_json())
    script = (
        "import asyncio, json, sys\n"
        "from nodes.config import MqttSettings\n"
        "from nodes.control import NodeControl\n"
        "s = MqttSettings.model_validate_json(open(sys.argv[1]).read())\n"
        "async def main():\n"
        "    async with NodeControl(s, 'p1', 'prefill', lambda: {'state': 'up'}, lambda c: None):\n"
        "        await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    async with StatusWatcher(settings(broker, "router")) as w:
        proc = subprocess.Popen([sys.executable, "-c", script, str(cfg)], cwd=REPO)
        try:
            assert await w.wait_for(lambda w: w.is_up("p1"), 20)
            proc.kill()  # SIGKILL: no clean disconnect, only the will can tell
            proc.wait(5)
            assert await w.wait_for(lambda w: (w.status("p1") or {}).get("state") == "offline", 10)
            assert w.status("p1") == {"node": "p1", "role": "prefill", "state": "offline"}
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    # retained: a router that connects later still sees it offline
    async with StatusWatcher(settings(broker, "router")) as w2:
        assert await w2.wait_for(lambda w: w.status("p1") is not None, 5)
        assert w2.status("p1")["state"] == "offline"


def test_broker_goes_away_when_its_parent_is_killed(tmp_path):
    """mosquitto gets the daemons' parent-death signal: a SIGKILLed pdtb leaves no broker behind."""
    from core.pids import proc_start_ticks, same_process

    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from testbed.broker import Broker\n"
        "b = Broker(Path(sys.argv[1]), 'orphan', '127.0.0.1', ['d1'])\n"
        "b.start()\n"
        "print(b.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    pid, ticks = None, None
    try:
        line = parent.stdout.readline()
        assert line.strip().isdigit(), f"the broker did not start: {line!r}"
        pid = int(line)
        ticks = proc_start_ticks(pid)
        assert same_process(pid, ticks)
        parent.kill()  # SIGKILL: no stop(), no cleanup code runs in the parent
        parent.wait(5)
        for _ in range(200):
            if not same_process(pid, ticks):
                break
            time.sleep(0.05)
        assert not same_process(pid, ticks), "mosquitto outlived the process that started it"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(5)
        if pid is not None and same_process(pid, ticks):  # only the PID we saw start, never by name
            os.kill(pid, signal.SIGKILL)


async def test_nodes_ride_out_a_broker_restart(broker):
    """The broker restarts on its port: the node reconnects and its status resumes; a command
    sent after the restart reaches it."""
    got: list[dict] = []
    async with StatusWatcher(settings(broker, "router")) as w:
        async with NodeControl(settings(broker, "d1"), "d1", "decode", load, got.append):
            assert await w.wait_for(lambda w: w.is_up("d1"), 5)
            await asyncio.to_thread(broker.restart)
            restarted = time.time()
            assert await w.wait_for(lambda w: w.is_up("d1") and w.status("d1")["t_wall"] > restarted, 15)
            await Controller(settings(broker, "controller")).send("d1", "drain")
            for _ in range(100):
                if got:
                    break
                await asyncio.sleep(0.05)
            assert got == [{"cmd": "drain", "factor": None}]
