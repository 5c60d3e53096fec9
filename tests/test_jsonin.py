"""loads_external: JSON from outside is a value or a JsonInputError naming the problem."""

from __future__ import annotations

import pytest

from gatewayd.jsonin import MAX_DEPTH, JsonInputError, loads_external, nesting_depth


@pytest.mark.parametrize(
    ("data", "value"),
    [
        (b'{"slot": 3, "bank": "0012"}', {"slot": 3, "bank": "0012"}),
        ('{"note": "caf\u00e9"}', {"note": "caf\u00e9"}),
        ("[" * MAX_DEPTH + "]" * MAX_DEPTH, eval("[" * MAX_DEPTH + "]" * MAX_DEPTH)),
        (b'{"a": "' + b"[" * 1000 + b'"}', {"a": "[" * 1000}),  # brackets in a string
        (b'["\\"[[[", {"b": "\\\\"}]', ['"[[[', {"b": "\\"}]),  # escaped quotes and backslashes
        (b"123456789012345678901234567890", 123456789012345678901234567890),  # not a float
        (b"  null ", None),
    ],
    ids=["object", "str", "at-max-depth", "brackets-in-string", "escapes", "big-int", "null"],
)
def test_valid_json_is_parsed(data, value):
    assert loads_external(data) == value


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"[" * 30_000 + b"]" * 30_000, "JSON nested too deeply (more than 64 levels"),
        ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "nested too deeply"),
        (b'{"a":' * 65 + b"1" + b"}" * 65, "nested too deeply"),
        (b"[" * 100_000, "nested too deeply"),  # unbalanced: refused before parsing
        (b'{"slot": 3', "not valid JSON: Expecting ',' delimiter: line 1 column 11 (char 10)"),
        (b"", "not valid JSON: Expecting value"),
        (b"[NaN]", "not valid JSON: NaN is not a JSON value"),
        (b'{"x": -Infinity}', "-Infinity is not a JSON value"),
        (b"1" * 5000, "not valid JSON: Exceeds the limit"),
        (b'{"slot": "\xff"}', "not UTF-8 text"),
        ('{"slot": 3}'.encode("utf-16"), "not UTF-8 text"),
        (b'\xef\xbb\xbf{"slot": 3}', "without a byte order mark"),
    ],
    ids=[
        "30k-brackets",
        "one-level-too-deep",
        "deep-objects",
        "unbalanced",
        "truncated",
        "empty",
        "nan",
        "infinity",
        "huge-int",
        "bad-utf8",
        "utf16",
        "bom",
    ],
)
def test_bad_input_is_a_json_input_error(data, fragment):
    with pytest.raises(JsonInputError) as caught:
        loads_external(data)
    assert isinstance(caught.value, ValueError)
    assert fragment in str(caught.value)


def test_the_depth_limit_is_a_parameter():
    assert loads_external("[[[1]]]", max_depth=3) == [[[1]]]
    with pytest.raises(JsonInputError, match="more than 2 levels"):
        loads_external("[[[1]]]", max_depth=2)


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ("", 0),
        ("1", 0),
        ("[]", 1),
        ('[1, {"a": [2]}, []]', 3),
        ('{"a": "]]]]{{{{"}', 1),
        ('["\\\\", ["\\""]]', 2),
    ],
)
def test_nesting_depth_ignores_strings(text, depth):
    assert nesting_depth(text) == depth
