"""``GET /api/v1/devices``: the known devices of every plugin, a page at a time."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from twisted.web import server

from gatewayd.api.base import JsonResource
from gatewayd.api.common import (
    check_arguments,
    encode_json,
    iso_utc,
    log,
    query_bool,
    query_int,
    query_text,
    respond,
)
from gatewayd.plugin import Device

#: Devices in one page of ``GET /api/v1/devices`` when ``limit`` is not given, and the most a
#: page may hold: a heating plugin can know half a million meters, and one answer for all of them
#: would be ~100 MB built while the reactor waits.
DEVICES_PAGE = 1000
DEVICES_PAGE_MAX = 10_000
DEVICES_ARGUMENTS = ("plugin", "online", "search", "limit", "offset")


class DevicesResource(JsonResource):
    """``GET /api/v1/devices[?plugin=NAME][&online=true|false][&search=TEXT][&limit=N][&offset=N]``.

    Known devices, online or not, by plugin name and then in each plugin's own order, a page at a
    time: ``next_offset`` is the offset of the next page, null on the last one. ``search`` keeps
    the devices whose id contains TEXT, ignoring case (an operator types part of an IMEI); paging
    counts the devices left after every filter.
    """

    def render_GET(self, request: server.Request) -> bytes:
        check_arguments(request, DEVICES_ARGUMENTS)
        wanted = [v.decode("utf-8", "replace") for v in request.args.get(b"plugin", [])]
        for name in wanted:
            self.api.plugin_host(name)  # 404 for an unknown name
        online = query_bool(request, "online")
        search = (query_text(request, "search") or "").casefold()
        limit = query_int(request, "limit", DEVICES_PAGE, 1, DEVICES_PAGE_MAX)
        offset = query_int(request, "offset", 0, 0, None)
        errors: dict[str, str] = {}
        page = list(
            itertools.islice(
                self._devices(wanted, online, search, errors), offset, offset + limit + 1
            )
        )
        more = len(page) > limit
        body = {
            "devices": [_device_json(name, device) for name, device in page[:limit]],
            "errors": errors,
            "offset": offset,
            "next_offset": offset + limit if more else None,
        }
        return respond(request, 200, encode_json(body))

    def _devices(
        self, wanted: list[str], online: bool | None, search: str, errors: dict[str, str]
    ) -> Iterator[tuple[str, Device]]:
        """(plugin, device) for every listed device, plugin after plugin, as consumed: the
        answer is built only for the page, though the devices before it are still walked."""
        for name, host in sorted(self.api.daemon.plugins.items()):
            if (wanted and name not in wanted) or host.plugin is None:
                continue
            try:
                for device in host.plugin.devices():
                    if online is not None and bool(device.online) is not online:
                        continue
                    if search and search not in str(device.id).casefold():
                        continue
                    yield name, device
            except Exception:
                log.failure("devices() of plugin {plugin} failed", plugin=name)
                errors[name] = "listing the devices failed; see the daemon log"


def _device_json(plugin: str, device: Device) -> dict[str, Any]:
    return {
        "plugin": plugin,
        "id": device.id,
        "online": bool(device.online),
        "last_seen": iso_utc(device.last_seen),
        "details": device.details,
    }
