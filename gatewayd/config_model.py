"""The schema of the core's own config sections: ``gateway``, ``api`` and ``routes``.

``plugins.<name>`` and ``sinks.<name>`` are validated against the ``Config`` model of the class
their ``type`` names (see ``gatewayd.config``); this module only holds what the core owns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from gatewayd.schema import (
    ByteSize,
    ConfigModel,
    Duration,
    HostPort,
    PluginConfig,
    SinkConfig,
)


class GatewaySection(ConfigModel):
    id: str = Field("gatewayd", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    state_dir: Path = Path("/var/lib/gatewayd")
    log_level: Literal["debug", "info", "warn", "error", "critical"] = "info"
    log_format: Literal["text", "json"] = "text"
    #: SQLite ``synchronous`` of the queues: ``full`` survives power loss, ``normal`` only kill -9.
    queue_sync: Literal["full", "normal"] = "full"
    shutdown_timeout: Duration = 8.0


class ApiSection(ConfigModel):
    enabled: bool = True
    listen: HostPort = "127.0.0.1:8720"
    token_file: Path | None = None
    command_timeout: Duration = 60.0  # 0: no timeout
    #: A size: bytes, or ``64k``, ``1MiB`` (the bound applies to the bytes).
    max_body_bytes: ByteSize = Field(65536, ge=1024)
    #: Event streams (``GET /api/v1/events/stream``) open at once; one more is answered 429.
    max_streams: int = Field(4, ge=1)


class MatchConfig(ConfigModel):
    """Shell-style globs; every key given must match (missing keys match anything)."""

    type: str | None = None
    protocol: str | None = None
    plugin: str | None = None
    device: str | None = None


class ProcessorConfig(ConfigModel):
    """One processing step; exactly one key. Applied in list order."""

    keep_data: list[str] | None = None
    drop_data: list[str] | None = None
    drop_raw: bool | None = None

    def model_post_init(self, __context: Any) -> None:
        given = [k for k, v in self.__dict__.items() if v is not None]
        if len(given) != 1:
            raise ValueError("a processor has exactly one of keep_data, drop_data, drop_raw")


class RouteConfig(ConfigModel):
    match: MatchConfig = Field(default_factory=MatchConfig)
    processors: list[ProcessorConfig] = Field(default_factory=list)
    sinks: list[str] = Field(default_factory=list)
    #: Discard matching events: later routes do not see them (they are not counted unrouted).
    drop: bool = False

    @field_validator("sinks")
    @classmethod
    def _unique(cls, sinks: list[str]) -> list[str]:
        if len(set(sinks)) != len(sinks):
            raise ValueError("a sink is named twice")
        return sinks


class Config:
    """A validated config: the core's sections plus each plugin's and sink's own model."""

    def __init__(
        self,
        path: Path,
        gateway: GatewaySection,
        api: ApiSection,
        plugins: dict[str, PluginConfig],
        sinks: dict[str, SinkConfig],
        routes: list[RouteConfig],
        plugin_classes: dict[str, type],
        sink_classes: dict[str, type],
    ) -> None:
        self.path = path
        self.gateway = gateway
        self.api = api
        self.plugins = plugins
        self.sinks = sinks
        self.routes = routes
        self.plugin_classes = plugin_classes
        self.sink_classes = sink_classes
