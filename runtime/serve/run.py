"""uvicorn with a graceful drain: on SIGTERM / SIGINT, /ready turns false and queued work is finished."""

from __future__ import annotations

import math
from typing import Any

import uvicorn

from embedrt.errors import EmbedrtError

# a request's head (request line and headers): nginx and uvicorn's h11 allow 8-16 KiB, 64 KiB leaves room for
# long bearer tokens and tracing headers; without a bound, one connection sending a 100 MiB header held the
# event loop for seconds (httptools joins a header's pieces as they arrive)
MAX_HEAD_BYTES = 64 * 1024


def http_protocol() -> Any:
    """uvicorn's httptools protocol with the request head bounded by ``MAX_HEAD_BYTES`` (431 and close beyond);
    without httptools, uvicorn's h11, which bounds it itself (``h11_max_incomplete_event_size``)."""
    try:
        from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
    except ImportError:
        return "h11"

    class BoundedHead(HttpToolsProtocol):
        # bytes fed while a head is incomplete; a head that starts inside a chunk after another request
        # ended is counted from the next chunk: the bound is MAX_HEAD_BYTES plus at most two reads (256 KiB)
        _head_bytes = 0
        _in_head = True
        _completed = False

        def data_received(self, data: bytes) -> None:
            counting, self._completed = self._in_head, False
            super().data_received(data)
            if not (self._in_head and counting and not self._completed):
                return
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
                self.logger.warning("Request head over %d bytes: 431, connection closed.", MAX_HEAD_BYTES)
                body = f"Request head over {MAX_HEAD_BYTES} bytes.".encode()
                self.transport.write(STATUS_LINE[431] + b"content-type: text/plain; charset=utf-8\r\n"
                                     + b"content-length: " + str(len(body)).encode() + b"\r\n"
                                     + b"connection: close\r\n\r\n" + body)
                self.transport.close()

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_head, self._head_bytes, self._completed = True, 0, True
            super().on_message_complete()

    return BoundedHead


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
    options.setdefault("http", http_protocol())
    options.setdefault("h11_max_incomplete_event_size", MAX_HEAD_BYTES)
    config = uvicorn.Config(app, host=host, port=port, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=math.ceil(drain_timeout), **options)
    server = _DrainingServer(config, app.state.service)
    server.run()
    if not server.started:
        raise EmbedrtError(f"the server did not start on {host}:{port} (see the log above)")
