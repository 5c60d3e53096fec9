"""Shared pieces of the ESAM plugin tests: valid arguments of every function, demo keys, a real
control API site around a plugin instance, and a small HTTP client for it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gatewayd.plugins.esam.keys import EsamKeys, load_key_file
from gatewayd.plugins.esam.meter import SoftMeter
from gatewayd.plugins.esam.simulator import demo_key_copy

from gatewayd import testing
from gatewayd.testing import PluginHarness
from tests.protocols.esam_calls import CALLS, DIV, ESAM_NO, METER_NO, in_function_order


def private_demo_keys(directory: Path) -> Path:
    """The demo key file copied into ``directory`` with mode 0600."""
    source = demo_key_copy()
    target = directory / "keys.yaml"
    os.replace(source, target)
    return target


def demo_keys() -> EsamKeys:
    path = demo_key_copy()
    try:
        return load_key_file(path)
    finally:
        path.unlink()


def meter(flag: int = 0) -> SoftMeter:
    """A soft meter holding the demo keys (the counterpart of the simulator's card)."""
    return SoftMeter(demo_keys(), METER_NO, bytes.fromhex(ESAM_NO), flag=flag)


def calls() -> dict[str, dict[str, Any]]:
    """Valid arguments for all 20 functions (infrared_auth and mac_check from a soft meter)."""
    soft_meter = meter(0)
    r1 = bytes.fromhex("271789B1271789B1")
    _, esam, k1, r2 = soft_meter.infrared_query(r1)
    soft_meter.r1 = bytes.fromhex("447034E1AABBCCDD")
    readback = bytes.fromhex("04000106000000000000")
    apdu, mac = soft_meter.read_back(0x00, readback)
    return in_function_order(
        {
            **CALLS,
            "open_device": {"reader_type": 0},
            "close_device": {},
            "price2_update": {  # 264 data bytes: a chained APDU through the reader
                "flag": 1,
                "rand": "B4C8C420",
                "div": DIV,
                "apdu": "04D68400FF",
                "data": "AB" * 251,
            },
            "infrared_auth": {
                "flag": 0,
                "div": DIV,
                "esam_no": esam.hex().upper(),
                "rand1": r1.hex().upper(),
                "rand1_endata": k1.hex().upper(),
                "rand2": r2.hex().upper(),
            },
            "mac_check": {
                "flag": 0,
                "rand": "447034E1",
                "div": DIV,
                "apdu": apdu.hex().upper(),
                "data": readback.hex().upper(),
                "mac": mac.hex().upper(),
            },
        }
    )


# --- a real control API around one plugin instance ----------------------------------------------


class ApiServer(testing.ApiServer):
    """The real control API with the harness's plugin as ``esam``."""

    def __init__(self, harness: PluginHarness, reactor: Any, command_timeout: float = 30.0):
        view = testing.DaemonView(reactor)
        view.plugins["esam"] = testing.HostView("esam", "esam", harness.plugin, harness.context)
        super().__init__(view, reactor, command_timeout)

    async def command(self, name: str, arguments: dict[str, Any]) -> tuple[int, Any]:
        return await self.request("POST", f"/api/v1/plugins/esam/commands/{name}", arguments)

    stop = testing.ApiServer.close
