"""gatewayd.mqtt.MqttClient against real brokers: mosquitto (plain, password, TLS) and a
broker that accepts connections but never delivers."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher

from gatewayd.mqtt import CONNECTED, BrokerConfig, MqttClient, Will, _ReadBuffer
from gatewayd.testing import Mosquitto, free_port, sleep, wait_until

from .brokers import SilentBrokerFactory, password_broker, tls_broker

FAST = {"reconnect_initial": 0.05, "reconnect_max": 0.3, "connect_timeout": 2}


def config(port: int, **overrides) -> BrokerConfig:
    return BrokerConfig.model_validate({"host": "127.0.0.1", "port": port, **FAST, **overrides})


class Inbox:
    """A message handler that records (topic, payload, qos)."""

    def __init__(self, result=None):
        self.messages: list[tuple[str, bytes, int]] = []
        self.result = result

    def __call__(self, topic, payload, qos, retain):
        self.messages.append((topic, payload, qos))
        return self.result() if self.result else None

    def payloads(self):
        return [m[1] for m in self.messages]


def client(port, client_id, inbox=None, subscriptions=(), **options) -> MqttClient:
    settings = {k: options.pop(k) for k in list(options) if k in BrokerConfig.model_fields}
    return MqttClient(
        reactor,
        config(port, **settings),
        client_id=client_id,
        on_message=inbox,
        subscriptions=subscriptions,
        **options,
    )


@pytest_twisted.inlineCallbacks
def test_connect_subscribe_publish_receive(mosquitto):
    inbox = Inbox()
    listener = client(mosquitto.port, "listener", inbox, [("t/#", 0)])
    talker = client(mosquitto.port, "talker")
    listener.start()
    talker.start()
    try:
        yield listener.when_connected().addTimeout(5, reactor)
        yield talker.when_connected().addTimeout(5, reactor)
        yield listener.when_subscribed().addTimeout(5, reactor)  # SUBACK seen
        yield talker.publish("t/a", b"one", qos=0)
        yield talker.publish("t/b", b"two", qos=1).addTimeout(5, reactor)  # PUBACK
        yield wait_until(lambda: len(inbox.messages) == 2)
        assert inbox.messages == [("t/a", b"one", 0), ("t/b", b"two", 0)]
        assert listener.stats.messages_in == 2 and talker.stats.messages_out == 2
        assert listener.state == CONNECTED and listener.stats.connects == 1
    finally:
        yield listener.stop()
        yield talker.stop()
    assert listener.state == "stopped"


@pytest_twisted.inlineCallbacks
def test_a_burst_arrives_whole_and_in_order_through_the_read_buffer(mosquitto):
    """Messages queued for a persistent session come in bursts of many packets per recv();
    each is delivered once, in order, and acknowledged once its handler's Deferred fired."""

    def later():  # "durable" on the next reactor turn
        d = defer.Deferred()
        reactor.callLater(0, d.callback, None)
        return d

    inbox = Inbox(later)
    session = {"clean_session": False, "probe_interval": 0}
    listener = client(mosquitto.port, "burst", inbox, [("b/#", 1)], manual_ack=True, **session)
    talker = client(mosquitto.port, "burst-talker")
    listener.start()
    talker.start()
    try:
        yield listener.when_subscribed().addTimeout(5, reactor)
        assert isinstance(listener._client.socket(), _ReadBuffer)
        yield listener.stop()
        yield talker.when_connected().addTimeout(5, reactor)
        payloads = [b"%05d" % n + b"x" * (n % 300) for n in range(900)]  # broker keeps 1000
        for n, payload in enumerate(payloads):
            talker.publish(f"b/{n % 7}", payload, qos=1)
        yield wait_until(lambda: talker.stats.messages_out == 900 and not talker._pending.by_mid)
        listener = client(mosquitto.port, "burst", inbox, [("b/#", 1)], manual_ack=True, **session)
        listener.start()
        yield wait_until(lambda: len(inbox.messages) == 900, timeout=20)
        assert inbox.payloads() == payloads
        yield sleep(0.3)
    finally:
        yield listener.stop()
    # Acknowledged, so a new connection of the same session gets nothing again.
    again = Inbox()
    listener = client(mosquitto.port, "burst", again, [("b/#", 1)], manual_ack=True, **session)
    listener.start()
    try:
        yield listener.when_subscribed().addTimeout(5, reactor)
        yield sleep(0.5)
        assert again.messages == []
    finally:
        yield listener.stop()
        yield talker.stop()


def test_read_buffer_serves_small_reads_from_one_recv():
    left, right = socket.socketpair()
    try:
        right.sendall(b"abcdefgh")
        buffered = _ReadBuffer(left)
        assert buffered.recv(1) == b"a" and buffered.pending() == 7
        assert buffered.recv(3) == b"bcd" and buffered.recv(10) == b"efgh"
        assert buffered.pending() == 0
        left.setblocking(False)
        with pytest.raises(BlockingIOError):  # nothing buffered, nothing on the socket
            buffered.recv(1)
        assert buffered.fileno() == left.fileno()  # everything else is the socket's
        right.close()
        assert buffered.recv(1) == b""  # end of stream
    finally:
        left.close()


@pytest_twisted.inlineCallbacks
def test_starts_without_a_broker_and_connects_when_it_appears():
    port = free_port()
    inbox = Inbox()
    link = client(port, "early", inbox, [("t/#", 0)])
    link.start()
    broker = None
    try:
        yield wait_until(lambda: link.stats.connect_failures >= 2)
        assert not link.connected and link.stats.last_error == "connection refused"
        broker = Mosquitto(port=port).start()
        yield link.when_connected().addTimeout(5, reactor)
        other = client(port, "other")
        other.start()
        yield other.when_connected().addTimeout(5, reactor)
        yield link.when_subscribed().addTimeout(5, reactor)
        other.publish("t/x", b"hello")
        yield wait_until(lambda: inbox.payloads() == [b"hello"])
        yield other.stop()
    finally:
        yield link.stop()
        if broker is not None:
            broker.stop()


@pytest_twisted.inlineCallbacks
def test_reconnect_backoff_doubles_up_to_its_cap_with_jitter():
    """Nothing listens: the delays are reconnect_initial, twice that, ... up to reconnect_max,
    each plus a random jitter below reconnect_initial (so a fleet does not retry in step)."""
    delays = []

    def observe(event):
        if "retrying in" in (event.get("log_format") or ""):
            delays.append(event["delay"])

    globalLogPublisher.addObserver(observe)
    link = client(free_port(), "backoff", reconnect_initial=0.02, reconnect_max=0.08)
    link.start()
    try:
        yield wait_until(lambda: len(delays) >= 7, timeout=10)
    finally:
        globalLogPublisher.removeObserver(observe)
        yield link.stop()
    bases = [0.02, 0.04, 0.08, 0.08, 0.08, 0.08, 0.08]
    jitters = [delay - base for delay, base in zip(delays, bases, strict=False)]
    assert all(0 <= jitter < 0.02 for jitter in jitters), delays
    assert len({round(jitter, 9) for jitter in jitters}) > 1, delays


def test_reconnect_delays_are_checked_against_each_other():
    with pytest.raises(ValueError, match="reconnect_max\n.*at least reconnect_initial"):
        BrokerConfig(reconnect_initial="10s", reconnect_max="1s")
    with pytest.raises(ValueError, match="reconnect_initial\n.*more than 0"):
        BrokerConfig(reconnect_initial=0)


@pytest_twisted.inlineCallbacks
def test_broker_killed_and_restarted_reconnects_and_resubscribes(mosquitto):
    inbox = Inbox()
    states: list[str] = []
    link = client(mosquitto.port, "survivor", inbox, [("t/#", 0)])
    link.add_state_listener(states.append)
    link.start()
    try:
        yield link.when_connected().addTimeout(5, reactor)
        mosquitto.kill()
        yield wait_until(lambda: not link.connected)
        yield sleep(0.3)  # a few failed attempts while it is down
        mosquitto.start()
        yield link.when_connected().addTimeout(5, reactor)
        yield link.when_subscribed().addTimeout(5, reactor)
        publisher = client(mosquitto.port, "publisher")
        publisher.start()
        yield publisher.when_connected().addTimeout(5, reactor)
        publisher.publish("t/after", b"resumed")
        yield wait_until(lambda: inbox.payloads() == [b"resumed"])  # resubscribed
        yield publisher.stop()
        assert link.stats.connects == 2 and link.stats.disconnects == 1
        assert link.stats.connect_failures >= 1
        assert states[:4] == ["waiting", "connecting", "connected", "waiting"]
    finally:
        yield link.stop()


@pytest_twisted.inlineCallbacks
def test_broker_that_never_delivers_is_detected_and_left():
    factory = SilentBrokerFactory()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    link = client(
        port.getHost().port,
        "prober",
        Inbox(),
        [("t/#", 0)],
        probe_interval=0.2,
        probe_timeout=0.3,
    )
    link.start()
    try:
        yield link.when_connected().addTimeout(5, reactor)
        yield wait_until(lambda: link.stats.silent_disconnects >= 1, timeout=5)
        assert "not even our probe on gatewayd/probe/prober" in link.stats.last_error
        yield wait_until(lambda: factory.connections >= 2, timeout=5)  # it reconnected
    finally:
        yield link.stop()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_a_delivering_broker_is_not_taken_for_silent(mosquitto):
    link = client(mosquitto.port, "quiet", Inbox(), [], probe_interval=0.1, probe_timeout=0.2)
    link.start()
    try:
        yield link.when_connected().addTimeout(5, reactor)
        yield sleep(1.0)  # nothing to receive but our own probes
        assert link.stats.silent_disconnects == 0 and link.stats.connects == 1
    finally:
        yield link.stop()


@pytest_twisted.inlineCallbacks
def test_qos1_is_acknowledged_only_after_the_handler_result_fires(mosquitto):
    held: list[defer.Deferred] = []

    def hold():
        d = defer.Deferred()
        held.append(d)
        return d

    inbox = Inbox(result=hold)
    link = client(
        mosquitto.port, "acker", inbox, [("t/#", 1)], manual_ack=True, clean_session=False
    )
    publisher = client(mosquitto.port, "pub")
    link.start()
    publisher.start()
    try:
        yield link.when_connected().addTimeout(5, reactor)
        yield publisher.when_connected().addTimeout(5, reactor)
        yield link.when_subscribed().addTimeout(5, reactor)
        yield publisher.publish("t/1", b"important", qos=1)
        yield wait_until(lambda: len(inbox.messages) == 1)
        # Not acknowledged: after a connection loss the broker delivers it again.
        link.drop("test")
        yield wait_until(lambda: len(inbox.messages) == 2, timeout=5)
        assert inbox.messages[1][1:] == (b"important", 1)
        held[0].callback(None)  # the first delivery's ack belongs to a dead connection: skipped
        held[1].callback(None)  # this one is acknowledged
        yield sleep(0.1)
        link.drop("test")
        yield link.when_connected().addTimeout(5, reactor)
        yield sleep(0.5)
        assert len(inbox.messages) == 2  # acknowledged: not delivered again
    finally:
        yield link.stop()
        yield publisher.stop()


@pytest_twisted.inlineCallbacks
def test_a_message_that_was_not_stored_is_not_acknowledged_but_delivered_again(
    mosquitto, monkeypatch
):
    """A full disk: the handler's events could not be stored. Acknowledging the message would
    lose it; instead the client reconnects and the broker delivers it again."""
    from gatewayd.queue import QueueError

    monkeypatch.setattr(MqttClient, "redeliver_after", 0.3)
    outcomes = [QueueError("queue store: database or disk is full")]

    def store():
        if outcomes:
            return defer.fail(outcomes.pop())
        return defer.succeed(None)

    inbox = Inbox(result=store)
    link = client(
        mosquitto.port, "full-disk", inbox, [("t/#", 1)], manual_ack=True, clean_session=False
    )
    publisher = client(mosquitto.port, "pub")
    link.start()
    publisher.start()
    try:
        yield link.when_connected().addTimeout(5, reactor)
        yield publisher.when_connected().addTimeout(5, reactor)
        yield link.when_subscribed().addTimeout(5, reactor)
        yield publisher.publish("t/1", b"reading", qos=1)
        yield wait_until(lambda: len(inbox.messages) == 2, timeout=5)  # delivered again
        assert inbox.messages[1][1:] == (b"reading", 1)
        assert link.stats.not_durable == 1
        yield link.when_connected().addTimeout(5, reactor)
        yield sleep(0.2)
        link.drop("test")  # the second delivery was stored and acknowledged: not again
        yield link.when_connected().addTimeout(5, reactor)
        yield sleep(0.5)
        assert len(inbox.messages) == 2
    finally:
        yield link.stop()
        yield publisher.stop()


@pytest_twisted.inlineCallbacks
def test_will_is_published_on_drop_but_not_on_stop(mosquitto):
    inbox = Inbox()
    watcher = client(mosquitto.port, "watcher", inbox, [("will/#", 1)])
    mortal = MqttClient(
        reactor,
        config(mosquitto.port),
        client_id="mortal",
        will=Will("will/mortal", b"gone", qos=1),
    )
    watcher.start()
    mortal.start()
    try:
        yield watcher.when_connected().addTimeout(5, reactor)
        yield watcher.when_subscribed().addTimeout(5, reactor)
        yield mortal.when_connected().addTimeout(5, reactor)
        mortal.drop("power loss")
        yield wait_until(lambda: inbox.payloads() == [b"gone"])
        yield mortal.when_connected().addTimeout(5, reactor)
        yield mortal.stop()
        yield sleep(0.3)
        assert inbox.payloads() == [b"gone"]
    finally:
        yield watcher.stop()
        yield mortal.stop()


@pytest_twisted.inlineCallbacks
def test_username_password_and_refusal_is_retried_without_logging_the_password():
    broker = password_broker("gw", "s3cret-pass")
    broker.start()
    logged: list[str] = []

    def observe(event):
        from twisted.logger import formatEvent

        logged.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    wrong = client(broker.port, "wrong", username="gw", password="not-it")
    right = client(broker.port, "right", username="gw", password="s3cret-pass")
    wrong.start()
    right.start()
    try:
        yield right.when_connected().addTimeout(5, reactor)
        yield wait_until(lambda: wrong.stats.connect_failures >= 2)
        assert not wrong.connected
        assert "refused" in wrong.stats.last_error or "Not authorized" in wrong.stats.last_error
    finally:
        globalLogPublisher.removeObserver(observe)
        yield wrong.stop()
        yield right.stop()
        broker.stop()
    text = "\n".join(logged)
    assert "not authorized" in text.lower()
    assert "not-it" not in text and "s3cret-pass" not in text
    assert "s3cret-pass" not in repr(right.config)


@pytest_twisted.inlineCallbacks
def test_tls_with_client_certificate():
    broker, paths = tls_broker()
    broker.start()
    inbox = Inbox()
    tls = {
        "ca_file": str(paths["ca"]),
        "cert_file": str(paths["client_cert"]),
        "key_file": str(paths["client_key"]),
    }
    link = client(broker.port, "tls-sub", inbox, [("t/#", 0)], tls=tls)
    talker = client(broker.port, "tls-pub", tls=tls)
    untrusted = client(broker.port, "no-cert", tls={"ca_file": str(paths["ca"])})
    link.start()
    talker.start()
    untrusted.start()
    try:
        yield link.when_connected().addTimeout(5, reactor)
        yield talker.when_connected().addTimeout(5, reactor)
        yield link.when_subscribed().addTimeout(5, reactor)
        for n in range(50):
            talker.publish("t/tls", b"x%d" % n)
        yield wait_until(lambda: len(inbox.messages) == 50)
        assert inbox.payloads()[-1] == b"x49"
        yield wait_until(lambda: untrusted.stats.connect_failures >= 1)
        assert not untrusted.connected
    finally:
        yield link.stop()
        yield talker.stop()
        yield untrusted.stop()
        broker.stop()


def test_unreadable_tls_files_are_config_errors(tmp_path):
    for key in ("ca_file", "cert_file", "key_file"):
        with pytest.raises(ValueError, match=f"{key}\n.*cannot read /nonexistent/x.pem"):
            BrokerConfig(tls={key: "/nonexistent/x.pem"})


def test_a_tls_file_gone_after_the_config_was_read_fails_the_start(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not yet a certificate")
    link = client(1883, "x", tls={"ca_file": str(ca)})
    ca.unlink()
    with pytest.raises(OSError):
        link.start()


def test_config_validation():
    with pytest.raises(ValueError, match="keepalive"):
        BrokerConfig(keepalive=0.5)
    with pytest.raises(ValueError, match="without"):
        BrokerConfig(client_id="a/#")
    assert "**********" in BrokerConfig(password="p").model_dump_json()
