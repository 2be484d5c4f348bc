"""The query service's connections, kept in bounds below the application (`featscope serve`).

uvicorn's httptools protocol with what it lacks for a service that meets hostile or broken
clients: a deadline for each request's head (408), one for a client that stops reading its
answer, malformed requests answered in JSON, no Nagle delay on responses, and a lingering
close, so that an answer given before the request has wholly arrived (a 413 at the head of
an upload past the limit) reaches the client instead of being lost to the connection's
reset; an answer given while a body still arrives ends its connection. And a cap on the
requests in flight (503 past it).
"""

from __future__ import annotations

import logging
import resource
import socket
import sys
import time
from contextlib import suppress

from fastapi.responses import JSONResponse

HEADER_TIMEOUT, KEEP_ALIVE = 10.0, 5  # seconds for a request's head (then 408); idle keep-alive
SEND_TIMEOUT = 30.0  # seconds an answer may wait for a client that reads none of it (then cut off)
LINGER_IDLE, LINGER_MAX = 2.0, 30.0  # reading the rest of a request answered early: see guarded_protocol
MALFORMED_LOG_EVERY = 60.0  # seconds between two log lines about malformed requests (`MalformedRequestLog`)


class _EndOfRequest(Exception):
    """Raised from the parser's callback to stop it where a lingering request ends."""


class _ClosingThroughProtocol:
    """The transport as uvicorn sees it: the connection's own, except that `close()` asks the
    protocol, which may linger first (`GuardedHttpToolsProtocol.close_connection`)."""

    def __init__(self, transport, protocol):
        self._transport, self._protocol = transport, protocol

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def close(self) -> None:
        self._protocol.close_connection()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()


def guarded_protocol(header_timeout: float = HEADER_TIMEOUT, send_timeout: float = SEND_TIMEOUT,
                     linger_idle: float = LINGER_IDLE, linger_max: float = LINGER_MAX):
    """uvicorn's httptools protocol (a C parser: several times less CPU per request than
    h11's pure Python) with a deadline for each request's head: a connection that has not
    sent a whole request head within `header_timeout` seconds is answered 408 and closed
    (slow-header clients would otherwise hold connections for ever); and a malformed request
    (a negative Content-Length, say) is answered in JSON like every other error. A client
    that stops reading an answer is cut off once the answer has waited `send_timeout` seconds
    for room in its connection (nginx's send_timeout): it held a request in flight for ever,
    and enough of them (`InFlightLimit`) left every other client a 503.

    And a lingering close. A connection closed while the client is still sending (a 413 at
    the head of a 5 MB upload whose client asked to close) has unread bytes, and the kernel
    then resets it instead of closing: the answer still in flight is thrown away, and a
    client that sends its whole body before it reads (urllib) reports "connection reset"
    instead of the 413. So such a close sends the answer and a FIN, then reads and drops
    what still comes, until the request ends (it is parsed on), the client stops sending
    for `linger_idle` seconds or closes, or `linger_max` seconds have passed (nginx's
    lingering_close; Apache's 2 s and 30 s)."""
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        lingering = False
        _send_deadline = None
        _in_body = False  # a request's head has arrived, and its body is still arriving

        def pause_writing(self) -> None:  # the client's connection is full: it has not read
            super().pause_writing()
            if self._send_deadline is None:
                self._send_deadline = self.loop.call_later(send_timeout, self._raw_transport.abort)

        def resume_writing(self) -> None:
            if self._send_deadline is not None:
                self._send_deadline.cancel()
                self._send_deadline = None
            super().resume_writing()

        def send_400_response(self, msg: str) -> None:
            # uvicorn calls this in its except clause for the parser's error, whose own reason
            # ("Duplicate Content-Length") says what is wrong where its message does not
            error = sys.exc_info()[1]
            if isinstance(error, httptools.HttpParserError) and str(error):
                msg = str(error)
            body = ('{"error": "malformed request: ' + msg.replace('"', "'")[:200] + '"}').encode()
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n"
                                 + body)
            self.close_connection(parse_on=False)  # what follows a malformed request cannot be parsed

        def _unsupported_upgrade_warning(self) -> None:
            # uvicorn warns twice for every WebSocket upgrade request, the second time telling
            # the operator to install a WebSocket library; this service has no WebSocket
            # endpoint (the server runs with ws="none") and answers such a request as plain HTTP
            self.logger.info("upgrade request answered as plain HTTP (no WebSocket endpoints here)")

        def close_connection(self, parse_on: bool = True) -> None:
            """Close, lingering if the client may still be sending this request (its body has
            not wholly arrived, or it was malformed)."""
            raw = self._raw_transport
            unfinished = not parse_on or self._in_body
            if self.lingering or raw.is_closing() or not unfinished or not raw.can_write_eof():
                raw.close()
                return
            self.lingering, self._linger_parse = True, parse_on and self.parser is not None
            self._disarm()
            raw.write_eof()  # the answer, then FIN: the client can read it whatever it still sends
            self.flow.resume_reading()
            self._heard_at, self._linger_until = self.loop.time(), self.loop.time() + linger_max
            self._linger_check = self.loop.call_later(linger_idle, self._linger_timeout)

        def _linger_timeout(self) -> None:
            now = self.loop.time()
            if now >= self._linger_until or now - self._heard_at >= linger_idle:
                self._raw_transport.close()
            else:
                self._linger_check = self.loop.call_later(
                    min(self._heard_at + linger_idle, self._linger_until) - now, self._linger_timeout)

        def data_received(self, data: bytes) -> None:
            if not self.lingering:
                return super().data_received(data)
            self._heard_at = self.loop.time()
            if self._linger_parse:  # parsed on only to see where the request ends; its body is dropped
                try:
                    self.parser.feed_data(data)
                except httptools.HttpParserError as e:
                    self._linger_parse = False  # not HTTP, or the request ended (`_EndOfRequest`)
                    if isinstance(e.__context__, _EndOfRequest):
                        self._raw_transport.close()

        def on_body(self, body: bytes) -> None:
            if not self.lingering:
                super().on_body(body)

        def on_message_complete(self) -> None:
            self._in_body = False
            if self.lingering:
                raise _EndOfRequest  # nothing of it is left unread: close now (whatever follows stays unparsed)
            super().on_message_complete()
            if self.cycle.response_complete and not self.transport.is_closing():
                self._arm()  # answered before it ended (a 413): the next request's head is due from now

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._raw_transport = transport
            self.transport = _ClosingThroughProtocol(transport, self)  # uvicorn closes through it
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                # asyncio sets this only for sockets made with proto=IPPROTO_TCP, which a bound
                # socket handed to uvicorn is not: without it a response's second segment waits
                # for the client's delayed ACK (40 ms a request)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._arm()

        def _arm(self) -> None:
            self._head_deadline = self.loop.call_later(header_timeout, self._head_timeout)

        def _disarm(self) -> None:
            if getattr(self, "_head_deadline", None) is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def on_headers_complete(self) -> None:
            self._disarm()  # a whole request head arrived
            self._in_body = True
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._disarm()
                if not self._in_body:  # else from the end of this request (`on_message_complete`)
                    self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            if self._send_deadline is not None:
                self._send_deadline.cancel()
            if self.lingering:
                self._linger_check.cancel()
            super().connection_lost(exc)

        def _head_timeout(self) -> None:
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return
            body = b'{"error": "request head not received in time"}'
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            self._raw_transport.close()  # no lingering: a slow head is what this deadline lets go

    return GuardedHttpToolsProtocol


class MalformedRequestLog(logging.Filter):
    """uvicorn logs a warning for every malformed request: a client that sends garbage in a
    loop filled the log as fast as it sent. The first one is logged; after it, at most one
    line each `every` seconds, saying how many came since the last line. Each request is
    still answered 400; only the log is summed up."""

    MESSAGE = "Invalid HTTP request received."

    def __init__(self, every: float = MALFORMED_LOG_EVERY, clock=time.monotonic):
        super().__init__()
        self.every, self.clock = every, clock
        self._last: float | None = None  # when the last line was let through
        self._unlogged = 0  # malformed requests since then

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() != self.MESSAGE:
            return True
        now = self.clock()
        if self._last is not None and now - self._last < self.every:
            self._unlogged += 1
            return False
        if self._unlogged:
            record.msg = (f"{self.MESSAGE[:-1]}: {self._unlogged + 1} malformed requests in the last "
                          f"{now - self._last:.0f} s, each answered 400")
            record.args = ()
        self._last, self._unlogged = now, 0
        return True


def allow_open_connections() -> None:
    """Raise this process's limit of open files to the most it may have (its hard limit). Each
    connection is a file, and the usual soft limit of 1,024 let about a thousand idle
    connections make every new one fail with "Connection reset by peer" until their head
    deadline freed them, well short of the 2,048-connection backlog (nginx's
    worker_rlimit_nofile does the same)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with suppress(ValueError, OSError):  # not allowed here: the limit stays as it was
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


class InFlightLimit:
    """ASGI middleware: past `limit` requests in flight, answer 503 (JSON, Retry-After) at once
    instead of queueing without bound. (Plain ASGI: Starlette's BaseHTTPMiddleware costs a task
    and a stream per request.)"""

    def __init__(self, app, limit: int):
        self.app, self.limit, self.in_flight = app, limit, 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            response = JSONResponse({"error": f"busy: {self.in_flight} requests in flight, try again"},
                                    status_code=503, headers={"Retry-After": "1"})
            return await response(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class CloseWhileBodyArrives:
    """ASGI middleware: an answer that starts before the application has read its request's
    whole body (a 413 at the head of an upload, a 400 for its layer, a 503) says `Connection:
    close`. Kept alive, the connection would read the rest of that body for as long as the
    client sends it; closed, the rest is read and dropped for a bounded time
    (`guarded_protocol`'s lingering close). An answer after the whole body was read keeps the
    connection. (A small body that has arrived but was not read closes it too: the application
    cannot tell, and a client only connects again.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not _has_body(scope["headers"]):
            return await self.app(scope, receive, send)
        arrived = False

        async def receive_noting_the_end():
            nonlocal arrived
            message = await receive()
            arrived = arrived or message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def send_closing_early(message):
            if message["type"] == "http.response.start" and not arrived:
                headers = [(name, value) for name, value in message.get("headers", []) if name.lower() != b"connection"]
                message = message | {"headers": headers + [(b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive_noting_the_end, send_closing_early)


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a request's headers announce a body (a Content-Length other than 0, or chunks)."""
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False
