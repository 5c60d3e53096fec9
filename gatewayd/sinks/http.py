"""The ``http`` sink: each batch POSTed to a URL, as NDJSON (default) or a JSON array.

The body is the queued JSON texts as they are (``EventBatch.payloads``), never re-encoded;
optionally gzip-ed (on the sink's thread). Every request carries ``Idempotency-Key:
<first id>..<last id>``, the same on every retry of a batch, so a receiver can recognise a
repeat; it must still de-duplicate by event ``id`` (after a restart batches may be cut
differently). Connections are kept open (one persistent pool per sink).

How an answer is taken:

- 2xx: written; the batch is acknowledged.
- 408, 429, 5xx, 3xx (no redirect is followed: a POST must not turn into a GET), no answer
  within ``timeout``, connection and TLS errors: a failed write, retried by the core with
  backoff; a ``Retry-After`` (seconds or a date, capped at ``retry_after_max``) is the least
  delay (``HttpError.retry_after``, read by ``SinkRunner``).
- any other 4xx (unless listed in ``retry_statuses``): the batch is poison. It is appended to
  the dead-letter file as one JSON line ``{"at", "sink", "status", "answer" (the first 1 KiB of
  the answer), "idempotency_key", "events": [the batch's events]}``, fsync-ed, counted
  (``dead_letters``, ``gatewayd_sink_dead_letter_total``) and logged; only then is the batch
  acknowledged, so the queue moves on and nothing is lost. A dead letter that cannot be
  written fails the write (retried like any other).

Secrets (``token``, ``password``: give them as ``token_file`` / ``password_file``) never
appear in logs or errors: they are masked even when the server echoes them in its answer.
"""

from __future__ import annotations

import base64
import gzip
import os
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson
from pydantic import Field, field_validator, model_validator
from treq.client import HTTPClient
from twisted.internet import defer, ssl
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IPolicyForHTTPS, IResponse
from zope.interface import implementer

from gatewayd.events import Event
from gatewayd.files import ends_with_newline, fsync_directory, private_dir, private_opener
from gatewayd.schema import PositiveDuration, ReadableFile, Secret, SinkConfig
from gatewayd.sinks.base import Sink, SinkContext
from gatewayd.worker import Worker

__all__ = ["HttpSink", "HttpError", "parse_retry_after"]

#: How much of an answer goes into the dead-letter file (and, shortened, into error messages).
ANSWER_BYTES = 1024
_MASK = "**********"
#: Headers the sink sets itself; ``headers:`` may not give them.
_OWN_HEADERS = {"content-type", "content-encoding", "content-length", "transfer-encoding"}
_OWN_HEADERS |= {"host", "connection", "idempotency-key"}
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
_CONTENT_TYPES = {"ndjson": "application/x-ndjson", "json": "application/json"}


class HttpError(Exception):
    """A write the destination did not take; ``retry_after``: seconds it asked us to wait."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class HttpSink(Sink):
    """POSTs each batch to ``url``; refused batches go to a dead-letter file, not away."""

    class Config(SinkConfig):
        type: str = "http"
        #: ``http://`` or ``https://`` URL the batches are POSTed to.
        url: str
        #: ``ndjson``: one event per line; ``json``: one array per batch.
        format: Literal["ndjson", "json"] = "ndjson"
        #: Compress bodies (``Content-Encoding: gzip``).
        gzip: bool = False
        #: Extra request headers (not those the sink sets itself).
        headers: dict[str, str] = Field(default_factory=dict)
        #: ``Authorization: Bearer``; give it as ``token_file: PATH`` or ``token: "${VAR}"``.
        token: Secret | None = None
        #: Basic auth; the password as ``password_file: PATH`` or ``password: "${VAR}"``.
        username: str | None = None
        password: Secret | None = None
        #: PEM CAs that sign the server's certificate (default: the system's CAs).
        ca_file: ReadableFile | None = None
        #: PEM client certificate, and its key when that is not in ``cert_file``.
        cert_file: ReadableFile | None = None
        key_file: ReadableFile | None = None
        #: From sending a request to the end of its answer (connect included).
        timeout: PositiveDuration = 10.0
        #: 4xx statuses to retry instead of dead-lettering (e.g. ``[401, 403]``).
        retry_statuses: list[int] = Field(default_factory=list)
        #: A longer ``Retry-After`` is cut to this.
        retry_after_max: PositiveDuration = 600.0
        #: Refused batches, JSON lines; relative to ``state_dir``; default ``<sink>.dead.jsonl``.
        dead_letter: Path | None = None

        @field_validator("url")
        @classmethod
        def _http_url(cls, value: str) -> str:
            try:
                parts = urlsplit(value)
                parts.port  # noqa: B018 (raises ValueError for a bad port)
            except ValueError as exc:
                raise ValueError(f"not a URL: {exc}") from None
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
            if parts.username is not None or parts.password is not None:
                raise ValueError("no credentials in the URL: use username + password_file")
            return value

        @field_validator("headers")
        @classmethod
        def _valid_headers(cls, value: dict[str, str]) -> dict[str, str]:
            for name, text in value.items():
                if not _TOKEN.fullmatch(name):
                    raise ValueError(f"{name!r} is not a header name")
                if name.lower() in _OWN_HEADERS:
                    raise ValueError(f"{name} is set by the sink")
                if any(c in text for c in "\r\n\0"):
                    raise ValueError(f"header {name}: no line breaks or NUL")
            return value

        @field_validator("retry_statuses")
        @classmethod
        def _client_errors(cls, value: list[int]) -> list[int]:
            if any(not 400 <= status <= 499 for status in value):
                raise ValueError("only 4xx statuses (408, 429 and 5xx are always retried)")
            return value

        @model_validator(mode="after")
        def _consistent(self) -> HttpSink.Config:
            if self.token is not None and self.username is not None:
                raise ValueError("give token (Bearer) or username/password (basic), not both")
            if (self.username is None) != (self.password is None):
                raise ValueError("basic auth needs both username and password")
            if (self.token is not None or self.username is not None) and any(
                name.lower() == "authorization" for name in self.headers
            ):
                raise ValueError("headers.Authorization and token/username: give one")
            tls = self.ca_file or self.cert_file or self.key_file
            if tls and urlsplit(self.url).scheme != "https":
                raise ValueError("ca_file, cert_file and key_file need an https:// url")
            if self.key_file and not self.cert_file:
                raise ValueError("key_file needs cert_file")
            return self

    config: Config

    def __init__(self, name: str, config: SinkConfig, context: SinkContext) -> None:
        super().__init__(name, config, context)
        #: Events written to the dead-letter file; shown in /metrics.
        self.dead_letters = 0
        self.dead_letter_path = self.resolve_path(
            self.config.dead_letter or Path(f"{name}.dead.jsonl")
        )
        self._host = urlsplit(self.config.url).netloc
        self._headers, self._secrets = self._fixed_headers()
        self._worker: Worker | None = None
        self._pool: HTTPConnectionPool | None = None
        self._client: HTTPClient | None = None

    def _fixed_headers(self) -> tuple[dict[str, str], list[str]]:
        """The headers of every request, and the secret strings to mask in messages."""
        config = self.config
        headers = dict(config.headers)
        secrets = [value for value in config.headers.values() if len(value) >= 8]
        headers["Content-Type"] = _CONTENT_TYPES[config.format]
        if config.gzip:
            headers["Content-Encoding"] = "gzip"
        if config.token is not None:
            token = config.token.get_secret_value()
            headers["Authorization"] = f"Bearer {token}"
            secrets.append(token)
        elif config.username is not None and config.password is not None:
            password = config.password.get_secret_value()
            pair = base64.b64encode(f"{config.username}:{password}".encode()).decode("ascii")
            headers["Authorization"] = f"Basic {pair}"
            secrets += [password, pair]
        return headers, [secret for secret in secrets if secret]

    def _mask(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, _MASK)
        return text

    # --- lifecycle ------------------------------------------------------------------------

    def open(self) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._open())

    async def _open(self) -> None:
        reactor = self.context.reactor
        if self._pool is not None:  # an open retried after a failure
            self._pool.closeCachedConnections()
        if self._worker is None:
            self._worker = Worker(reactor, f"gatewayd-sink-{self.name}")
        config = self.config
        policy = None
        if config.ca_file or config.cert_file:
            policy = await self._worker.call(self._tls_policy)
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 2
        agent_options: dict[str, Any] = {"contextFactory": policy} if policy else {}
        agent = Agent(reactor, connectTimeout=config.timeout, pool=self._pool, **agent_options)
        self._client = HTTPClient(agent)

    def _tls_policy(self) -> _TlsPolicy:
        """Trust root and client certificate from their files (runs on the sink's thread)."""
        config = self.config
        trust = None
        if config.ca_file:
            pem = Path(config.ca_file).read_bytes()
            blocks = _PEM_CERTIFICATE.findall(pem)
            if not blocks:
                raise ValueError(f"{config.ca_file}: no PEM certificate in it")
            trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])
        client = None
        if config.cert_file:
            pem = Path(config.cert_file).read_bytes()
            if config.key_file:
                pem += b"\n" + Path(config.key_file).read_bytes()
            client = ssl.PrivateCertificate.loadPEM(pem)
        return _TlsPolicy(trust, client)

    def close(self) -> defer.Deferred | None:
        pool, self._pool, self._client = self._pool, None, None
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.stop()  # after the calls already queued (a dead letter being written)
        return pool.closeCachedConnections() if pool is not None else None

    # --- writing --------------------------------------------------------------------------

    def write(self, events: Sequence[Event]) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._write(events))

    async def _write(self, events: Sequence[Event]) -> None:
        payloads: list[str] | None = getattr(events, "payloads", None)
        if payloads is None:
            payloads = [event.to_json() for event in events]
        if not payloads:
            return
        if self._client is None or self._worker is None:
            raise RuntimeError(f"sink {self.name}: write before open")
        if self.config.format == "ndjson":
            body = ("\n".join(payloads) + "\n").encode("utf-8")
        else:
            body = ("[" + ",".join(payloads) + "]").encode("utf-8")
        if self.config.gzip:
            body = await self._worker.call(partial(gzip.compress, body, 6, mtime=0))
        key = f"{_event_id(payloads[0])}..{_event_id(payloads[-1])}"
        headers = {**self._headers, "Idempotency-Key": key}
        exchange = defer.Deferred.fromCoroutine(self._exchange(body, headers))
        exchange.addTimeout(self.config.timeout, self.context.reactor, self._no_answer)
        response, answer = await exchange
        status = response.code
        if 200 <= status <= 299:
            return
        phrase = response.phrase.decode("latin-1", "replace")
        text = self._mask(answer.decode("utf-8", "replace"))
        if 400 <= status <= 499 and status not in (408, 429, *self.config.retry_statuses):
            await self._dead_letter(payloads, key, status, text)
            return
        message = f"HTTP {status} {phrase}".rstrip()
        retry_after = None
        if status in (408, 429) or status >= 500:
            retry_after = parse_retry_after(
                response.headers.getRawHeaders(b"retry-after"), time.time()
            )
            if retry_after is not None:
                retry_after = min(retry_after, self.config.retry_after_max)
                message += f", retry after {retry_after:g} s"
        elif 300 <= status <= 399:
            location = (response.headers.getRawHeaders(b"location") or [b"?"])[0]
            message += f" to {location.decode('latin-1')}: set url to the new address"
        snippet = " ".join(text.split())[:200]
        raise HttpError(f"{message}: {snippet}" if snippet else message, status, retry_after)

    async def _exchange(self, body: bytes, headers: dict[str, str]) -> tuple[IResponse, bytes]:
        """POST (no redirect followed: a POST must not become a GET) and read the answer."""
        assert self._client is not None
        try:
            response = await self._client.post(
                self.config.url,
                data=body,
                headers=headers,
                allow_redirects=False,
                unbuffered=True,
                reactor=self.context.reactor,
            )
        except (RequestTransmissionFailed, ResponseNeverReceived) as exc:
            if any(reason.check(defer.CancelledError) for reason in exc.reasons):
                raise defer.CancelledError() from None  # a timeout: the caller says which
            raise
        return response, await _read_answer(response)

    def _no_answer(self, result: Any, timeout: float) -> None:
        raise HttpError(f"no answer from {self._host} within {timeout:g} s")

    async def _dead_letter(self, payloads: list[str], key: str, status: int, answer: str) -> None:
        """Keep a refused batch in the dead-letter file (fsync-ed on the sink's thread)."""
        assert self._worker is not None
        await self._worker.call(self._append_dead_letter, payloads, key, status, answer)
        self.dead_letters += len(payloads)
        self.log.error(
            "sink {sink}: {host} refused a batch of {count} events (HTTP {status}: {answer}); "
            "kept in {path}",
            sink=self.name,
            host=self._host,
            count=len(payloads),
            status=status,
            answer=" ".join(answer.split())[:200],
            path=str(self.dead_letter_path),
        )

    def _append_dead_letter(self, payloads: list[str], key: str, status: int, answer: str) -> None:
        """One JSON line per refused batch, appended and fsync-ed (runs on the sink's thread)."""
        events: list[Any] = []
        for text in payloads:
            try:
                events.append(orjson.loads(text))
            except orjson.JSONDecodeError:
                events.append(text)  # a damaged queue entry, kept as a string
        record = {
            "at": datetime.now(UTC).isoformat(),
            "sink": self.name,
            "status": status,
            "answer": answer,
            "idempotency_key": key,
            "events": events,
        }
        path = self.dead_letter_path
        private_dir(path.parent)
        created = not path.exists()
        with open(path, "ab", opener=private_opener) as file:
            if file.tell() and not ends_with_newline(path):
                file.write(b"\n")  # a line cut short by a crash
            file.write(orjson.dumps(record) + b"\n")
            file.flush()
            os.fsync(file.fileno())
        if created:
            fsync_directory(path.parent)


@implementer(IPolicyForHTTPS)
class _TlsPolicy:
    """TLS towards the server: its certificate checked against ``ca_file``, ours if given."""

    def __init__(self, trust: Any, client: ssl.PrivateCertificate | None) -> None:
        self.trust = trust
        self.client = client

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return ssl.optionsForClientTLS(
            hostname.decode("ascii"), trustRoot=self.trust, clientCertificate=self.client
        )


class _Answer(Protocol):
    """Keeps the first ``ANSWER_BYTES`` of a body and reads the rest (so the connection can be
    used again)."""

    def __init__(self, done: defer.Deferred) -> None:
        self.done = done
        self.kept = bytearray()

    def dataReceived(self, data: bytes) -> None:
        if len(self.kept) < ANSWER_BYTES:
            self.kept += data[: ANSWER_BYTES - len(self.kept)]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(bytes(self.kept))
        else:
            self.done.errback(reason)


def _read_answer(response: IResponse) -> defer.Deferred:
    """The first KiB of the answer; cancelling it closes the connection (as ``readBody``)."""
    protocol: _Answer

    def cancel(_: defer.Deferred) -> None:
        abort = getattr(protocol.transport, "abortConnection", None)
        if abort is not None:
            abort()

    protocol = _Answer(defer.Deferred(cancel))
    response.deliverBody(protocol)
    return protocol.done


def _event_id(text: str) -> str:
    """An event's id from its JSON text (only the first and last of a batch are decoded)."""
    try:
        return str(orjson.loads(text)["id"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "?"  # a damaged queue entry


def parse_retry_after(values: list[bytes] | None, now: float) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not values:
        return None
    text = values[0].decode("latin-1").strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)
