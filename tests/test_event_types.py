"""The JSON Schemas of the common event types catch what a plugin gets wrong."""

from __future__ import annotations

import pytest

from gatewayd.event_types import COMMON_TYPES, schema, shape_problems


def event(type_: str, device: str | None = "d1", raw: str | None = None, **data) -> dict:
    return {"type": type_, "device": device, "data": data, "raw": raw}


def test_every_common_type_has_a_schema_in_the_package():
    for event_type in COMMON_TYPES:
        assert schema(event_type)["title"] == event_type
    with pytest.raises(KeyError):
        schema("reading")


@pytest.mark.parametrize(
    "good",
    [
        event("device.online", address="10.0.0.1:4000"),
        event("device.offline", reason="moved_elsewhere", box="box-b"),
        event("frame.invalid", None, "FF00", reason="crc", message="CRC 0000 != 05EE"),
        event(
            "command.result",
            command="lend",
            arguments={"imei": "1"},
            source=None,
            request_id=None,
            ok=True,
            outcome="succeeded",
            result={},
            seconds=0.2,
        ),
        event("reading", None, celsius="not checked: not a common type"),
    ],
)
def test_good_shapes_pass(good):
    assert shape_problems(good) == []


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (event("device.online", None), "device.online: device: None is not of type 'string'"),
        (event("device.offline"), "device.offline: data: 'reason' is a required property"),
        (
            event("device.offline", reason="moved to box b"),
            "device.offline: data.reason: 'moved to box b' does not match",
        ),
        (event("frame.invalid", None, reason="CRC"), "frame.invalid: data.reason: 'CRC' does not"),
        (
            event(
                "command.result",
                command="lend",
                arguments={},
                source="http",
                request_id=None,
                ok=False,
                outcome="timeout",
                seconds=1.0,
            ),
            "command.result: data: 'error' is a required property",
        ),
    ],
)
def test_bad_shapes_are_named(bad, expected):
    problems = shape_problems(bad)
    assert problems and problems[0].startswith(expected), problems
