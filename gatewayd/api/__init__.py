"""The control API: health, metrics, status, devices, events and commands over HTTP (twisted.web).

Endpoints (``api.listen``, ``127.0.0.1:8720`` by default):

- ``GET /health``: 200 when every plugin runs and no sink is stopped, else 503
- ``GET /metrics``: Prometheus text (``gatewayd.metrics``)
- ``GET /api/v1/status``: the box at a glance (``gatewayd.status``): uptime, config, per plugin
  state, restarts, devices online, rates and totals, per sink state, queue and delivery rate
- ``GET /api/v1/history``: the last hour of rates and queue depths (``gatewayd.history``)
- ``GET /api/v1/devices[?plugin=NAME&online=BOOL&search=TEXT&limit=N&offset=N]``: known devices
  with plugin, id, online, last seen; a page at a time (1,000 unless ``limit`` says otherwise)
- ``GET /api/v1/events/stream[?plugin=GLOB&type=GLOB&device=GLOB]``: events as they are routed,
  as Server-Sent Events, at most ``api.max_streams`` clients at once
- ``GET /api/v1/plugins[/NAME[/commands[/CMD]]]``: plugins, commands and argument schemas
- ``POST /api/v1/plugins/{plugin}/commands/{command}``: run a command; JSON object body = arguments;
  with ``Idempotency-Key: ID`` once per ID (``gatewayd.commands``, shared with MQTT commands)

Authentication: when ``api.token_file`` is set, every request under ``/api/v1/``, GET included,
needs ``Authorization: Bearer <token>`` (401 without it, 403 with a wrong one): device ids,
events and plugin names are not for whoever can reach the port. ``/health``, ``/metrics``, ``/``
and ``/ui/`` stay open on purpose: systemd, monitoring and Prometheus read them without
credentials. The daemon refuses to listen on a non-loopback address when no token is configured.

Every answer is JSON except ``/metrics``; every error is
``{"ok": false, "error": {"code": "...", "message": "..."}}`` with the HTTP status as the code's
category (400 bad arguments, 401/403 auth, 404 unknown, 405 method, 408 request head too slow,
409 busy, 413 body too large, 414 request line too long, 422 idempotency key reused, 429 too many
keys remembered or event streams open, 431 request head too large, 500 internal or outcome
unknown, 502 device refused, 503 plugin not running, 504 no answer in time).

The daemon is read through a duck-typed view (``daemon.plugins``, ``daemon.sinks``,
``daemon.pipeline``, ``daemon.reactor_lag``, ``daemon.api_token``, ``daemon.reactor``,
``daemon.gateway_id``, and when it has them ``daemon.commands``, the command dispatcher,
``daemon.watch_events``, ``daemon.history``, ``daemon.started_at``, ``daemon.config_status``); see
``gatewayd.service`` for the real one.

Modules, by route family: ``site`` (the resource tree, ``build_site``, ``listen_api``),
``channel`` (HTTP framing limits, body limit, head timeout), ``base`` (``ApiState``, the JSON
resource, the token-protected ``/api/v1``), ``health`` (``/health``, ``/metrics``), ``status``
(``/api/v1/status``, ``/api/v1/history``), ``events`` (the event stream), ``devices``
(``/api/v1/devices``), ``plugins``
(``/api/v1/plugins``, the HTTP side of running commands: the command path itself is
``gatewayd.commands.dispatch``), ``common`` (errors, JSON answers, query and body input).
The health report itself is ``gatewayd.health``. Every name importable from ``gatewayd.api``
before the split still is; to patch a module attribute in a test, patch it in its own module.
"""

from __future__ import annotations

# Re-exports: what ``from gatewayd.api import X`` found before the split (``__all__`` is unchanged).
from gatewayd.api.base import ApiState, JsonResource, NotFoundResource  # noqa: F401
from gatewayd.api.channel import CHANNEL_REASONS, ApiChannel, ApiRequest, ApiSite  # noqa: F401
from gatewayd.api.common import (  # noqa: F401
    JSON_CONTENT_TYPE,
    HttpError,
    encode_json,
    error_payload,
    iso_utc,
    log,
    query_bool,
    query_int,
    read_json_object,
    respond,
    respond_error,
)
from gatewayd.api.devices import (  # noqa: F401
    DEVICES_ARGUMENTS,
    DEVICES_PAGE,
    DEVICES_PAGE_MAX,
    DevicesResource,
)
from gatewayd.api.health import HealthResource, MetricsResource  # noqa: F401
from gatewayd.api.plugins import (  # noqa: F401
    CommandCall,
    CommandResource,
    CommandsResource,
    PluginResource,
    PluginsResource,
    describe_command,
    describe_plugin,
    plugin_commands,
)
from gatewayd.api.site import ApiSetupError, RootResource, build_site, is_loopback, listen_api  # noqa: F401
from gatewayd.health import health_report  # noqa: F401

__all__ = [
    "ApiChannel",
    "ApiSetupError",
    "HttpError",
    "build_site",
    "is_loopback",
    "listen_api",
]
