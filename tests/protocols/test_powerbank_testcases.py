"""Runs the data-driven power-bank codec cases in plugins/powerbank/testcases/<case>/.

``input`` is a raw line as a cabinet sends it (bytes, terminator included or not). ``expected`` is
JSON: ``{"error": REASON}``, or ``{"packet": {...}, "crc_ok": bool, "canonical": "...",
"expected_crc": "..." (when crc_ok is false)}``. An optional ``"crc": {...}`` holds CrcSettings
fields for that case. Add a case by adding a folder; no code change needed.
"""

import json
from pathlib import Path

import pytest
from gatewayd.protocols import powerbank as pb

CASES_DIR = Path(__file__).resolve().parents[2] / "plugins" / "powerbank" / "testcases"
CASES = sorted(path for path in CASES_DIR.iterdir() if path.is_dir())


def load(case: Path) -> tuple[bytes, dict]:
    return (case / "input").read_bytes(), json.loads((case / "expected").read_text("utf-8"))


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_case(case):
    line, expected = load(case)
    settings = pb.CrcSettings(**expected.get("crc", {}))
    codec = pb.Codec(settings)
    if "error" in expected:
        with pytest.raises(pb.PowerbankError) as caught:
            codec.decode(line)
        assert caught.value.reason == expected["error"]
        return
    decoded = codec.decode(line)
    assert pb.packet_to_dict(decoded.packet) == expected["packet"]
    assert decoded.crc_ok is expected["crc_ok"]
    if not expected["crc_ok"]:
        assert decoded.expected_crc == expected["expected_crc"]
    assert codec.build(decoded.packet).decode("ascii") == expected["canonical"]


def test_cases_cover_every_seed_form_and_error_reason():
    expectations = [load(case)[1] for case in CASES]
    commands = {
        e["packet"]["command"] + e["packet"].get("code", "") for e in expectations if "packet" in e
    }
    seed = {"CH", "CQ", "AQ", "CCBW", "MQ", "RQT", "RQF", "MCBO", "MCRO", "AMBO", "AMRO"}
    assert seed | {"MRBF", "MRRF", "ARBF", "ARRF"} <= commands
    reasons = {e["error"] for e in expectations if "error" in e}
    assert reasons == set(pb.ERROR_REASONS)
