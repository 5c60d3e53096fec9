"""``GET /api/v1/events/stream``: events as they are routed, as Server-Sent Events.

``?plugin=GLOB&type=GLOB&device=GLOB`` filter with the shell-style globs routes use
(``gatewayd.pipeline.glob_matcher``). Each event is one ``data:`` line holding its JSON envelope;
``: connected`` comes at once and ``: keepalive`` every 15 s so proxies and browsers keep the
connection.

The stream must never slow the pipeline: the daemon calls ``EventStream.offer`` for every event
(``daemon.watch_events``), and it only writes to the socket or appends to a bounded queue. The
stream is a push producer on its request, so Twisted tells it when the client stops keeping up
(``pauseProducing``); events then wait in the queue, and a client that lets more than
``max_pending_events`` events or ``max_pending_bytes`` bytes pile up is told why
(``event: error``) and disconnected. At most ``api.max_streams`` streams are open at once (429
beyond); ``ApiState.close_streams()`` ends them all when the daemon stops.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import task
from twisted.internet.interfaces import IPushProducer
from twisted.web import server
from zope.interface import implementer

from gatewayd.api.base import ApiState, JsonResource
from gatewayd.api.common import HttpError, check_arguments, encode_json, log, query_text
from gatewayd.events import Event
from gatewayd.pipeline import encode_event, glob_matcher

#: Query arguments of the stream: each a glob over the event field of the same name.
STREAM_ARGUMENTS = ("plugin", "type", "device")


def event_filter(patterns: dict[str, str | None]) -> Callable[[Event], bool] | None:
    """A predicate for events whose fields match every glob given (``{"plugin": "cab*"}``);
    None when nothing is filtered. A missing device matches as the empty string, as in routes."""
    matchers = []
    for field, pattern in patterns.items():
        match = glob_matcher(pattern)
        if match is not None:
            matchers.append((field, match))
    if not matchers:
        return None

    def matches(event: Event) -> bool:
        return all(match(getattr(event, field) or "") for field, match in matchers)

    return matches


class EventsResource(JsonResource):
    """``/api/v1/events``: parent of ``stream``."""

    def __init__(self, api: ApiState) -> None:
        super().__init__(api)
        self.putChild(b"stream", EventStreamResource(api))


class EventStreamResource(JsonResource):
    """``GET /api/v1/events/stream[?plugin=GLOB][&type=GLOB][&device=GLOB]``."""

    def render_GET(self, request: server.Request) -> Any:
        check_arguments(request, STREAM_ARGUMENTS)
        match = event_filter({name: query_text(request, name) for name in STREAM_ARGUMENTS})
        watch = getattr(self.api.daemon, "watch_events", None)
        if watch is None:
            raise HttpError(503, "unavailable", "this daemon does not stream its events")
        limit = self.api.config.max_streams
        if len(self.api.streams) >= limit:
            raise HttpError(
                429,
                "too_many_streams",
                f"{len(self.api.streams)} event streams are open, the most api.max_streams "
                f"allows ({limit}); close one and retry",
            )
        EventStream.set_headers(request)
        if request.method == b"HEAD":
            return b""
        EventStream(self.api, request, match).start()
        return server.NOT_DONE_YET


@implementer(IPushProducer)
class EventStream:
    """One client's stream: a push producer on its request with a bounded queue."""

    #: Seconds between ``: keepalive`` comments.
    keepalive_interval = 15.0
    #: A client with more than this many events, or bytes, waiting is disconnected.
    max_pending_events = 1000
    max_pending_bytes = 1 << 20
    #: Seconds a closed stream's last bytes may wait for the client before the connection is
    #: dropped (a client that reads nothing would otherwise hold it forever).
    close_grace = 5.0

    def __init__(
        self, api: ApiState, request: server.Request, match: Callable[[Event], bool] | None
    ) -> None:
        self.api = api
        self.request = request
        self.match = match
        self.paused = False
        self.open = False
        self.pending: deque[bytes] = deque()
        self.pending_bytes = 0
        self._unwatch: Callable[[], None] | None = None
        self._keepalive = task.LoopingCall(self._ping)
        self._keepalive.clock = api.daemon.reactor

    @staticmethod
    def set_headers(request: server.Request) -> None:
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")  # nginx: pass each event on at once

    def start(self) -> None:
        """Send ``: connected``, then every event routed from now on."""
        self.request.write(b": connected\n\n")
        self.request.registerProducer(self, True)
        self.open = True
        self.api.streams.add(self)
        self._unwatch = self.api.daemon.watch_events(self.offer)
        self.request.notifyFinish().addBoth(self._gone)
        self._keepalive.start(self.keepalive_interval, now=False)

    # --- the watcher: called for every event, in the pipeline's path -----------------------

    def offer(self, event: Event) -> None:
        """Write the event, or queue it while the client is behind; O(1), never raises."""
        if not self.open or (self.match is not None and not self.match(event)):
            return
        self._send(b"data: " + encode_event(event).encode("utf-8") + b"\n\n")

    def _send(self, chunk: bytes) -> None:
        if not self.paused and not self.pending:
            self.request.write(chunk)
            return
        self.pending.append(chunk)
        self.pending_bytes += len(chunk)
        if (
            len(self.pending) > self.max_pending_events
            or self.pending_bytes > self.max_pending_bytes
        ):
            waiting = len(self.pending)
            log.warn(
                "event stream to {peer}: the client is too slow ({waiting} events, {size} bytes "
                "waiting); disconnecting it",
                peer=_peer(self.request),
                waiting=waiting,
                size=self.pending_bytes,
            )
            self.close(f"too slow: {waiting} events waiting")

    def _ping(self) -> None:
        if not self.paused:  # bytes already waiting keep the connection busy enough
            self._send(b": keepalive\n\n")

    # --- IPushProducer: Twisted says whether the socket keeps up ----------------------------

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while self.pending and not self.paused and self.open:
            chunk = self.pending.popleft()
            self.pending_bytes -= len(chunk)
            self.request.write(chunk)

    def stopProducing(self) -> None:
        self._end()

    # --- ending ------------------------------------------------------------------------------

    def close(self, reason: str) -> None:
        """End the stream: a final ``event: error`` naming ``reason``, then close the connection
        (dropped after ``close_grace`` seconds if the client does not read what is left)."""
        if not self.open:
            return
        self._end()
        request = self.request
        if getattr(request, "_disconnected", False) or request.finished:
            return
        channel = request.channel
        request.write(b"event: error\ndata: " + encode_json({"reason": reason}) + b"\n\n")
        request.unregisterProducer()
        request.finish()
        channel.loseConnection()
        transport = channel.transport
        self._keepalive.clock.callLater(self.close_grace, transport.abortConnection)

    def _gone(self, _: Any) -> None:
        """The request finished or the client went away: stop watching."""
        self._end()

    def _end(self) -> None:
        if not self.open:
            return
        self.open = False
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self._keepalive.running:
            self._keepalive.stop()
        self.api.streams.discard(self)
        self.pending.clear()
        self.pending_bytes = 0


def _peer(request: server.Request) -> str:
    address = request.getClientAddress()
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    return f"{host}:{port}" if host is not None else str(address)
