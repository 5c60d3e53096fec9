"""Commands from the backend over MQTT: the command topic in front of the shared command path.

The backend publishes to ``gatewayd/{gateway}/commands/{plugin}/{command}``::

    {"id": "req-42", "args": {"imei": "860000000000001", "slot": 2, "bank": "0000000012"},
     "expires": "2026-12-05T10:00:30Z", "reply_to": "backend/replies/edge-01"}

and gets the control API's JSON body plus ``id`` and ``status`` (the HTTP status) on
``reply_to``, else on ``gatewayd/{gateway}/responses/{plugin}/{command}``::

    {"id": "req-42", "status": 200, "ok": true, "result": {"outcome": "succeeded", ...}}

In order: a payload that is not a JSON object of those keys is answered 400 ``bad_request`` when
an id can be read from it (the id as the first key, for a payload too large or not JSON), else
only logged; a command ``commands.allow`` does not list is answered 403 ``forbidden``; a known
request id gets its stored answer (``IdempotencyStore.once``: never executed twice within
``dedupe_window``, across restarts too); a request past ``expires`` is answered 410 ``expired``;
then the command runs through ``CommandDispatcher`` like an HTTP request, with ``source: "mqtt"``
and the request id in its ``command.result`` event.

A retained command (the broker replays it to every new subscription) is never executed nor
answered, only logged: a command is an act at one moment, and a stale one replayed at every
reconnect would act again once its id had expired.

The channel needs no particular MQTT client: it is given ``publish(topic, payload, qos,
retain) -> Deferred`` and is handed each message (``handle``) by whoever subscribed to
``subscription``. MQTT 5's response topic and correlation data are not read (the MQTT client is
3.1.1): use ``reply_to`` and ``id``.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any, Literal

from pydantic import Field, field_validator
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from gatewayd.commands.dispatch import CommandDispatcher, Refusal, encode_json, error_body
from gatewayd.commands.idempotency import IdempotencyStore, check_request_id, fingerprint
from gatewayd.jsonin import JsonInputError, loads_external
from gatewayd.logsetup import LogThrottle
from gatewayd.schema import ByteSize, ConfigModel, PositiveDuration

__all__ = [
    "ChannelStats",
    "CommandChannel",
    "CommandsConfig",
    "Publish",
    "allowed",
    "check_patterns",
]

#: ``publish(topic, payload, qos, retain)``: a Deferred that fires once the message is sent
#: (QoS 1: acknowledged by the broker); it may also raise at once (not connected).
Publish = Callable[[str, bytes, int, bool], Any]

#: The keys a command payload may have.
PAYLOAD_KEYS = ("id", "args", "expires", "reply_to")
#: An id given as the payload's first key, read without parsing the rest (bytes).
_LEADING_ID = re.compile(rb'\A\s*\{\s*"id"\s*:\s*("(?:[^"\\\x00-\x1f]|\\.){1,800}")')
#: Bytes searched for a leading id in a payload that cannot be parsed.
_LEADING_ID_SPAN = 4096
#: ``plugin.command`` with shell-style globs in either part.
_PATTERN = re.compile(r"[A-Za-z0-9_\-*?\[\]!]+\.[A-Za-z0-9_\-*?\[\]!]+")


def check_patterns(patterns: list[str]) -> list[str]:
    """``patterns`` if each is a ``plugin.command`` glob; ValueError naming one otherwise."""
    for pattern in patterns:
        if not _PATTERN.fullmatch(pattern):
            raise ValueError(
                f"{pattern!r} is not a plugin.command pattern (such as cabinets.query, "
                "heating.* or *.*)"
            )
    return patterns


def allowed(patterns: list[str], plugin: str, command: str) -> bool:
    """True if one of ``patterns`` (``plugin.command`` globs) matches ``plugin.command``."""
    for pattern in patterns:
        plugin_part, _, command_part = pattern.partition(".")
        if fnmatchcase(plugin, plugin_part) and fnmatchcase(command, command_part):
            return True
    return False


class CommandsConfig(ConfigModel):
    """``commands:``: which commands the backend may send over MQTT, and how they are kept."""

    #: ``plugin.command`` patterns with shell-style globs (``cabinets.query``, ``heating.*``,
    #: ``*.*``); nothing is allowed by default: anything else is answered 403 ``forbidden``.
    allow: list[str] = []
    #: How long a request id is remembered (executed once, its answer repeated).
    dedupe_window: PositiveDuration = 600.0
    #: Larger command payloads are refused (400 ``too_large`` when their id comes first).
    max_payload: ByteSize = Field(1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    #: Topic prefix: commands under ``{prefix}/commands/+/+``, answers under
    #: ``{prefix}/responses/{plugin}/{command}``; ``{gateway}`` is the gateway id.
    prefix: str = "gatewayd/{gateway}"
    #: QoS of the answers.
    qos: Literal[0, 1, 2] = 1

    @field_validator("allow")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        return check_patterns(value)

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        bare = value.replace("{gateway}", "")
        if not value or value.startswith("/") or value.endswith("/"):
            raise ValueError("must be a topic without a leading or trailing /")
        if any(c in bare for c in "+#{}\x00"):
            raise ValueError("must not contain + # NUL, nor placeholders other than {gateway}")
        return value


@dataclass
class ChannelStats:
    """Counters of one command channel (the MQTT sink may publish them as metrics)."""

    received: int = 0  # messages on a command topic
    executed: int = 0  # new requests handed to the dispatcher
    repeats: int = 0  # known ids answered from the record
    refused: int = 0  # answered without executing (400 malformed, 403, 404, 410, 503...)
    dropped: int = 0  # not answered: no id could be read, or retained
    answers: int = 0  # answers published
    publish_failures: int = 0


class CommandChannel:
    """The MQTT command topic of one gateway: parse, authorise, deduplicate, dispatch, answer.

    ``dispatcher`` runs commands (``CommandDispatcher``), ``store`` remembers request ids
    (``IdempotencyStore``, open), ``config`` is a ``CommandsConfig``, ``publish`` sends answers
    and ``log`` is the owner's logger. ``clock`` (default: the dispatcher's reactor) gives the
    wall time ``expires`` is compared with.
    """

    def __init__(
        self,
        dispatcher: CommandDispatcher,
        store: IdempotencyStore,
        gateway_id: str,
        config: CommandsConfig,
        publish: Publish,
        log: Logger | None = None,
        *,
        clock: Any = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.store = store
        self.config = config
        self.publish = publish
        self.log = log or Logger(namespace="gatewayd.commands.mqtt")
        self.clock = clock or dispatcher.reactor
        self.prefix = config.prefix.replace("{gateway}", gateway_id)
        self.stats = ChannelStats()
        self._commands = f"{self.prefix}/commands/"
        self._drop_log = LogThrottle(self.clock.seconds)

    @property
    def subscription(self) -> str:
        """The topic filter to subscribe to (with the QoS the owner chooses, 1 recommended)."""
        return f"{self._commands}+/+"

    def response_topic(self, plugin: str, command: str) -> str:
        """Where an answer goes when the request names no ``reply_to``."""
        return f"{self.prefix}/responses/{plugin}/{command}"

    def allows(self, plugin: str, command: str) -> bool:
        """True if ``commands.allow`` lists a pattern matching ``plugin.command``."""
        return allowed(self.config.allow, plugin, command)

    # --- one message -----------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes, qos: int, retain: bool) -> defer.Deferred | None:
        """Handle one message of ``subscription``; None for a topic that is not a command's.

        The Deferred fires once the request no longer needs the broker: answered without
        execution, a repeat, or recorded as started (durably, before it executes). It fails
        (``StoreError``) when the request could not be recorded and so was not executed: do
        not acknowledge that message (the broker delivers it again). The answer is published
        separately when the command ends.
        """
        if not topic.startswith(self._commands):
            return None
        plugin, _, command = topic[len(self._commands) :].partition("/")
        if not plugin or not command or "/" in command:
            return None
        self.stats.received += 1
        default_topic = self.response_topic(plugin, command)
        if retain:
            self._drop("a retained command message (commands must not be retained)", topic)
            return defer.succeed(None)
        if len(payload) > self.config.max_payload:
            message = (
                f"the payload is larger than commands.max_payload ({self.config.max_payload} bytes)"
            )
            return self._malformed(topic, payload, default_topic, "too_large", message)
        try:
            request = loads_external(payload)
        except JsonInputError as exc:
            return self._malformed(topic, payload, default_topic, "bad_request", f"payload: {exc}")
        if not isinstance(request, dict):
            message = "the payload must be a JSON object with id, args, expires, reply_to"
            return self._malformed(topic, payload, default_topic, "bad_request", message)
        return self._request(plugin, command, request, topic, default_topic)

    def _request(
        self, plugin: str, command: str, request: dict[str, Any], topic: str, default_topic: str
    ) -> defer.Deferred:
        request_id = request.get("id")
        try:
            check_request_id(request_id)
        except ValueError as exc:
            if _echoable(request_id):  # a number, say: answer with it, the backend matches it
                return self._refuse(request_id, default_topic, 400, "bad_request", f"id: {exc}")
            self._drop(f"a command without a usable id ({exc})", topic)
            return defer.succeed(None)
        try:
            reply_to, arguments, expires = self._fields(request)
        except ValueError as exc:
            return self._refuse(request_id, default_topic, 400, "bad_request", str(exc))
        answer_topic = reply_to or default_topic
        if not self.allows(plugin, command):
            message = f"{plugin}.{command} is not in commands.allow; the backend may not send it"
            return self._refuse(request_id, answer_topic, 403, "forbidden", message)
        target: list[Any] = []

        def check() -> tuple[int, dict[str, Any]] | None:
            try:
                target.append(self.dispatcher.find(plugin, command))
            except Refusal as refusal:
                return refusal.answer()
            if expires is not None and self.clock.seconds() >= expires:
                self.dispatcher.count(target[0], "expired")
                return 410, error_body("expired", f"the request expired at {request['expires']}")
            return None

        def run() -> defer.Deferred:
            self.stats.executed += 1
            return self.dispatcher.run(target[0], arguments, source="mqtt", request_id=request_id)

        attempt = self.store.once(
            request_id,
            fingerprint(plugin, command, arguments),
            run,
            check=check,
            window=self.config.dedupe_window,
        )
        if attempt.repeat:
            self.stats.repeats += 1
            self.log.info(
                "command request {id} ({plugin}.{command}) is a repeat: answered, not executed",
                id=request_id,
                plugin=plugin,
                command=command,
            )
        elif not target or attempt.answer.called:
            self.stats.refused += 1  # answered by check(), so not executed
        attempt.answer.addCallback(lambda outcome: self._send(request_id, answer_topic, outcome))
        return attempt.recorded

    @staticmethod
    def _fields(request: dict[str, Any]) -> tuple[str | None, dict[str, Any], float | None]:
        """``reply_to``, ``args`` and ``expires`` (POSIX seconds) of a request; ValueError
        naming the key otherwise."""
        unknown = sorted(set(request) - set(PAYLOAD_KEYS))
        if unknown:
            raise ValueError(
                f"unknown key {', '.join(map(repr, unknown))} (a command payload has "
                f"{', '.join(PAYLOAD_KEYS)})"
            )
        reply_to = request.get("reply_to")
        if reply_to is not None and not _publishable(reply_to):
            raise ValueError("reply_to: must be a topic without + # or NUL")
        arguments = request.get("args")
        if arguments is None:
            arguments = {}
        elif not isinstance(arguments, dict):
            raise ValueError("args: must be a JSON object of the command's arguments")
        expires = request.get("expires")
        return reply_to, arguments, None if expires is None else _timestamp(expires)

    # --- answers ---------------------------------------------------------------------------

    def _malformed(
        self, topic: str, payload: bytes, answer_topic: str, code: str, message: str
    ) -> defer.Deferred:
        """Answer 400 when the id can be read as the payload's first key, else log it."""
        request_id = _leading_id(payload)
        if request_id is None:
            self._drop(f"a command payload without a readable id: {message}", topic)
            return defer.succeed(None)
        return self._refuse(request_id, answer_topic, 400, code, message)

    def _refuse(
        self, request_id: Any, answer_topic: str, status: int, code: str, message: str
    ) -> defer.Deferred:
        self.stats.refused += 1
        self.log.info(
            "command request {id} refused ({status} {code}): {message}",
            id=request_id,
            status=status,
            code=code,
            message=message,
        )
        self._send(request_id, answer_topic, (status, error_body(code, message)))
        return defer.succeed(None)

    def _send(self, request_id: Any, topic: str, outcome: tuple[int, dict[str, Any]]) -> None:
        status, body = outcome
        payload = encode_json({"id": request_id, "status": status, **body})
        sent = defer.maybeDeferred(self.publish, topic, payload, self.config.qos, False)
        sent.addCallbacks(self._sent, self._not_sent, errbackArgs=(request_id, topic))

    def _sent(self, _: Any) -> None:
        self.stats.answers += 1

    def _not_sent(self, failure: Failure, request_id: Any, topic: str) -> None:
        self.stats.publish_failures += 1
        self.log.warn(
            "the answer to command request {id} could not be published to {topic}: {error} "
            "(a repeat of the request gets it again)",
            id=request_id,
            topic=topic,
            error=failure.getErrorMessage(),
        )

    def _drop(self, what: str, topic: str) -> None:
        self.stats.dropped += 1
        if self._drop_log.due():
            self.log.warn(
                "ignored {what} on {topic} ({count} ignored so far)",
                what=what,
                topic=topic,
                count=self.stats.dropped,
            )


def _echoable(value: Any) -> bool:
    """An unusable id still worth answering with: a number, or a non-empty (too long) string."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int | float) or (isinstance(value, str) and value != "")


def _publishable(topic: Any) -> bool:
    """A topic one may publish to: a non-empty string without wildcards or NUL, ≤ 64 KiB."""
    return (
        isinstance(topic, str)
        and 0 < len(topic.encode("utf-8", "replace")) <= 65535
        and not any(c in topic for c in "+#\x00")
    )


def _timestamp(value: Any) -> float:
    """``expires`` as POSIX seconds: ISO 8601 with a time zone (none given: UTC)."""
    moment = None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            moment = datetime.fromisoformat(value)
    if moment is None:
        raise ValueError(
            f"expires: expected an ISO 8601 date and time such as 2026-12-05T10:00:30Z, "
            f"got {json.dumps(value)[:80]}"
        )
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _leading_id(payload: bytes) -> str | None:
    """The request id of a payload that cannot be parsed, when it is the object's first key."""
    match = _LEADING_ID.match(payload[:_LEADING_ID_SPAN])
    if match is None:
        return None
    try:
        return check_request_id(json.loads(match.group(1)))
    except ValueError:
        return None
