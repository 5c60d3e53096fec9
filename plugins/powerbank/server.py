r"""The TCP side of the power-bank plugin: frame splitting, rate limit, idle timeout, the listener.

Why: a cabinet's GPRS modem delivers a byte stream with noise in it; this module turns it into
candidate frames and keeps each connection within bounds. It does not parse frames (the codec
does) and keeps no cabinet state (``state.CabinetRegistry`` does).

Layers, modeled on ``twisted.protocols.basic``:

``FrameReceiver``
    Splits the stream into frames: a frame ends at ``\n``, ``\r`` or ``"}`` (so frames without a
    terminator are seen at once). Bytes before ``{"`` are modem noise (``AT``, ``+CSQ: 23,99``):
    dropped and counted, as are ASCII lines without any ``{``. More than ``MAX_LENGTH`` bytes
    without a frame end calls ``frameTooLong``. With a ``TokenBucket`` the frames beyond its rate
    wait: reading pauses (TCP pushes back on the sender) and resumes when a token is due, so
    nothing is dropped and a flood costs the daemon only ``rate`` frames per second.
``CabinetConnection``
    One cabinet's connection: TCP keepalive, an idle timeout reset by every frame
    (``TimeoutMixin``), ``send_packet``/``close`` for the registry, events through a handler.
``CabinetServer``
    The factory: ``max_connections`` (further connections are closed at once) and counters.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

from gatewayd.protocols.powerbank import Packet
from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin

from gatewayd.logsetup import LogThrottle

__all__ = ["CabinetConnection", "CabinetHandler", "CabinetServer", "FrameReceiver", "TokenBucket"]

log = Logger(namespace="gatewayd.plugins.powerbank.server")

#: Noise lines (``AT``, ``+CSQ: 23,99``: GPRS modems chatter all day) after which a connection
#: with no valid frame yet is logged; the bytes of its sample; and the seconds between two such
#: lines, whichever connections they are about.
NOISE_SUSPECT = 20
NOISE_SAMPLE = 60
NOISE_LOG_INTERVAL = 10.0
_QUOTED = re.compile(rb'"[^"]*"')


def noise_sample(noise: bytes) -> str:
    """The start of ``noise`` for the log, quoted strings masked (``AT+QICSGP`` carries the APN's
    user and password)."""
    masked = _QUOTED.sub(b'"..."', noise)
    return repr(masked[:NOISE_SAMPLE]) + ("..." if len(masked) > NOISE_SAMPLE else "")


_FRAME_START = b'{"'
#: Where a frame ends: at ``\n``, ``\r`` (or both), and right after ``"}``.
_FRAME_ENDS = re.compile(rb'\r\n|\n|\r|(?<="\})')


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; ``take()`` says how long to wait."""

    __slots__ = ("rate", "burst", "tokens", "stamp", "clock")

    def __init__(self, rate: float, burst: float, clock: Any) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.clock = clock
        self.stamp = clock.seconds()

    def take(self) -> float:
        """Take one token: 0.0 if there was one, else the seconds until one is due (none taken)."""
        now = self.clock.seconds()
        tokens = self.tokens + (now - self.stamp) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) / self.rate


class FrameReceiver(protocol.Protocol):
    """Splits a stream into power-bank frames (see the module docstring); override the hooks.

    Class attributes: ``MAX_LENGTH`` (bytes without a frame end before ``frameTooLong``).
    Instance attributes: ``bucket`` (a ``TokenBucket`` or None), ``clock`` (for resuming).
    """

    MAX_LENGTH = 512
    bucket: TokenBucket | None = None
    clock: Any = None

    _buffer = b""
    _backlog: list[bytes] | None = None  # frames waiting for a token while reading is paused
    _resume_call: Any = None
    _discarding = False  # after frameTooLong: the rest of the stream is ignored

    # --- hooks ----------------------------------------------------------------------------

    def frameReceived(self, frame: bytes) -> None:
        """One candidate frame, from ``{"`` (when present) through ``"}``, no terminator."""
        raise NotImplementedError

    def frameTooLong(self, data: bytes) -> None:
        """More than ``MAX_LENGTH`` bytes without a frame end; the default closes the connection."""
        self.transport.loseConnection()

    def noiseReceived(self, noise: bytes) -> None:
        """Bytes that cannot be part of a frame (modem chatter); ignored by default."""

    def framesDelayed(self, seconds: float) -> None:
        """The rate limit paused reading for ``seconds``; ignored by default."""

    # --- framing --------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._buffer:
            data = self._buffer + data
        parts = _FRAME_ENDS.split(data)
        tail = parts.pop()  # after the last frame end: not complete yet
        frames: list[bytes] = []
        limit = self.MAX_LENGTH  # per frame: back-to-back frames in one read are fine
        for part in parts:
            if len(part) > limit:
                self._deliver(frames)
                return self._too_long(part)
            self._candidate(part, frames)
        if len(tail) > limit:
            self._deliver(frames)
            return self._too_long(tail)
        self._buffer = tail
        self._deliver(frames)

    def _candidate(self, part: bytes, frames: list[bytes]) -> None:
        """Resynchronise on ``{"``: keep a frame, report noise."""
        part = part.strip()
        if not part:
            return
        start = part.find(_FRAME_START)
        if start == 0:
            frames.append(part)
            return
        if start > 0:
            self.noiseReceived(part[:start].rstrip())
            frames.append(part[start:])
            return
        if part.isascii() and b"{" not in part:
            self.noiseReceived(part)
        else:  # perhaps full-width punctuation ({“...”}): the codec decides
            frames.append(part)

    def _too_long(self, data: bytes) -> None:
        self._discarding = True
        self._buffer = b""
        self._backlog = None
        self.frameTooLong(data[: self.MAX_LENGTH])

    # --- rate limit ------------------------------------------------------------------------

    def _deliver(self, frames: list[bytes]) -> None:
        if self._backlog is not None:  # still paused: keep order
            self._backlog.extend(frames)
            return
        bucket = self.bucket
        for index, frame in enumerate(frames):
            if self._discarding:
                return
            if bucket is not None:
                wait = bucket.take()
                if wait > 0.0:
                    self._pause(frames[index:], wait)
                    return
            self.frameReceived(frame)

    def _pause(self, backlog: list[bytes], wait: float) -> None:
        self._backlog = backlog
        self.transport.pauseProducing()
        self._resume_call = self.clock.callLater(wait, self._resume)
        self.framesDelayed(wait)

    def _resume(self) -> None:
        self._resume_call = None
        backlog, self._backlog = self._backlog or [], None
        self._deliver(backlog)
        if self._backlog is None and not self._discarding:
            self.transport.resumeProducing()

    def connectionLost(self, reason: Any = None) -> None:
        if self._resume_call is not None and self._resume_call.active():
            self._resume_call.cancel()
        self._resume_call = None
        self._backlog = None


class CabinetHandler(Protocol):
    """What a ``CabinetConnection`` reports to (the plugin)."""

    def frame_received(self, conn: CabinetConnection, frame: bytes) -> None: ...

    def frame_too_long(self, conn: CabinetConnection, data: bytes) -> None: ...

    def connection_lost(self, conn: CabinetConnection, reason: str) -> None: ...

    def encode(self, packet: Packet) -> bytes: ...


#: Close reasons for which the peer is presumed gone: abort instead of waiting to flush.
_ABORT_REASONS = frozenset({"replaced", "idle_timeout"})


class CabinetConnection(FrameReceiver, TimeoutMixin):
    """One cabinet's TCP connection; ``imei`` is set by the registry on the first valid frame."""

    def __init__(self, server: CabinetServer) -> None:
        self.server = server
        self.handler = server.handler
        self.MAX_LENGTH = server.max_line
        self.clock = server.clock
        self.callLater = server.clock.callLater  # TimeoutMixin schedules through this
        if server.rate is not None:
            self.bucket = TokenBucket(server.rate, server.burst, server.clock)
        self.imei: str | None = None
        self.address = "?"
        self.close_reason: str | None = None
        self.crc_warned = False
        self.noise_lines = 0

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.address = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        keepalive = getattr(self.transport, "setTcpKeepAlive", None)
        if keepalive is not None:
            keepalive(1)
        self.server.connections.add(self)
        self.setTimeout(self.server.idle_timeout)

    def frameReceived(self, frame: bytes) -> None:
        if self.close_reason is not None:
            return  # closing (refused, replaced...): the rest of what it sent is not handled
        self.resetTimeout()
        self.handler.frame_received(self, frame)

    def frameTooLong(self, data: bytes) -> None:
        self.server.lines_too_long += 1
        self.handler.frame_too_long(self, data)
        self.close("line_too_long")

    def noiseReceived(self, noise: bytes) -> None:
        self.server.noise_received(self, noise)

    def framesDelayed(self, seconds: float) -> None:
        self.server.rate_limited += 1

    def timeoutConnection(self) -> None:
        self.close("idle_timeout")

    def send_packet(self, packet: Packet) -> None:
        """Build ``packet`` with the plugin's CRC settings and write it."""
        self.transport.write(self.handler.encode(packet))

    def close(self, reason: str) -> None:
        """Close with ``reason`` (reported in ``device.offline``); the first reason given wins."""
        if self.close_reason is not None:
            return
        self.close_reason = reason
        if reason in _ABORT_REASONS:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        FrameReceiver.connectionLost(self, reason)
        self.setTimeout(None)
        self.server.connection_closed(self)
        self.handler.connection_lost(self, self.close_reason or "closed")


class CabinetServer(protocol.ServerFactory):
    """Builds ``CabinetConnection``s up to ``max_connections``; keeps the live ones and counters.

    ``rate``/``burst``: the per-connection frame rate limit (None: unlimited). ``idle_timeout``:
    seconds without a frame before the connection is closed (None: never).
    """

    noisy = False  # no "Starting factory" log lines

    def __init__(
        self,
        handler: CabinetHandler,
        clock: Any,
        *,
        max_line: int = 512,
        max_connections: int = 20000,
        idle_timeout: float | None = 180.0,
        rate: float | None = 20.0,
        burst: float = 40.0,
    ) -> None:
        self.handler = handler
        self.clock = clock
        self.max_line = max_line
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.rate = rate
        self.burst = burst
        self.connections: set[CabinetConnection] = set()
        self.refused = 0
        self.lines_too_long = 0
        self.noise = 0
        self.rate_limited = 0
        self._empty_waiters: list[defer.Deferred] = []
        self._refusal_log = LogThrottle(clock.seconds)
        self._noise_log = LogThrottle(clock.seconds, NOISE_LOG_INTERVAL)

    def buildProtocol(self, addr: Any) -> CabinetConnection | None:
        if len(self.connections) >= self.max_connections:
            self.refused += 1
            if self._refusal_log.due():
                log.warn(
                    "max_connections ({limit}) reached: refusing connections "
                    "({refused} refused so far)",
                    limit=self.max_connections,
                    refused=self.refused,
                )
            return None
        return CabinetConnection(self)

    def noise_received(self, conn: CabinetConnection, noise: bytes) -> None:
        """Count modem noise. A connection that sent ``NOISE_SUSPECT`` noise lines and still no
        valid frame is logged once with a sample: a cabinet whose every line is taken for noise
        (another protocol, a broken encoding) must be findable without a capture."""
        self.noise += 1
        conn.noise_lines += 1
        if conn.noise_lines == NOISE_SUSPECT and conn.imei is None and self._noise_log.due():
            log.warn(
                "cabinet at {address} sent {count} lines the codec cannot use and no valid frame "
                "yet (another protocol or encoding?); the last: {sample}",
                address=conn.address,
                count=conn.noise_lines,
                sample=noise_sample(noise),
            )

    def connection_closed(self, conn: CabinetConnection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            waiters, self._empty_waiters = self._empty_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def close_all(self, reason: str, timeout: float = 2.0) -> defer.Deferred:
        """Close every connection; fires when all are gone (stragglers aborted at ``timeout``)."""
        if not self.connections:
            return defer.succeed(None)
        done: defer.Deferred = defer.Deferred()
        self._empty_waiters.append(done)
        for conn in list(self.connections):
            conn.close(reason)

        def abort_stragglers() -> None:
            for conn in list(self.connections):
                conn.transport.abortConnection()

        straggler_call = self.clock.callLater(timeout, abort_stragglers)

        def finished(result: Any) -> Any:
            if straggler_call.active():
                straggler_call.cancel()
            return result

        return done.addBoth(finished)
