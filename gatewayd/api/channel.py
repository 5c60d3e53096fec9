"""HTTP framing of the control API: request-head and body limits, head timeout, the site."""

from __future__ import annotations

from typing import Any

from twisted.web import server
from twisted.web.http import HTTPChannel

from gatewayd.api.common import JSON_CONTENT_TYPE, error_payload, log


class ApiRequest(server.Request):
    """A request that stops storing its body past the site's ``max_body_bytes`` (answered 413)."""

    body_too_large = False
    _received = 0

    def _limit(self) -> int | None:
        site = getattr(self.channel, "site", None)
        return getattr(site, "max_body_bytes", None)

    def gotLength(self, length: int | None) -> None:
        limit = self._limit()
        if length is not None and limit is not None and length > limit:
            self.body_too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        self._received += len(data)
        limit = self._limit()
        if limit is not None and self._received > limit:
            self.body_too_large = True
            self.content.seek(0)
            self.content.truncate()
            return
        super().handleContentChunk(data)


#: Reason phrases (RFC 9110) of the answers the channel itself sends; Python 3.11's HTTPStatus
#: still calls 414 "Request-URI Too Long".
CHANNEL_REASONS = {
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
}


class ApiChannel(HTTPChannel):
    """An HTTP/1.1 connection that answers an oversized or slow request head with a status.

    Twisted alone drops the connection without a word when one line exceeds ``MAX_LENGTH``,
    answers a bare 400 to a head above ``totalHeadersSize`` or ``maxHeaders``, and restarts its
    idle timeout (``timeOut``, 60 s) with every byte, so one byte every few seconds keeps a
    half-sent head open forever. Here such a head gets 414, 431 or 408 with the API's JSON error
    body; the channel then stops reading requests, lingers ``linger_seconds`` and closes.
    """

    #: Longest request line (method, target, version), in bytes: longer is 414.
    max_request_line = 8192
    #: Most bytes in a request head (request line and header lines, without line ends): more
    #: is 431. Twisted's own default, enforced here first so the answer is 431, not 400.
    totalHeadersSize = 16384
    #: Longest line buffered while waiting for its end: no line may exceed the whole head.
    MAX_LENGTH = totalHeadersSize
    #: Most header fields in one request (Twisted allows 500): more is 431.
    maxHeaders = 100
    #: Seconds a head may take, from the connection (first request) or from its first byte (later
    #: requests on a kept-alive connection): then 408, or a silent close when nothing came. An idle
    #: kept-alive connection is left to ``timeOut``. 0 or None: no limit.
    header_timeout: float | None = 10.0
    #: Seconds the channel keeps reading, and discarding, after a refusal before it closes: closing
    #: with the client's data unread would send a TCP reset that can destroy the answer in flight.
    linger_seconds = 2.0

    _awaiting_head = True  # between requests, or inside a request head
    _in_headers = False  # the current head's request line has arrived
    _head_started = False  # a byte of the current head has arrived
    _head_bytes = 0
    _header_fields = 0
    _head_timer: Any = None
    _linger_timer: Any = None
    _refused = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm_head_timer()

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return  # lingering after an answer: the rest of the request is not read
        if self._awaiting_head and data:
            self._head_started = True
            if self._head_timer is None:
                self._arm_head_timer()
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if not self._in_headers:
            if len(line) > self.max_request_line:
                return self._refuse_line()
            self._in_headers = bool(line)  # Twisted skips one empty line before a request
        self._head_bytes += len(line)
        if self._head_bytes > self.totalHeadersSize:
            return self._refuse_head()
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        """A line longer than ``MAX_LENGTH`` (no end in sight): 414 or 431, not a silent close."""
        if self._in_headers:
            self._refuse_head()
        else:
            self._refuse_line()

    def headerReceived(self, line: bytes) -> bool:
        self._header_fields += 1
        if self._header_fields > self.maxHeaders:
            self._refuse(
                431,
                "headers_too_large",
                f"the request has more than {self.maxHeaders} header fields",
            )
            return False
        return super().headerReceived(line)

    def allHeadersReceived(self) -> None:
        self._awaiting_head = self._in_headers = self._head_started = False
        self._head_bytes = self._header_fields = 0
        self._cancel_head_timer()
        super().allHeadersReceived()

    def requestDone(self, request: Any) -> None:
        if self.persistent:  # before Twisted replays any pipelined bytes of the next request
            self._awaiting_head = True
        super().requestDone(request)

    def connectionLost(self, reason: Any) -> None:
        self._cancel_head_timer()
        if self._linger_timer is not None and self._linger_timer.active():
            self._linger_timer.cancel()
        super().connectionLost(reason)

    def _arm_head_timer(self) -> None:
        if self.header_timeout:
            self._head_timer = self.callLater(self.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None and self._head_timer.active():
            self._head_timer.cancel()
        self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._head_started:
            self._refuse(
                408,
                "request_timeout",
                f"the request head was not complete within {self.header_timeout:g} s",
            )
        else:
            log.debug("control API: closing a connection that sent nothing")
            self.loseConnection()

    def _refuse_line(self) -> None:
        self._refuse(
            414, "uri_too_long", f"the request line is longer than {self.max_request_line} bytes"
        )

    def _refuse_head(self) -> None:
        self._refuse(
            431,
            "headers_too_large",
            f"the request head is larger than {self.totalHeadersSize} bytes",
        )

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` with the JSON error body, stop reading requests, linger, close."""
        self._refused = True
        self._cancel_head_timer()
        self.setTimeout(None)
        self.clearLineBuffer()
        body = error_payload(code, message)
        head = (
            f"HTTP/1.1 {status} {CHANNEL_REASONS[status]}\r\n"
            f"Content-Type: {JSON_CONTENT_TYPE.decode('ascii')}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
        )
        self.transport.write(head.encode("ascii") + body)
        log.debug("control API: answered {status}: {message}", status=status, message=message)
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is None:
            self.loseConnection()
            return
        half_close()  # FIN after the answer; what the client still sends is read and dropped
        self._linger_timer = self.callLater(self.linger_seconds, self.transport.abortConnection)


class ApiSite(server.Site):
    """The site: no tracebacks to clients, access lines at debug level (scrapes are frequent)."""

    protocol = ApiChannel
    noisy = False
    displayTracebacks = False
    max_body_bytes = 65536

    def log(self, request: server.Request) -> None:
        log.debug(
            "{method} {uri} -> {code}",
            method=request.method.decode("ascii", "replace"),
            uri=request.uri.decode("utf-8", "replace"),
            code=request.code,
        )
