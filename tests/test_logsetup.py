"""log_format: json writes one parseable JSON object per line, with the rendered message."""

from __future__ import annotations

import io
import json

import pytest_twisted
from twisted.logger import FileLogObserver, Logger

from gatewayd.logsetup import json_line


def logged(emit) -> list[dict]:
    stream = io.StringIO()
    emit(Logger(namespace="gatewayd.test", observer=FileLogObserver(stream, json_line)))
    lines = stream.getvalue().splitlines()
    return [json.loads(line) for line in lines]


def test_one_object_per_line_with_the_rendered_message_and_its_fields():
    (record,) = logged(lambda log: log.warn("gateway {gw_id} sent {n} frames", gw_id="027", n=3))
    assert record["message"] == "gateway 027 sent 3 frames"
    assert record["level"] == "warn" and record["namespace"] == "gatewayd.test"
    assert record["fields"] == {"gw_id": "027", "n": 3}
    assert record["ts"].endswith("+00:00")


def test_a_failure_keeps_its_exception_message_and_traceback():
    def emit(log):
        try:
            raise OSError(98, "Address already in use")
        except OSError:
            log.failure("cannot listen on {port}", port=9000)

    (record,) = logged(emit)
    assert record["level"] == "critical" and record["message"] == "cannot listen on 9000"
    assert "Address already in use" in record["traceback"]


def test_only_fields_the_message_shows_are_written():
    (record,) = logged(lambda log: log.info("connected", password="s3cret", host="h"))
    assert "fields" not in record and "s3cret" not in json.dumps(record)


def test_an_integer_beyond_64_bits_is_still_written():
    (record,) = logged(lambda log: log.info("counter {n}", n=2**70))
    assert record["fields"] == {"n": 2**70} and record["message"] == f"counter {2**70}"


def test_objects_are_written_as_their_text():
    (record,) = logged(lambda log: log.info("error: {error}", error=ValueError("bad")))
    assert record["fields"] == {"error": "bad"} and record["message"] == "error: bad"


@pytest_twisted.ensureDeferred
async def test_twisted_udp_port_lines_are_dropped_and_tcp_ones_kept():
    """A third-party plugin's noisy DatagramProtocol on a real UDP port: its four info lines
    do not reach gatewayd's log; a TCP port's opening line does."""
    from twisted.internet import protocol, reactor
    from twisted.logger import FilteringLogObserver, globalLogPublisher, textFileLogObserver

    from gatewayd.logsetup import udp_noise

    class ChattyDatagrams(protocol.DatagramProtocol):
        pass  # noisy = True, as Twisted's default

    stream = io.StringIO()
    observer = FilteringLogObserver(textFileLogObserver(stream), [udp_noise])
    globalLogPublisher.addObserver(observer)
    try:
        udp = reactor.listenUDP(0, ChattyDatagrams(), interface="127.0.0.1")
        tcp = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol))
        udp_port, tcp_port = udp.getHost().port, tcp.getHost().port
        await udp.stopListening()
        await tcp.stopListening()
    finally:
        globalLogPublisher.removeObserver(observer)
    text = stream.getvalue()
    assert f"Factory starting on {tcp_port}" in text
    assert str(udp_port) not in text and "ChattyDatagrams" not in text
    assert "protocol <" not in text
