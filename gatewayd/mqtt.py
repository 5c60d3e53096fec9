"""MQTT inside the reactor: a paho-mqtt 2.x client whose socket the Twisted reactor drives.

Shared by every MQTT user in gatewayd (the heating plugin, its simulator, the MQTT sink).

Why the reactor drives paho's socket rather than paho's own thread (``loop_start``):

- One thread owns all state. paho's callbacks run on the reactor thread, so a message handler
  can emit events, touch plugin state and acknowledge the broker with no locks and no
  ``callFromThread`` hop per message (at thousands of messages a second that hop is a pipe
  write and a reactor wake-up each).
- We own the connection policy: capped, jittered reconnect backoff (Twisted's
  ``backoffPolicy``; paho's own loop doubles without jitter), a CONNACK timeout, and a probe
  that detects a broker which accepts the connection but never delivers. A dead paho thread
  would also be invisible to the reactor's watchdog.
- Manual acknowledgement after durability (``manual_ack``) is a plain call on the same thread.

The only blocking paho calls are ``connect()``/``reconnect()`` (DNS, TCP connect, TLS
handshake). They run in the reactor's thread pool; the reactor leaves the client alone while one
runs. When it returns, the socket is registered with ``addReader``/``addWriter``: reads call
``loop_read()`` while it makes progress (and while the socket has ``pending()`` bytes, which
no fd event would announce), writes call ``loop_write()``, and a timer calls ``loop_misc()``
for keepalive pings. paho's socket is wrapped in a ``_ReadBuffer`` so that its one-byte reads
come from one large ``recv``, and the messages of a read burst are delivered to the handler
after paho has parsed the burst. paho's ``reconnect_on_failure`` is off, so paho never
reconnects (and never blocks) on the reactor thread by itself.

Silent broker detection: every ``probe_interval`` without any inbound message the client
publishes a probe to its own ``probe_topic`` (which it subscribes to). If nothing at all arrives
within ``probe_timeout`` after that, the broker is taking the connection but not routing: the
client drops the connection and reconnects (``silent_disconnects``). Keepalive pings only prove
that the TCP link and the broker's network loop are alive.

Public API: ``BrokerConfig``/``TlsConfig`` (config models), ``Will``, ``MqttClient`` (``start``,
``stop``, ``publish``, ``subscribe``, ``drop``, ``when_connected``, ``when_subscribed``,
``add_state_listener``, ``register_metrics``, ``state``, ``connected``, ``subscribed``,
``stats``), ``NotConnected``.
Passwords are never logged.
"""

from __future__ import annotations

import contextlib
import random
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from pydantic import Field, field_validator
from twisted.application.internet import backoffPolicy
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.logger import Logger
from twisted.python import threadable
from zope.interface import implementer

from gatewayd.logsetup import LogThrottle
from gatewayd.schema import (
    ConfigModel,
    Duration,
    HostPort,
    PositiveDuration,
    ReadableFile,
    Secret,
    at_least,
    split_host_port,
)

__all__ = [
    "CONNECTED",
    "CONNECTING",
    "STOPPED",
    "WAITING",
    "BrokerConfig",
    "LinkStats",
    "MessageHandler",
    "MqttClient",
    "MqttError",
    "NotConnected",
    "TlsConfig",
    "Will",
]

STOPPED, CONNECTING, CONNECTED, WAITING = "stopped", "connecting", "connected", "waiting"
#: The link state as the number of the ``mqtt_state`` gauge.
STATE_CODES = {STOPPED: 0, CONNECTING: 1, CONNECTED: 2, WAITING: 3}

#: ``handler(topic, payload, qos, retain)``; a Deferred it returns delays the broker's ack.
MessageHandler = Callable[[str, bytes, int, bool], Any]


class MqttError(Exception):
    """An MQTT operation that could not be carried out."""


class NotConnected(MqttError):
    """The client is not connected to the broker (it keeps reconnecting by itself)."""


class TlsConfig(ConfigModel):
    """TLS towards the broker: CA bundle, optional client certificate."""

    #: PEM file of the CAs that sign the broker's certificate; null: the system's CAs.
    ca_file: ReadableFile | None = None
    #: PEM client certificate and its key, for brokers that authenticate clients by certificate.
    cert_file: ReadableFile | None = None
    key_file: ReadableFile | None = None
    #: true skips the check of the broker's host name against its certificate (testing only).
    insecure: bool = False


class BrokerConfig(ConfigModel):
    """One broker connection (the ``broker:`` section of MQTT plugins and sinks)."""

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    #: Other nodes of a clustered broker (``HOST:PORT``), tried in turn after a failed connect or
    #: a lost connection: the client fails over instead of waiting for its node to come back.
    fallbacks: list[HostPort] = Field(default_factory=list)
    #: null: the user of the client chooses one (the heating plugin: gatewayd-<host>-<instance>).
    client_id: str | None = None
    username: str | None = None
    #: Give it as ``password_file: PATH`` or ``password: "${VAR}"`` to keep it out of the file.
    password: Secret | None = None
    tls: TlsConfig | None = None
    #: Seconds between PINGREQs when nothing else is sent; a broker silent for 1.5x is dropped.
    keepalive: Duration = 60.0
    #: TCP connect + TLS handshake, then again for the broker's CONNACK.
    connect_timeout: PositiveDuration = 10.0
    #: Reconnect delays: reconnect_initial, doubling up to reconnect_max, plus random jitter of
    #: up to reconnect_initial.
    reconnect_initial: PositiveDuration = 1.0
    reconnect_max: Duration = 60.0
    #: Silent-broker probe: after this long without any inbound message, publish a probe to
    #: probe_topic; 0 disables the probe.
    probe_interval: Duration = 30.0
    #: No message at all this long after a probe: the broker does not deliver; reconnect.
    probe_timeout: PositiveDuration = 10.0
    #: Default: gatewayd/probe/<client_id>. The broker must let the client publish and
    #: subscribe there.
    probe_topic: str | None = None
    #: false keeps the broker-side session (subscriptions, QoS 1 messages queued while we are
    #: away) across reconnects and restarts.
    clean_session: bool = True
    #: Outgoing messages paho keeps while the broker is slow (0: unbounded).
    max_queued_messages: int = Field(10000, ge=0)

    @field_validator("keepalive")
    @classmethod
    def _keepalive_range(cls, value: float) -> float:
        if not 1 <= value <= 65535:
            raise ValueError("keepalive must be 1 s .. 65535 s")
        return value

    _reconnect_max_at_least_initial = field_validator("reconnect_max")(
        at_least("reconnect_initial")
    )

    @field_validator("client_id", "probe_topic")
    @classmethod
    def _no_wildcards(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c in value for c in "+#\x00")):
            raise ValueError("must be non-empty, without + # or NUL")
        return value


@dataclass(frozen=True)
class Will:
    """The last will the broker publishes when the connection dies without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass
class LinkStats:
    """Counters of one MQTT link; exposed in ``/metrics`` through ``register_metrics``."""

    connect_attempts: int = 0
    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    silent_disconnects: int = 0
    messages_in: int = 0
    messages_out: int = 0
    publish_failures: int = 0
    handler_errors: int = 0
    not_durable: int = 0  # messages whose handler's Deferred failed (events not stored)
    last_error: str | None = None


@implementer(IReadDescriptor, IWriteDescriptor)
class _SocketDescriptor:
    """paho's socket as the reactor sees it: readiness is forwarded to the owning client."""

    def __init__(self, owner: MqttClient, sock: Any) -> None:
        self.owner = owner
        self.sock = sock

    def fileno(self) -> int:
        try:
            return self.sock.fileno()
        except (OSError, AttributeError):
            return -1

    def doRead(self) -> None:
        self.owner._readable(self)

    def doWrite(self) -> None:
        self.owner._writable(self)

    def connectionLost(self, reason: Any) -> None:
        self.owner._descriptor_lost(self, reason)

    def logPrefix(self) -> str:
        return f"mqtt:{self.owner.name}"


class _ReadBuffer:
    """paho's socket with its reads served from one large ``recv``.

    paho reads every packet in three or four ``recv`` calls (the type byte, each length byte,
    the body); a backlog of small reports costs four system calls each. Here one ``recv`` of
    ``chunk`` bytes feeds many packets, and ``pending()`` tells the reactor side that buffered
    bytes remain (as for TLS), so they are read without waiting for the fd again.
    Everything else is the wrapped socket's (paho's own websocket wrapper works the same way).
    """

    __slots__ = ("_sock", "_buffer", "_position")

    chunk = 65536

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buffer = b""
        self._position = 0

    def recv(self, size: int) -> bytes:
        buffer, position = self._buffer, self._position
        if position >= len(buffer):
            buffer = self._sock.recv(max(size, self.chunk))  # BlockingIOError passes to paho
            if not buffer:
                return buffer  # end of stream
            _quick_ack(self._sock)
            self._buffer, position = buffer, 0
        end = position + size
        self._position = end
        return buffer[position:end]

    def pending(self) -> int:
        inner = getattr(self._sock, "pending", None)
        return max(0, len(self._buffer) - self._position) + (inner() if inner else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def _quick_ack(sock: Any) -> None:
    """Acknowledge what was just read at once (Linux; re-armed after every read).

    Why: a broker with Nagle on (mosquitto's default, ``set_tcp_nodelay false``) holds each
    small PUBACK until our ACK of the previous one, and our delayed ACK waits up to 40 ms: a
    sink waiting for the last PUBACKs of a batch lost ~50 ms a batch to this.
    """
    if _QUICKACK is not None:
        with contextlib.suppress(OSError, AttributeError, TypeError):
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)


class _BufferedClient(paho.Client):
    """paho's client reading through a ``_ReadBuffer`` (``_create_socket`` is paho's hook where
    it wraps the socket itself for TLS and websockets)."""

    def _create_socket(self) -> Any:
        sock = super()._create_socket()
        with contextlib.suppress(OSError, AttributeError):  # TLS wrappers pass it through
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _ReadBuffer(sock)


@dataclass
class _Pending:
    """QoS > 0 publications waiting for the broker's PUBACK/PUBCOMP, by message id."""

    by_mid: dict[int, defer.Deferred] = field(default_factory=dict)


class MqttClient:
    """One MQTT connection run by the reactor; reconnects, resubscribes and probes by itself.

    ``start()`` returns at once: the client connects in the background and keeps trying with
    backoff, so a broker that is down at start (or later) only delays delivery. Messages on the
    subscriptions go to ``on_message(topic, payload, qos, retain)`` on the reactor thread. With
    ``manual_ack`` a QoS 1/2 message is acknowledged only once the Deferred the handler returned
    has fired (the handler makes the message durable first); otherwise at once.
    """

    #: How often ``loop_misc`` runs (keepalive) at most; shorter when the probe needs it.
    tick_interval = 1.0
    #: A connection that lasted this long resets the backoff to ``reconnect_initial``.
    stable_after = 10.0
    #: Seconds after a QoS 1 message could not be stored before the client reconnects, so that
    #: the broker delivers it again (MQTT 3.1.1 redelivers unacknowledged messages on reconnect).
    redeliver_after = 10.0
    #: Packets read per reactor wake-up before other work gets its turn.
    max_reads_per_wakeup = 512

    def __init__(
        self,
        reactor: Any,
        config: BrokerConfig,
        *,
        client_id: str | None = None,
        on_message: MessageHandler | None = None,
        subscriptions: Sequence[tuple[str, int]] = (),
        will: Will | None = None,
        manual_ack: bool = False,
        name: str = "mqtt",
        log: Logger | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.reactor = reactor
        self.config = config
        #: host:port of the broker and its fallbacks; the client connects to the current one.
        self._addresses = [(config.host, config.port)] + [
            split_host_port(address) for address in config.fallbacks
        ]
        self._address_index = 0
        self.client_id = client_id or config.client_id
        if not self.client_id:
            raise ValueError("an MQTT client needs a client_id")
        self.name = name
        self.log = log or Logger(namespace=f"gatewayd.mqtt.{name}")
        self.on_message = on_message
        self.subscriptions: dict[str, int] = dict(subscriptions)
        self.will = will
        self.manual_ack = manual_ack
        self.probe_topic = config.probe_topic or f"gatewayd/probe/{self.client_id}"
        self.probe_enabled = config.probe_interval > 0
        self.state = STOPPED
        self.stats = LinkStats()
        self.connected_since: float | None = None
        self._rng = rng or random.Random()
        self._policy = backoffPolicy(
            initialDelay=config.reconnect_initial,
            maxDelay=config.reconnect_max,
            factor=2.0,
            jitter=lambda: self._rng.uniform(0, config.reconnect_initial),
        )
        self._failures = 0
        self._not_durable_log = LogThrottle(reactor.seconds)
        self._generation = 0  # bumped per connection: acks never cross connections
        self._client: paho.Client | None = None
        self._descriptor: _SocketDescriptor | None = None
        self._connecting: defer.Deferred | None = None
        self._reconnect_call: Any = None
        self._connack_call: Any = None
        self._tick_call: Any = None
        self._redeliver_call: Any = None
        self._last_inbound = 0.0
        self._probe_sent_at: float | None = None
        self._probe_ok = True
        self._packets = 0
        #: Messages paho delivered during the current read burst (None outside ``_readable``).
        self._inbox: list[tuple[str, bytes, int, bool, int, int]] | None = None
        self._sub_mids: dict[int, list[str]] = {}
        self._refused: str | None = None
        self._pending = _Pending()
        self._waiters: list[defer.Deferred] = []
        self._sub_waiters: list[defer.Deferred] = []
        self._listeners: list[Callable[[str], None]] = []
        self._stop_waiters: list[defer.Deferred] | None = None  # None: not stopped

    # --- public API ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True between the broker's CONNACK and the loss of the connection."""
        return self.state == CONNECTED

    @property
    def address(self) -> str:
        """``host:port`` of the broker (for logs and health output)."""
        host, port = self._addresses[self._address_index]
        return f"{host}:{port}"

    def start(self) -> None:
        """Begin connecting (in the background). Raises at once only for a bad TLS setup."""
        if self._stop_waiters is not None:
            raise MqttError("a stopped MQTT client cannot be started again; make a new one")
        if self.state != STOPPED:
            return
        self._client = self._make_client()
        self._set_state(WAITING)
        self._tick_call = self.reactor.callLater(self._tick_period(), self._tick)
        self._connect()

    def stop(self) -> defer.Deferred:
        """Disconnect cleanly (DISCONNECT: no last will) and stop reconnecting."""
        done: defer.Deferred = defer.Deferred()
        if self._stop_waiters is not None:  # stopping or stopped already
            if self._stop_waiters:
                self._stop_waiters.append(done)
            else:
                done.callback(None)
            return done
        self._stop_waiters = [done]
        previous = self.state
        self._set_state(STOPPED)
        for call in (
            self._reconnect_call,
            self._connack_call,
            self._tick_call,
            self._redeliver_call,
        ):
            if call is not None and call.active():
                call.cancel()
        self._reconnect_call = self._connack_call = self._tick_call = None
        self._redeliver_call = None
        self._fail_pending(NotConnected("the MQTT client was stopped"))
        if self._connecting is not None:
            # A connect is running in a thread; close its socket once it returns.
            self._connecting.addBoth(lambda _: self._close_socket())
            self._connecting.addBoth(lambda _: self._stop_finished())
            return done
        # Not now: stop() may be called from inside a paho callback (a message handler), where
        # paho holds a lock that disconnecting needs again.
        self.reactor.callLater(0, self._disconnect, previous == CONNECTED)
        return done

    def _stop_finished(self) -> None:
        waiters, self._stop_waiters = self._stop_waiters or [], []
        for d in waiters:
            d.callback(None)

    def _disconnect(self, send_disconnect: bool) -> None:
        if send_disconnect and self._client is not None and self._descriptor is not None:
            try:
                self._client.disconnect()
                self._client.loop_write()  # DISCONNECT now, while the socket is writable
            except Exception:  # a broken socket: closing it below is all that is left to do
                pass
        self._close_socket()
        self._stop_finished()

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False):
        """Send one message; raises NotConnected when the link is down.

        Returns a Deferred: QoS 0 fires at once, QoS 1/2 when the broker acknowledged it (paho
        re-sends it after a reconnect until then). It fails if the client is stopped first.
        """
        if self.state != CONNECTED or self._client is None:
            raise NotConnected(f"not connected to {self.address} (state {self.state})")
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            self.stats.publish_failures += 1
            raise MqttError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        self.stats.messages_out += 1
        if qos == 0:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._pending.by_mid[info.mid] = d
        return d

    def drop(self, reason: str = "dropped on request") -> None:
        """Close the connection without DISCONNECT (the broker publishes the will), then
        reconnect as after any loss. Simulators use it to play a gateway that loses power."""
        self._abort(reason)

    def subscribe(self, topic: str, qos: int = 0) -> None:
        """Add a subscription (kept across reconnects); sent now if connected."""
        self.subscriptions[topic] = qos
        if self.connected and self._client is not None:
            self._send_subscribe([(topic, qos)])

    def when_connected(self) -> defer.Deferred:
        """Fires (with None) when the client is connected: now, or at the next CONNACK."""
        if self.connected:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred(lambda d: self._waiters.remove(d))
        self._waiters.append(d)
        return d

    @property
    def subscribed(self) -> bool:
        """Connected, and the broker acknowledged every subscription of this connection."""
        return self.connected and not self._sub_mids

    def when_subscribed(self) -> defer.Deferred:
        """Fires once ``subscribed`` is true (now, or after the next SUBACKs)."""
        if self.subscribed:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred(lambda d: self._sub_waiters.remove(d))
        self._sub_waiters.append(d)
        return d

    def add_state_listener(self, listener: Callable[[str], None]) -> None:
        """``listener(state)`` on every change of ``state`` (on the reactor thread)."""
        self._listeners.append(listener)

    def register_metrics(self, metrics: Any, prefix: str = "mqtt_") -> None:
        """Publish the link's state and counters as gauges of a ``PluginMetrics``."""
        stats = self.stats
        gauges = {
            "connected": ("1 while connected to the MQTT broker", lambda: float(self.connected)),
            "state": (
                "MQTT link state: 0 stopped, 1 connecting, 2 connected, 3 waiting to reconnect",
                lambda: STATE_CODES[self.state],
            ),
            "connect_attempts": ("MQTT connection attempts", lambda: stats.connect_attempts),
            "connects": ("Successful MQTT connections (CONNACK)", lambda: stats.connects),
            "connect_failures": (
                "MQTT connection attempts that failed",
                lambda: stats.connect_failures,
            ),
            "disconnects": ("MQTT connections lost or dropped", lambda: stats.disconnects),
            "silent_disconnects": (
                "Connections dropped because the broker delivered nothing (probe)",
                lambda: stats.silent_disconnects,
            ),
            "messages_in": ("MQTT messages received", lambda: stats.messages_in),
            "messages_out": ("MQTT messages published", lambda: stats.messages_out),
            "publish_failures": (
                "MQTT publishes paho refused (its outgoing queue full)",
                lambda: stats.publish_failures,
            ),
            "handler_errors": (
                "Received MQTT messages whose handler raised",
                lambda: stats.handler_errors,
            ),
            "not_durable": (
                "Received MQTT messages whose events could not be stored",
                lambda: stats.not_durable,
            ),
        }
        for key, (help_text, read) in gauges.items():
            metrics.gauge(prefix + key, help_text, read)

    # --- paho client setup -----------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        config = self.config
        client = _BufferedClient(
            paho.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=config.clean_session,
            protocol=paho.MQTTv311,
            reconnect_on_failure=False,
            manual_ack=self.manual_ack,
        )
        client.suppress_exceptions = True
        client.connect_timeout = config.connect_timeout
        client.max_queued_messages_set(config.max_queued_messages)
        if config.username is not None:
            password = config.password.get_secret_value() if config.password else None
            client.username_pw_set(config.username, password)
        if config.tls is not None:
            tls = config.tls
            client.tls_set(
                ca_certs=tls.ca_file,
                certfile=tls.cert_file,
                keyfile=tls.key_file,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            if tls.insecure:
                client.tls_insecure_set(True)
        if self.will is not None:
            will = self.will
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_paho_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        client.connect_async(config.host, config.port, keepalive=round(config.keepalive))
        return client

    # --- connecting ------------------------------------------------------------------------

    def _connect(self) -> None:
        self._reconnect_call = None
        if self.state == STOPPED or self._client is None:
            return
        self._set_state(CONNECTING)
        self.stats.connect_attempts += 1
        client = self._client
        if len(self._addresses) > 1:
            # paho's host/port setters refuse while its state says "connection lost", but the
            # socket is closed here and reconnect() reads these two (paho < 3, as pinned).
            client._host, client._port = self._addresses[self._address_index]
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), client.reconnect)
        self._connecting = d
        d.addCallbacks(self._socket_open, self._connect_failed)
        d.addErrback(self._connect_bug)

    def _connect_bug(self, failure: Any) -> None:
        """An error in our own connect handling (not the network's): log it, retry later."""
        self.log.failure("MQTT {name}: unexpected error while connecting", failure, name=self.name)
        if self.state != STOPPED:
            self._connect_failed_with(f"unexpected error: {failure.getErrorMessage()}")

    def _socket_open(self, rc: Any) -> None:
        self._connecting = None
        client = self._client
        if self.state == STOPPED or client is None:
            return
        if rc != paho.MQTT_ERR_SUCCESS:
            self._connect_failed_with(f"CONNECT not sent: {paho.error_string(rc)}")
            return
        sock = client.socket()
        if sock is None:
            self._connect_failed_with("no socket after connect")
            return
        self._descriptor = _SocketDescriptor(self, sock)
        self.reactor.addReader(self._descriptor)
        if client.want_write():
            self.reactor.addWriter(self._descriptor)
        self._connack_call = self.reactor.callLater(
            self.config.connect_timeout, self._abort, "no CONNACK from the broker in time"
        )

    def _connect_failed(self, failure: Any) -> None:
        self._connecting = None
        if self.state == STOPPED:
            return
        error = failure.value
        self._connect_failed_with(describe_error(error))

    def _connect_failed_with(self, message: str) -> None:
        self.stats.connect_failures += 1
        self.stats.last_error = message
        self._close_socket()
        delay = self._next_delay()
        self.log.warn(
            "MQTT {name}: cannot connect to {address}: {error}; retrying in {delay:.1f} s",
            name=self.name,
            address=self.address,
            error=message,
            delay=delay,
        )
        self._next_address()
        self._schedule_reconnect(delay)

    def _next_delay(self) -> float:
        delay = self._policy(self._failures)
        self._failures += 1
        return delay

    def _schedule_reconnect(self, delay: float) -> None:
        if self.state == STOPPED:
            return
        self._set_state(WAITING)
        self._reconnect_call = self.reactor.callLater(delay, self._connect)

    # --- paho callbacks (reactor thread, except where noted) -------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if self._connack_call is not None and self._connack_call.active():
            self._connack_call.cancel()
        self._connack_call = None
        if reason.is_failure:
            # paho closes the socket next and calls on_disconnect, which schedules the retry.
            self._refused = f"broker refused the connection: {reason}"
            self.log.error(
                "MQTT {name}: {address} refused the connection: {reason}",
                name=self.name,
                address=self.address,
                reason=str(reason),
            )
            return
        self._generation += 1
        self.stats.connects += 1
        self.connected_since = self.reactor.seconds()
        self._last_inbound = self.connected_since
        self._probe_sent_at = None
        self._probe_ok = True
        self._set_state(CONNECTED)
        self.log.info(
            "MQTT {name}: connected to {address} as {client_id} (session present: {session})",
            name=self.name,
            address=self.address,
            client_id=self.client_id,
            session=bool(getattr(flags, "session_present", False)),
        )
        wanted = list(self.subscriptions.items())
        if self.probe_enabled:
            wanted.append((self.probe_topic, 0))
        if wanted:
            self._send_subscribe(wanted)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)
        self._fire_sub_waiters()

    def _send_subscribe(self, topics: list[tuple[str, int]]) -> None:
        assert self._client is not None
        rc, mid = self._client.subscribe(topics)
        if rc == paho.MQTT_ERR_SUCCESS and mid is not None:
            self._sub_mids[mid] = [topic for topic, _ in topics]
        else:
            self.log.error(
                "MQTT {name}: subscribe failed: {error}",
                name=self.name,
                error=paho.error_string(rc),
            )

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        topics = self._sub_mids.pop(mid, [])
        for topic, code in zip(topics, codes, strict=False):
            if code.is_failure:
                self.log.error(
                    "MQTT {name}: the broker refused the subscription to {topic}: {code}",
                    name=self.name,
                    topic=topic,
                    code=str(code),
                )
                if topic == self.probe_topic:
                    self._probe_ok = False  # cannot probe on this connection; keepalive only
        self._fire_sub_waiters()

    def _fire_sub_waiters(self) -> None:
        if self.subscribed:
            waiters, self._sub_waiters = self._sub_waiters, []
            for d in waiters:
                d.callback(None)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any):
        refused, self._refused = self._refused, None
        self._lost(refused or f"connection lost: {reason}")

    def _on_paho_message(self, client: Any, userdata: Any, message: Any) -> None:
        self._packets += 1
        self._last_inbound = self.reactor.seconds()
        self._probe_sent_at = None
        qos = message.qos
        try:
            topic = message.topic
        except UnicodeDecodeError:  # a topic that is not UTF-8: nobody can route it
            self.stats.handler_errors += 1
            self.log.warn("MQTT {name}: dropped a message whose topic is not UTF-8", name=self.name)
            if qos and self.manual_ack:
                client.ack(message.mid, qos)
            return
        if topic == self.probe_topic:
            if qos:
                client.ack(message.mid, qos)
            return
        self.stats.messages_in += 1
        inbound = (topic, message.payload, qos, message.retain, message.mid, self._generation)
        if self._inbox is None:  # not inside _readable (paho delivered from elsewhere)
            self._deliver([inbound])
        else:
            self._inbox.append(inbound)

    def _deliver(self, inbox: list[tuple[str, bytes, int, bool, int, int]]) -> None:
        """Hand received messages to ``on_message`` in order; acknowledge QoS 1/2 ones.

        ``_readable`` lets paho parse a whole burst of packets first and then delivers the
        burst here: paho's code and the handler's each stay hot in the CPU caches for hundreds
        of messages instead of alternating per message, and handlers run outside paho's locks.
        """
        handler = self.on_message
        for topic, payload, qos, retain, mid, generation in inbox:
            result = None
            if handler is not None:
                try:
                    result = handler(topic, payload, qos, retain)
                except Exception:
                    self.stats.handler_errors += 1
                    self.log.failure("MQTT {name}: message handler failed", name=self.name)
                    result = None
            if qos and self.manual_ack:
                if isinstance(result, defer.Deferred):
                    result.addBoth(self._ack_later, mid, qos, generation)
                else:
                    self._ack_later(None, mid, qos, generation)
            # QoS 0: nothing to acknowledge. An event that fails to store is counted and
            # logged by its queue (``DurableQueue._fail``): no per-message errback here, and
            # handlers return Deferreds that fail only for such an event.

    def _not_durable(self, failure: Any, mid: int) -> None:
        """A message whose events could not be stored: counted, logged at most every 10 s."""
        self.stats.handler_errors += 1
        self.stats.not_durable += 1
        if self._not_durable_log.due():
            self.log.error(
                "MQTT {name}: message {mid} was not made durable ({count} so far): {error}",
                name=self.name,
                mid=mid,
                count=self.stats.not_durable,
                error=getattr(failure, "getErrorMessage", lambda: str(failure))(),
            )

    def _ack_later(self, result: Any, mid: int, qos: int, generation: int) -> None:
        """Acknowledge once the handler's work is durable; never on a later connection.

        A message whose events could not be stored (a full disk) is not acknowledged: the broker
        keeps it, and ``redeliver_after`` seconds later the client reconnects so that the broker
        delivers it again. Acknowledging it would lose it.
        """
        if isinstance(result, Exception) or hasattr(result, "getErrorMessage"):
            self._not_durable(result, mid)
            if qos and generation == self._generation:
                self._redeliver_later()
            return None
        if generation == self._generation and self.connected and self._client is not None:
            self._client.ack(mid, qos)
        return None

    def _redeliver_later(self) -> None:
        if self._redeliver_call is None or not self._redeliver_call.active():
            self._redeliver_call = self.reactor.callLater(self.redeliver_after, self._redeliver)

    def _redeliver(self) -> None:
        self._redeliver_call = None
        if self.state == CONNECTED:
            self._abort("reconnecting: the broker delivers the messages that were not stored again")

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        d = self._pending.by_mid.pop(mid, None)
        if d is not None:
            d.callback(None)

    def _on_socket_close(self, client: Any, userdata: Any, sock: Any) -> None:
        # Also called from the connect thread (reconnect() closes the old socket first); the
        # reactor side has let go of that socket already.
        if not threadable.isInIOThread():
            return
        descriptor = self._descriptor
        if descriptor is not None and descriptor.sock is sock:
            self._unregister()

    def _on_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        if not threadable.isInIOThread():
            return  # the connect thread queued CONNECT; _socket_open adds the writer
        if self._descriptor is not None:
            self.reactor.addWriter(self._descriptor)

    def _on_unregister_write(self, client: Any, userdata: Any, sock: Any) -> None:
        if threadable.isInIOThread() and self._descriptor is not None:
            self.reactor.removeWriter(self._descriptor)

    # --- socket events from the reactor ----------------------------------------------------

    def _readable(self, descriptor: _SocketDescriptor) -> None:
        client = self._client
        if descriptor is not self._descriptor or client is None:
            return
        self._inbox = inbox = []
        try:
            self._read_burst(client, descriptor)
        except Exception as exc:
            self.log.failure("MQTT {name}: error reading from the broker", name=self.name)
            self._abort(f"read error: {exc!r}")
        finally:
            self._inbox = None
            if inbox:
                self._deliver(inbox)

    def _read_burst(self, client: paho.Client, descriptor: _SocketDescriptor) -> None:
        """Let paho read packets until the socket has no more, or max_reads_per_wakeup."""
        pending = descriptor.sock.pending  # paho's socket is always our _ReadBuffer
        for _ in range(self.max_reads_per_wakeup):
            before = self._packets
            rc = client.loop_read()
            if rc != paho.MQTT_ERR_SUCCESS or self._descriptor is not descriptor:
                return
            if self._packets == before and not pending():
                return
        if pending():  # buffered or TLS bytes the fd will not announce again
            self.reactor.callLater(0, self._readable, descriptor)

    def _writable(self, descriptor: _SocketDescriptor) -> None:
        client = self._client
        if descriptor is not self._descriptor or client is None:
            return
        try:
            client.loop_write()
        except Exception as exc:
            self.log.failure("MQTT {name}: error writing to the broker", name=self.name)
            self._abort(f"write error: {exc!r}")

    def _descriptor_lost(self, descriptor: _SocketDescriptor, reason: Any) -> None:
        if descriptor is self._descriptor:
            self._abort("socket closed by the reactor")

    # --- timers ----------------------------------------------------------------------------

    def _tick_period(self) -> float:
        period = min(self.tick_interval, self.config.keepalive / 2)
        if self.probe_enabled:
            period = min(period, self.config.probe_interval / 2, self.config.probe_timeout / 2)
        return max(period, 0.01)

    def _tick(self) -> None:
        self._tick_call = None
        if self.state == STOPPED:
            return
        try:
            if self.state == CONNECTED and self._client is not None:
                self._client.loop_misc()  # PINGREQ, and the keepalive deadline
                if self.state == CONNECTED:
                    self._probe(self.reactor.seconds())
        except Exception:
            self.log.failure("MQTT {name}: housekeeping failed", name=self.name)
        if self.state != STOPPED:
            self._tick_call = self.reactor.callLater(self._tick_period(), self._tick)

    def _probe(self, now: float) -> None:
        if not (self.probe_enabled and self._probe_ok):
            return
        config = self.config
        if self._probe_sent_at is not None:
            if now - self._probe_sent_at >= config.probe_timeout:
                self.stats.silent_disconnects += 1
                self._abort(
                    f"the broker delivered nothing for {now - self._last_inbound:.1f} s, "
                    f"not even our probe on {self.probe_topic}"
                )
            return
        if now - self._last_inbound >= config.probe_interval and self._client is not None:
            self._client.publish(self.probe_topic, repr(now).encode(), qos=0)
            self._probe_sent_at = now

    # --- losing the connection -------------------------------------------------------------

    def _abort(self, reason: str) -> None:
        """Drop the connection ourselves (no DISCONNECT, so the broker publishes our will)."""
        if self.state in (STOPPED, WAITING) or (self.state == CONNECTING and not self._descriptor):
            return
        self._close_socket()
        self._lost(reason)

    def _next_address(self) -> None:
        """After a failure, the next connect goes to the next node (with fallbacks)."""
        self._address_index = (self._address_index + 1) % len(self._addresses)

    def _lost(self, reason: str) -> None:
        if self.state == STOPPED:
            return
        was_connected = self.state == CONNECTED
        self._unregister()
        self._sub_mids.clear()  # never acknowledged now; on_connect subscribes again
        if self._connack_call is not None and self._connack_call.active():
            self._connack_call.cancel()
        self._connack_call = None
        self.stats.last_error = reason
        if was_connected:
            self.stats.disconnects += 1
            uptime = self.reactor.seconds() - (self.connected_since or 0.0)
            if uptime >= self.stable_after:
                self._failures = 0
        else:
            self.stats.connect_failures += 1
        self.connected_since = None
        delay = self._next_delay()
        self.log.warn(
            "MQTT {name}: {what} {address}: {reason}; reconnecting in {delay:.1f} s",
            name=self.name,
            what="disconnected from" if was_connected else "could not connect to",
            address=self.address,
            reason=reason,
            delay=delay,
        )
        self._next_address()
        self._schedule_reconnect(delay)

    def _unregister(self) -> None:
        descriptor, self._descriptor = self._descriptor, None
        if descriptor is not None:
            self.reactor.removeReader(descriptor)
            self.reactor.removeWriter(descriptor)

    def _close_socket(self) -> None:
        """Unregister and close the current socket (paho closes it again harmlessly later)."""
        self._unregister()
        sock = self._client.socket() if self._client is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def _fail_pending(self, error: Exception) -> None:
        pending, self._pending.by_mid = self._pending.by_mid, {}
        for d in pending.values():
            d.errback(error)
        waiters, self._waiters = self._waiters + self._sub_waiters, []
        self._sub_waiters = []
        for d in waiters:
            d.errback(error)

    def _set_state(self, state: str) -> None:
        if state == self.state:
            return
        self.state = state
        for listener in list(self._listeners):
            try:
                listener(state)
            except Exception:
                self.log.failure("MQTT {name}: state listener failed", name=self.name)


def describe_error(error: BaseException) -> str:
    """A short, secret-free description of a connect error (``ECONNREFUSED``, TLS, DNS...)."""
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, socket.gaierror):
        return f"cannot resolve host ({error.strerror or error})"
    if isinstance(error, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(error, ssl.SSLError):
        return f"TLS error: {error.reason or error}"
    if isinstance(error, OSError):
        return error.strerror or type(error).__name__
    return f"{type(error).__name__}: {error}"
