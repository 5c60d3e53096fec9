"""``POST /api/v1/reload``: read the config file again and apply what changed.

The same as SIGHUP and ``gatewayd reload``: the file is read and validated; if it is invalid the
running config stays and the answer is 422 with every error (``file:line: key: message``); if it
is valid, what changed is applied by name (``gatewayd.reload``) and the answer is 200. Both carry
the reload record that ``/health`` shows as ``config.last_reload``. Needs the token.
"""

from __future__ import annotations

from typing import Any

from twisted.python.failure import Failure
from twisted.web import server

from gatewayd.api.base import JsonResource
from gatewayd.api.common import HttpError, encode_json, log, respond


class ReloadResource(JsonResource):
    """``POST /api/v1/reload``: 200 applied, 422 invalid config (nothing changed)."""

    isLeaf = True

    def render_POST(self, request: server.Request) -> Any:
        self.api.authorize(request)
        reload_file = getattr(self.api.daemon, "reload_file", None)
        if reload_file is None:
            raise HttpError(501, "not_implemented", "this daemon cannot reload its config")
        finished = request.notifyFinish()
        gone: list[Failure] = []
        finished.addErrback(gone.append)

        def answer(record: dict[str, Any]) -> None:
            if gone:
                return
            if record["ok"]:
                body, status = {"ok": True, "reload": record}, 200
            else:
                count = len(record["errors"])
                message = f"{count} error(s); the running config is unchanged"
                error = {"code": "invalid_config", "message": message}
                body, status = {"ok": False, "error": error, "reload": record}, 422
            request.write(respond(request, status, encode_json(body)))
            request.finish()

        def failed(failure: Failure) -> None:
            log.failure("reload failed", failure)
            if not gone:
                body = {"ok": False, "error": {"code": "internal", "message": "see the log"}}
                request.write(respond(request, 500, encode_json(body)))
                request.finish()

        reload_file().addCallbacks(answer, failed)
        return server.NOT_DONE_YET
