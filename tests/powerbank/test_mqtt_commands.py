"""Backend commands over MQTT to a power-bank cabinet, end to end.

A real mosquitto; the box side is ``gatewayd.mqtt.MqttClient`` carrying a ``CommandChannel``
(manual acknowledgement: a command is PUBACKed once it is recorded); the backend is a second
``MqttClient``. The command path is the real one: ``CommandDispatcher`` and ``IdempotencyStore``
in front of the power-bank plugin (``PluginHarness``), whose simulated cabinet counts every CC
(lend request) it receives.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest_twisted
from gatewayd.plugins.powerbank import PowerbankPlugin
from gatewayd.plugins.powerbank.simulator import PowerbankSimulator, SimulatorOptions
from twisted.internet import reactor

from gatewayd.commands import CommandChannel, CommandDispatcher, CommandsConfig, IdempotencyStore
from gatewayd.mqtt import BrokerConfig, MqttClient
from gatewayd.testing import DaemonView, HostView, PluginHarness, free_port, wait_until

GATEWAY = "edge-01"
COMMANDS = f"gatewayd/{GATEWAY}/commands/cabinets"
RESPONSES = f"gatewayd/{GATEWAY}/responses/cabinets"
REPLIES = f"backend/replies/{GATEWAY}"


class Backend:
    """The backend's MQTT client: publishes commands, collects every answer by topic."""

    def __init__(self, port: int) -> None:
        self.answers: list[tuple[str, dict]] = []
        self.client = MqttClient(
            reactor,
            BrokerConfig(port=port, reconnect_initial=0.2, reconnect_max=1),
            client_id="backend",
            on_message=lambda topic, payload, qos, retain: self.answers.append(
                (topic, json.loads(payload))
            ),
            subscriptions=[(f"gatewayd/{GATEWAY}/responses/#", 1), (f"{REPLIES}/#", 1)],
        )

    def send(self, command: str, **request) -> None:
        self.client.publish(f"{COMMANDS}/{command}", json.dumps(request).encode(), qos=1)

    def answer(self, request_id: str, count: int = 1):
        """Fires with the answers to ``request_id`` once there are ``count`` of them."""

        def mine() -> list[tuple[str, dict]]:
            return [(t, a) for t, a in self.answers if a.get("id") == request_id]

        return wait_until(lambda: len(mine()) >= count, timeout=10).addCallback(lambda _: mine())


@pytest_twisted.inlineCallbacks
def test_lend_over_mqtt_runs_once_per_request_id(mosquitto, tmp_path):
    port = free_port()
    harness = PluginHarness(PowerbankPlugin, {"listen": f"127.0.0.1:{port}"}, name="cabinets")
    options = SimulatorOptions(
        cabinets=1,
        heartbeat=0.5,
        empty_rate=0.0,
        fail_rate=0.0,
        duplicate_rate=0.0,
        return_interval=0,
        eject_delay=0.02,
        answer_delay=0.01,
        seed=7,
    )
    simulator = PowerbankSimulator(reactor, f"127.0.0.1:{port}", options)
    daemon = DaemonView(reactor, gateway_id=GATEWAY)
    daemon.plugins["cabinets"] = HostView("cabinets", "powerbank", harness.plugin, harness.context)
    store = IdempotencyStore(tmp_path / "commands.db", reactor)
    dispatcher = CommandDispatcher(daemon, command_timeout=10, store=store)
    box = MqttClient(
        reactor,
        BrokerConfig(port=mosquitto.port, reconnect_initial=0.2, reconnect_max=1),
        client_id="box",
        manual_ack=True,
    )
    channel = CommandChannel(
        dispatcher,
        store,
        GATEWAY,
        CommandsConfig(allow=["cabinets.lend"], dedupe_window="10m"),
        box.publish,
    )
    box.on_message = channel.handle
    box.subscribe(channel.subscription, qos=1)
    backend = Backend(mosquitto.port)

    yield store.open()
    yield harness.start()
    simulator.start()
    box.start()
    backend.client.start()
    try:
        yield harness.collector.wait_for("device.online").addTimeout(10, reactor)
        yield box.when_subscribed()
        yield backend.client.when_subscribed()
        cabinet = simulator.cabinets[0]
        slot, (_, bank) = next(
            (n, c) for n, c in sorted(cabinet.slots.items()) if c is not None and c[0] != "ER"
        )
        lend = {"imei": cabinet.imei, "slot": slot, "bank": bank}

        # A lend through the command topic: answered on reply_to, the bank ejected.
        backend.send("lend", id="lend-1", args=lend, reply_to=REPLIES)
        ((topic, answer),) = yield backend.answer("lend-1")
        assert topic == REPLIES
        assert answer["status"] == 200 and answer["ok"] is True
        assert answer["result"]["outcome"] == "succeeded" and answer["result"]["bank"] == bank
        assert simulator.stats.lends_ok == 1 and cabinet.slots[slot] is None

        # The backend retries the same request: the stored answer again, no second CC.
        backend.send("lend", id="lend-1", args=lend, reply_to=REPLIES)
        answers = yield backend.answer("lend-1", count=2)
        assert answers[1] == answers[0]
        assert simulator.stats.lends_ok + simulator.stats.lends_failed == 1
        assert cabinet.lent == [bank]

        # An expired request is refused (410), on the default responses topic.
        past = datetime.fromtimestamp(reactor.seconds() - 5, UTC).isoformat()
        backend.send("lend", id="lend-2", args=lend, expires=past)
        ((topic, answer),) = yield backend.answer("lend-2")
        assert topic == f"{RESPONSES}/lend"
        assert (answer["status"], answer["error"]["code"]) == (410, "expired")

        # A command commands.allow does not list is refused (403).
        backend.send("query", id="query-1", args={"imei": cabinet.imei}, reply_to=REPLIES)
        ((topic, answer),) = yield backend.answer("query-1")
        assert (answer["status"], answer["error"]["code"]) == (403, "forbidden")

        # One CC in all, one command.result, saying who asked.
        assert simulator.stats.lends_ok + simulator.stats.lends_failed == 1
        results = [e.data for e in harness.collector.of_type("command.result")]
        assert [(r["command"], r["source"], r["request_id"]) for r in results] == [
            ("lend", "mqtt", "lend-1")
        ]
        assert channel.stats.executed == 1 and channel.stats.repeats == 1
        assert channel.stats.refused == 2
    finally:
        simulator.stop()
        yield backend.client.stop()
        yield box.stop()
        yield harness.stop()
        yield store.close()
