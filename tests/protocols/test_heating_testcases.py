"""Data-driven cases of the heating codecs: plugins/heating/testcases/<case>/{input,expected}.

The case name's prefix picks the codec: ``cjt188-*`` runs ``cjt188.decode_for_cli``, ``hygw-*``
runs ``hygw.decode_for_cli`` on the text of ``input``. ``expected`` is JSON: either
``{"error": {"reason": R}}`` (the codec must raise its error with that reason) or a *subset* of the
decoded dict: every key given must be present with an equal value (lists compared whole).
The expectations were written from /work/shared/reference (values the reference documents),
not by running the codec.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from gatewayd.protocols import cjt188, hygw
from gatewayd.protocols.errors import ProtocolError

CASES_DIR = Path(__file__).resolve().parents[2] / "plugins" / "heating" / "testcases"
CODECS = {"cjt188": cjt188.decode_for_cli, "hygw": hygw.decode_for_cli}
CASES = sorted(p.name for p in CASES_DIR.iterdir() if p.is_dir()) if CASES_DIR.is_dir() else []


def assert_subset(expected: Any, actual: Any, path: str = "$") -> None:
    """Fail unless every key/value of ``expected`` is in ``actual`` (recursively)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{path}: expected an object, got {actual!r}"
        for key, value in expected.items():
            assert key in actual, f"{path}.{key}: missing (have {sorted(actual)})"
            assert_subset(value, actual[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{path}: {actual!r}"
        for index, (want, have) in enumerate(zip(expected, actual, strict=True)):
            assert_subset(want, have, f"{path}[{index}]")
    elif isinstance(expected, float) or isinstance(actual, float):
        assert isinstance(actual, int | float) and not isinstance(actual, bool), f"{path}"
        assert math.isclose(actual, expected, rel_tol=1e-12), f"{path}: {actual!r} != {expected!r}"
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def test_cases_exist() -> None:
    assert len(CASES) >= 40
    assert {name.split("-")[0] for name in CASES} == set(CODECS)


@pytest.mark.parametrize("case", CASES)
def test_case(case: str) -> None:
    decode = CODECS[case.split("-")[0]]
    text = (CASES_DIR / case / "input").read_text(encoding="utf-8")
    expected = json.loads((CASES_DIR / case / "expected").read_text(encoding="utf-8"))
    if "error" in expected:
        with pytest.raises(ProtocolError) as caught:
            decode(text)
        assert caught.value.reason == expected["error"]["reason"], str(caught.value)
    else:
        assert_subset(expected, decode(text))


def test_subset_check_can_fail() -> None:
    with pytest.raises(AssertionError):
        assert_subset({"a": {"b": 1.5}}, {"a": {"b": 1.6}})
    with pytest.raises(AssertionError):
        assert_subset({"a": [1]}, {"a": [1, 2]})
    with pytest.raises(AssertionError):
        assert_subset({"a": None}, {})
