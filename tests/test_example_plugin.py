"""The example plugin of the README guide, over real TCP on 127.0.0.1."""

import pytest
import pytest_twisted
from gatewayd.plugins.example import ThermometerPlugin, ThermometerSimulator
from twisted.internet import defer, reactor
from twisted.internet.error import CannotListenError

from gatewayd.plugin import BadArguments, DeviceTimeout, NotFound
from gatewayd.testing import PluginHarness, connect_line_client, free_port


def make(durable="now", **config):
    port = free_port()
    harness = PluginHarness(
        ThermometerPlugin, {"listen": f"127.0.0.1:{port}", **config}, durable=durable
    )
    return harness, port


@pytest_twisted.inlineCallbacks
def test_reading_is_acknowledged_only_after_it_is_durable():
    harness, port = make(durable="manual")
    yield harness.start()
    client = yield connect_line_client(port)
    try:
        client.send("T kitchen 21.5")
        yield harness.collector.wait_for("reading").addTimeout(5, reactor)
        assert harness.collector.types() == ["device.online", "reading"]
        reading = harness.collector.events[1]
        assert (reading.device, reading.data, reading.raw) == (
            "kitchen",
            {"celsius": 21.5},
            "T kitchen 21.5",
        )
        assert (reading.plugin, reading.protocol, reading.gateway) == ("test", "example", "test-gw")
        # Nothing is acknowledged while the event is not durable.
        with pytest.raises(defer.TimeoutError):
            yield client.next_line(timeout=0.3)
        harness.collector.release()
        assert (yield client.next_line()) == b"OK"
    finally:
        client.close()
        yield harness.stop()


@pytest.mark.parametrize("outcome", ["refuse", "fail"])
@pytest_twisted.inlineCallbacks
def test_a_reading_that_was_not_stored_is_not_acknowledged(outcome):
    harness, port = make(durable="manual")
    yield harness.start()
    client = yield connect_line_client(port)
    try:
        client.send("T kitchen 21.5")
        yield harness.collector.wait_for("reading").addTimeout(5, reactor)
        getattr(harness.collector, outcome)()
        assert (yield client.next_line()) == b"ERR not stored"
        # counted: the reading, and the device.online held with it
        assert harness.plugin.context.not_stored == (2 if outcome == "fail" else 0)
    finally:
        client.close()
        yield harness.stop()


@pytest_twisted.inlineCallbacks
def test_a_plugin_whose_start_failed_stops_cleanly():
    harness, port = make()
    yield harness.start()
    try:
        second = PluginHarness(ThermometerPlugin, {"listen": f"127.0.0.1:{port}"})
        with pytest.raises(CannotListenError):
            yield second.start()
        yield second.stop()  # nothing was listening: no AttributeError
    finally:
        yield harness.stop()


@pytest_twisted.inlineCallbacks
def test_bad_line_is_frame_invalid_and_connection_survives():
    harness, port = make()
    yield harness.start()
    client = yield connect_line_client(port)
    try:
        client.send("hello there")
        assert (yield client.next_line()) == b"ERR format"
        client.send("T t1 20.0")
        assert (yield client.next_line()) == b"OK"
        invalid = harness.collector.of_type("frame.invalid")
        assert [(e.data, e.raw) for e in invalid] == [({"reason": "format"}, "hello there")]
        assert harness.context.metrics.frames_invalid == 1
        assert harness.context.metrics.frames_in == 2
    finally:
        client.close()
        yield harness.stop()


@pytest_twisted.inlineCallbacks
def test_overlong_line_closes_only_that_connection():
    harness, port = make(max_line=32)
    yield harness.start()
    bad = yield connect_line_client(port)
    good = yield connect_line_client(port)
    try:
        bad.send("T " + "x" * 100)
        yield bad.closed.addTimeout(5, reactor)
        good.send("T t2 19.0")
        assert (yield good.next_line()) == b"OK"
        assert harness.collector.of_type("frame.invalid")[0].data == {"reason": "length"}
    finally:
        good.close()
        yield harness.stop()


@pytest_twisted.inlineCallbacks
def test_ping_command_answers_404_504_and_ok():
    harness, port = make(ping_timeout=0.3)
    yield harness.start()
    client = yield connect_line_client(port)
    try:
        with pytest.raises(NotFound):
            yield harness.call("ping", {"device": "nobody"})
        with pytest.raises(BadArguments, match="device: Field required"):
            yield harness.call("ping", {})
        client.send("T t3 18.0")
        yield client.next_line()
        # The device does not answer PING: 504.
        with pytest.raises(DeviceTimeout):
            yield harness.call("ping", {"device": "t3"})
        assert (yield client.next_line()) == b"PING"
        # Now it does.
        result = harness.call("ping", {"device": "t3"})
        assert (yield client.next_line()) == b"PING"
        client.send("PONG")
        assert (yield result) == {"pong": True}
        devices = harness.plugin.devices()
        assert [(d.id, d.online) for d in devices] == [("t3", True)]
    finally:
        client.close()
        yield harness.stop()


@pytest_twisted.inlineCallbacks
def test_disconnect_emits_offline():
    harness, port = make()
    yield harness.start()
    client = yield connect_line_client(port)
    client.send("T t4 17.0")
    yield client.next_line()
    client.close()
    yield harness.collector.wait_for("device.offline").addTimeout(5, reactor)
    assert harness.collector.of_type("device.offline")[0].data == {"reason": "closed"}
    assert [(d.id, d.online) for d in harness.plugin.devices()] == [("t4", False)]
    yield harness.stop()


@pytest_twisted.inlineCallbacks
def test_simulator_devices_are_acknowledged():
    harness, port = make()
    yield harness.start()
    sim = ThermometerSimulator(reactor, f"127.0.0.1:{port}", devices=3, interval=0.05)
    sim.start()
    try:
        yield harness.collector.wait_for("reading", 9).addTimeout(5, reactor)
        assert {e.device for e in harness.collector.of_type("device.online")} == {
            "thermo-1",
            "thermo-2",
            "thermo-3",
        }
        for _ in range(50):
            if sim.acknowledged >= 9:
                break
            yield deferLater(0.05)
        assert sim.acknowledged >= 9
    finally:
        sim.stop()
        yield harness.stop()


def deferLater(seconds):
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)
