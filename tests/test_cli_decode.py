"""``gatewayd decode -o NAME=VALUE``: settings read from the decoder's signature."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Literal

import pytest

from gatewayd.cli import decoder_options

if TYPE_CHECKING:
    from decimal import Decimal


def decoder(
    text: str,
    scale: Literal[0, 2] = 0,
    mode: Literal["a", "2"] = "a",
    count: int = 1,
    label: str = "",
    *,
    strict: bool = False,
) -> dict:
    return {}


def hidden_hint(text: str, value: Decimal | None = None) -> dict:  # only for type checkers
    return {}


@pytest.mark.parametrize(
    "given, expected",
    [
        ([], {}),
        (["scale=2"], {"scale": 2}),
        (["mode=2"], {"mode": "2"}),  # a Literal of strings stays a string
        (["count=-3", "label=7"], {"count": -3, "label": "7"}),
        (["label=a=b"], {"label": "a=b"}),
    ],
)
def test_settings_are_converted_to_the_parameters_type(given, expected):
    assert decoder_options(decoder, given) == expected


@pytest.mark.parametrize(
    "given, message",
    [
        (["scale=1"], "-o scale: expected 0 or 2, got '1'"),
        (["scale=--2"], "-o scale: expected 0 or 2, got '--2'"),
        (["scale=²"], "got '²'"),
        (["count=٢"], "-o count: expected a whole number, got '٢'"),
        (["count="], "-o count: expected a whole number, got ''"),
        (["mode=b"], "-o mode: expected a or 2, got 'b'"),
        (["strict=1"], "no option 'strict' (options: scale, mode, count, label)"),
        (["=2"], "no option ''"),
        (["scale"], "-o 'scale': expected NAME=VALUE"),
        (["scale=0", "scale=2"], "-o scale is given more than once"),
    ],
)
def test_a_bad_setting_names_itself_and_the_choices(given, message):
    with pytest.raises(ValueError) as caught:
        decoder_options(decoder, given)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "function", [hidden_hint, functools.partial(decoder, scale=2), len], ids=str
)
def test_a_decoder_that_cannot_be_introspected_takes_no_settings(function):
    assert decoder_options(function, []) == {}
    with pytest.raises(ValueError, match=r"\(options: none\)"):
        decoder_options(function, ["value=1"])
