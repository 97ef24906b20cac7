"""uvicorn with a graceful drain: on SIGTERM / SIGINT, /ready turns false and queued work is finished."""

from __future__ import annotations

import math
from typing import Any

import uvicorn

from embedrt.errors import EmbedrtError


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the service to drain before uvicorn stops listening.

    uvicorn then closes the listening sockets, lets in-flight requests finish (at most
    ``timeout_graceful_shutdown``), and runs the app's shutdown, which waits for the schedulers' queues.
    """

    def __init__(self, config: uvicorn.Config, service: Any) -> None:
        super().__init__(config)
        self._service = service

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._service.begin_drain()
        super().handle_exit(sig, frame)


def serve_forever(app: Any, host: str, port: int, drain_timeout: float, **options: Any) -> None:
    """Run until a signal, then drain; raises EmbedrtError if the server never started."""
    options.setdefault("log_level", "info")
    # log_config=None: uvicorn's default dictConfig would close every handler already installed (logging's
    # dictConfig shuts down the existing ones), the access log's included; its loggers go to the root's
    options.setdefault("log_config", None)
    config = uvicorn.Config(app, host=host, port=port, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=math.ceil(drain_timeout), **options)
    server = _DrainingServer(config, app.state.service)
    server.run()
    if not server.started:
        raise EmbedrtError(f"the server did not start on {host}:{port} (see the log above)")
