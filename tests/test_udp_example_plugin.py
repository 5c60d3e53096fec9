"""The README's UDP plugin example, run over real UDP on 127.0.0.1 and on a FakeReactor."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer

from gatewayd.testing import FakeReactor, PluginHarness, open_datagram_peer
from tests.udp_example_plugin import WeatherPlugin

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLE = Path(__file__).resolve().parent / "udp_example_plugin.py"


@pytest_twisted.ensureDeferred
async def test_a_reading_is_answered_ok_only_once_durable() -> None:
    harness = PluginHarness(WeatherPlugin, {"listen": "127.0.0.1:0"}, durable="manual")
    await harness.start()
    station = open_datagram_peer(target=harness.address())
    try:
        station.send("W roof 21.5")
        await harness.collector.wait_for("reading").addTimeout(5, _reactor())
        with pytest.raises(defer.TimeoutError):
            await station.next_datagram(timeout=0.2)  # nothing answered before it is durable
        harness.collector.release()
        data, sender = await station.next_datagram()
        assert (data, sender) == (b"OK", harness.address())
        event = harness.collector.events[0]
        assert (event.device, event.data, event.raw) == ("roof", {"celsius": 21.5}, "W roof 21.5")
        assert [d.id for d in harness.plugin.devices()] == ["roof"]
    finally:
        await station.close()
        await harness.stop()


@pytest_twisted.ensureDeferred
async def test_a_datagram_that_is_not_a_reading_is_frame_invalid_and_unanswered() -> None:
    harness = PluginHarness(WeatherPlugin, {"listen": "127.0.0.1:0"})
    await harness.start()
    station = open_datagram_peer(target=harness.address())
    try:
        station.send(b"\x00hello")
        await harness.collector.wait_for("frame.invalid").addTimeout(5, _reactor())
        event = harness.collector.events[0]
        assert (event.data["reason"], event.raw) == ("format", "0068656c6c6f")
    finally:
        await station.close()
        await harness.stop()


def test_the_plugin_on_a_fake_reactor_answers_through_its_transport() -> None:
    reactor = FakeReactor()
    harness = PluginHarness(WeatherPlugin, {"listen": "127.0.0.1:0"}, reactor=reactor)
    harness.start()
    host, port = harness.address()
    assert host == "127.0.0.1" and port > 0  # a made-up port, never 0
    reactor.advance(30)
    (udp,) = reactor.udpPorts
    udp.deliver(b"W cellar 12", ("192.0.2.7", 5000))
    assert udp.transport.written == [(b"OK", ("192.0.2.7", 5000))]
    assert harness.plugin.last_seen == {"cellar": 30.0}
    harness.stop()
    assert not udp.listening


def _reactor():
    from twisted.internet import reactor

    return reactor


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_quotes_the_example_as_it_is() -> None:
    """Every block of the README's plugin guide naming Weather is a verbatim piece of it."""
    example = EXAMPLE.read_text(encoding="utf-8")
    readme = README.read_text(encoding="utf-8")
    guide = readme[readme.index("## Write a plugin") :]
    guide = guide[: guide.index("\n## ", 3)]
    quoted = [b for b in _python_blocks(guide) if "Weather" in b]
    assert quoted, "the README no longer shows the UDP example"
    for block in quoted:
        assert block in example, f"README block not in {EXAMPLE.name}:\n{block}"
