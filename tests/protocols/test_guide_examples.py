"""The README's construct examples run, and the README still shows them as they are in
``guide_examples.py``: a binary frame, a text frame, a codec that parses and builds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from gatewayd.protocols.errors import ProtocolError

from tests.protocols.guide_examples import (
    BINARY,
    LINE,
    Reading,
    WeatherCodec,
    WeatherError,
    crc_of,
    parse_binary,
    parse_line,
)

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Declaring a wire format with construct"


def guide_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index(SECTION) :]
    section = section[: section.index("\n## ", len(SECTION))]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_guide_shows_three_blocks_each_runs_alone_and_is_cut_from_the_examples() -> None:
    examples = (ROOT / "tests/protocols/guide_examples.py").read_text(encoding="utf-8")
    blocks = guide_blocks()
    assert len(blocks) == 3
    shared: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), shared)  # each runs, in the order shown
        code = "\n".join(
            line for line in block.splitlines() if not line.startswith(("from ", "import "))
        ).strip("\n")
        assert code in examples, f"README block not in guide_examples.py:\n{code}"


def test_binary_frame_parses_builds_and_refuses_a_wrong_crc() -> None:
    frame = BINARY.build({"body": {"value": {"station": 7, "tenths": -15}}})
    assert frame == bytes.fromhex("aa0007fff10dad")
    assert parse_binary(frame) == {"station": 7, "tenths": -15}
    with pytest.raises(ProtocolError) as caught:
        parse_binary(frame[:-1] + b"\x00")
    assert caught.value.reason == "format" and "wrong checksum" in caught.value.message


def test_text_frame_parses_and_checks_its_crc() -> None:
    line = b"roof,21.5," + crc_of(b"roof,21.5,").encode() + b"\n"
    assert line == b"roof,21.5,6A3C\n"
    assert parse_line(line) == ("roof", 21.5)
    assert LINE.build({"station": "roof", "celsius": 21.5, "crc": None}) == line
    with pytest.raises(ProtocolError) as caught:
        parse_line(b"roof,21.5,0000\n")
    assert caught.value.reason == "crc"
    with pytest.raises(ProtocolError, match="not a temperature: 'warm'") as caught:
        parse_line(b"roof,warm,0000\n")
    assert caught.value.reason == "format"


@pytest.mark.parametrize(("byte_order", "digits"), [("big", b"6A3C"), ("little", b"3C6A")])
def test_codec_builds_what_it_parses_under_its_crc_setting(byte_order: str, digits: bytes) -> None:
    codec = WeatherCodec(byte_order=byte_order)
    line = codec.build(Reading("roof", 21.5))
    assert line == b"roof,21.5," + digits + b"\n"
    assert codec.parse(line) == Reading("roof", 21.5)


@pytest.mark.parametrize(
    ("line", "reason"),
    [(b"roof,21.5,0000\n", "crc"), (b"roof,21.5", "format"), (b"roof,21.5,6A3\n", "crc")],
)
def test_codec_errors_are_its_own_with_a_reason(line: bytes, reason: str) -> None:
    with pytest.raises(WeatherError) as caught:
        WeatherCodec().parse(line)
    assert caught.value.reason == reason
