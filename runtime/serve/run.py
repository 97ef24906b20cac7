"""uvicorn with a graceful drain: on SIGTERM / SIGINT, /ready turns false and queued work is finished."""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from typing import Any

import uvicorn

from embedrt.errors import EmbedrtError

# a request's head (request line and headers): nginx and uvicorn's h11 allow 8-16 KiB, 64 KiB leaves room for
# long bearer tokens and tracing headers; without a bound, one connection sending a 100 MiB header held the
# event loop for seconds (httptools joins a header's pieces as they arrive)
MAX_HEAD_BYTES = 64 * 1024
# past the head, the bytes of a message that are not its body (chunk framing, trailers) may be at most
# MAX_HEAD_BYTES plus this share of its body: chunks of 32 bytes and more pass, a 96 MiB trailer does not
FRAMING_SHARE = 4
# after a 431, how long the connection stays half-open, its incoming bytes read and dropped: a close with
# unread bytes in the socket makes the kernel send a reset, which can destroy the 431 before the client reads
# it (nginx's lingering_close does the same, 5 s by default)
LINGER_S = 2.0
# a request's head must arrive within this many seconds of its first byte, and a connection must send a head
# within it of opening or of its last response: a client trickling a head a byte at a time (slow-loris) held
# its connection, and its file descriptor, for as long as it liked (nginx's client_header_timeout is 60 s;
# a head is at most MAX_HEAD_BYTES, which a client sends in one go)
HEAD_TIMEOUT_S = 10.0


def http_protocol() -> Any:
    """uvicorn's httptools protocol with each request's non-body bytes bounded: a head (request line and
    headers, counted exactly) over ``MAX_HEAD_BYTES`` gets a 431 and the connection is closed, as does a
    message whose chunk framing and trailers exceed ``MAX_HEAD_BYTES`` plus a quarter of its body. A head
    that has not arrived ``HEAD_TIMEOUT_S`` after its first byte gets a 408 and the connection is closed; a
    connection that sends nothing that long after opening, or after its last response, is closed. Without
    httptools, uvicorn's h11, which bounds a head's size itself (``h11_max_incomplete_event_size``) but not
    its time: said in a warning, since slow clients can then hold connections."""
    try:
        from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
    except ImportError:
        logging.getLogger("embedrt.serve").warning(
            "httptools is not installed, so the server runs on uvicorn's h11: a request head is bounded in size "
            "but not in time (a client sending one a byte at a time holds its connection); install "
            "'embedrt[serve]', which brings httptools")
        return "h11"

    class BoundedHead(HttpToolsProtocol):
        _head = 0  # bytes of the current head's URL, names and values, as httptools hands them over
        _other = 0  # bytes of the current message that are not body, fed in chunks it did not complete in
        _body = 0  # body bytes of the current message
        _chunk_body = 0
        _completed = False  # a message completed in the chunk being fed
        _refused = False
        _started = False  # the current message's request has started (its head was accepted)
        _head_begun = False  # bytes of a head have come since the last head completed
        # runs while the connection waits on the client for a head: from its opening, from the end of a response
        # or body when nothing else is under way, and from a head's first byte (restarted then); stopped while
        # the server itself is busy (a response on its way: pipelined bytes are not read meanwhile)
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._cycles: list[Any] = []  # the requests started or queued on this connection, not yet answered
            self._await_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_arrived()
            # uvicorn tells only the latest request (self.cycle) that the client went away; with pipelining, the
            # one running is an earlier one, which then ran to the end and wrote to the closed socket (an ERROR
            # traceback each): every unanswered request hears of it
            for cycle in self._cycles:
                if cycle is not self.cycle and not cycle.response_complete:
                    cycle.disconnected = True
                    cycle.message_event.set()
            super().connection_lost(exc)

        def _responding(self) -> bool:
            return bool(self.pipeline) or (self.cycle is not None and not self.cycle.response_complete)

        def _await_head(self) -> None:
            self._head_arrived()
            self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_timed_out)

        def _head_arrived(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self._refused or self.transport.is_closing() or self._started or self._responding():
                return  # a body still arriving, or the server's own response under way: not the head's wait
            if not self._head_begun:
                self.transport.close()  # nothing sent since it opened, or since its last response
                return
            self.logger.warning("Request head not complete %g s after it began: connection closed.", HEAD_TIMEOUT_S)
            self._refuse(408, f"The request head did not arrive within {HEAD_TIMEOUT_S:g} s.")

        def on_message_begin(self) -> None:
            self._head_begun = True
            if self._responding():  # pipelined: its head is read on once the response before it is sent
                self._head_arrived()
            else:
                self._await_head()  # the head's own deadline, from its first byte
            super().on_message_begin()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            self._chunk_body, self._completed = 0, False
            super().data_received(data)
            if not self._completed:  # a chunk in which a message ended is not counted (the split is unknown)
                self._other += len(data) - self._chunk_body
            if self._refused or self._other > MAX_HEAD_BYTES + self._body // FRAMING_SHARE:
                self._refuse(431, f"Request head over {MAX_HEAD_BYTES} bytes.")

        def on_url(self, url: bytes) -> None:
            self._head += len(url)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._head += len(name) + len(value) + 4
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            if self._head > MAX_HEAD_BYTES:  # a head that arrived within one read: no request is started
                self._refused = True
                return
            self._started, self._head_begun = True, False
            self._head_arrived()
            super().on_headers_complete()
            if self.cycle is not None:
                self._cycles = [c for c in self._cycles if not c.response_complete and c is not self.cycle]
                self._cycles.append(self.cycle)

        def on_body(self, body: bytes) -> None:
            self._chunk_body += len(body)
            self._body += len(body)
            if not self._refused:
                super().on_body(body)

        def on_message_complete(self) -> None:
            self._head = self._other = self._body = 0
            self._completed, self._started = True, False
            if not self._refused:
                super().on_message_complete()
                if not self._responding() and not self.transport.is_closing():
                    self._await_head()  # a body that ended after its early response (a 413, a 401)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # nothing under way (no pipelined request started, no body still arriving after an early
            # response): the next head is awaited from now, and one already begun is read on from now
            if not self._responding() and not self._started and not self.transport.is_closing():
                self._await_head()

        def _refuse(self, status: int, message: str) -> None:
            self._refused = True
            self._head_arrived()
            if self.transport.is_closing():
                return
            if status == 431:
                self.logger.warning("Request head or framing over %d bytes: connection closed.", MAX_HEAD_BYTES)
            if self._started:  # framing or trailers of a request under way: its body cannot complete
                self.transport.close()
                return
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                # a response is on its way (this request's, or a pipelined one's before it): it is sent, and
                # then the connection closes, answering nothing else; a 431 now would take its place
                self.transport.pause_reading()
                cycle.keep_alive = False
                self.pipeline.clear()
                return
            body = message.encode()
            self.transport.write(STATUS_LINE[status] + b"content-type: text/plain; charset=utf-8\r\n"
                                 + b"content-length: " + str(len(body)).encode() + b"\r\n"
                                 + b"connection: close\r\n\r\n" + body)
            # lingering close: send the 431 and our FIN, drop what the client still sends (data_received
            # ignores it once refused) until it closes or LINGER_S pass, then close
            if self.transport.can_write_eof():
                self.transport.write_eof()
                self.loop.call_later(LINGER_S, self.transport.close)
            else:
                self.transport.close()

        def eof_received(self) -> None:
            if self._refused:  # the client is done sending after our 431: close now, not at the linger's end
                self.transport.close()
                return
            super().eof_received()

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


def serve_forever(app: Any, host: str, port: int, drain_timeout: float, listener: socket.socket | None = None,
                  **options: Any) -> None:
    """Run until a signal, then drain, on ``listener`` (from :func:`listen`; bound here if None); raises
    EmbedrtError if the server never started (the address in use: naming it)."""
    options.setdefault("log_level", "info")
    # log_config=None: uvicorn's default dictConfig would close every handler already installed (logging's
    # dictConfig shuts down the existing ones), the access log's included; its loggers go to the root's
    options.setdefault("log_config", None)
    options.setdefault("http", http_protocol())
    options.setdefault("h11_max_incomplete_event_size", MAX_HEAD_BYTES)
    config = uvicorn.Config(app, host=host, port=port, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=math.ceil(drain_timeout), **options)
    server = _DrainingServer(config, app.state.service)
    if listener is None:
        listener = listen(host, port)
    try:
        server.run(sockets=[listener])
    except SystemExit as exc:  # uvicorn's own exit on a failed start (status 3), not this CLI's error and 2
        if server.started:
            raise
        raise EmbedrtError(f"the server did not start on {host}:{port} (see the log above)") from exc
    finally:
        listener.close()
    if not server.started:
        raise EmbedrtError(f"the server did not start on {host}:{port} (see the log above)")


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound as uvicorn binds it, but here: ``embedrt serve`` binds before it loads any
    model, so an address in use is a clear error (exit 2) at once, not uvicorn's exit 3 after the loads.

    Raises:
        EmbedrtError: the address cannot be bound (in use, not this host's, no permission), naming it.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family=family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise EmbedrtError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock
