"""A lean HTTP/1.1 path for the daemon's hot route, in front of aiohttp.

Every connection starts on FastHTTP, a plain asyncio protocol. It serves only the requests that
make up the daemon's load: `POST /v1/cluster` or `POST /v1/assign` with an application/x-npy body
and a Content-Length, on a keep-alive HTTP/1.1 connection, with the right bearer token if one is
configured. Anything else (another route or method, a chunked body, Expect, Connection: close,
HTTP/1.0, a query string, a token mismatch, an unusual byte in the headers, the daemon not ready)
hands the connection, with the bytes read so far, to aiohttp's own request handler, which then
serves it for good: the rules and answers of every other case stay aiohttp's.

Why: with one image per request, aiohttp's per-request Python work on the event loop (request and
response objects, router, middleware, stream reader, writer) cost about as much CPU as the
encoder, and it holds the GIL the worker thread needs. This path does the same work for these two
routes in a few microseconds of Python: one header split, the same admission (admit, 503 when
full), the same .npy decoding and checks (decode_pixels), the same worker (submit), the same
metrics, the same JSON answers, and one transport.write per answer.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import socket
import time
from email.utils import formatdate

from .server_batcher import Overloaded
from .server_codec import decode_pixels
from .server_state import Job

log = logging.getLogger(__name__)

FAST_ROUTES = {b"/v1/cluster": "cluster", b"/v1/assign": "assign"}
_PREFIX = b"POST /v1/"  # what every request this path serves starts with
MAX_HEAD = 8192
HEAD_CACHE = 256  # header blocks remembered with their verdict (a client repeats the same few)
# Anything but printable ASCII, tab and CRLF line ends in the header block sends the request to
# aiohttp's parser (which decides what to make of it).
_ODD = re.compile(rb"[^\t\r\n\x20-\x7e]|\r(?!\n)|(?<!\r)\n")
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 409: "Conflict", 500: "Internal Server Error",
            503: "Service Unavailable"}


class _Date:
    """The Date header, formatted once a second."""

    __slots__ = ("second", "value")

    def __init__(self):
        self.second, self.value = -1, b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second, self.value = now, formatdate(now, usegmt=True).encode()
        return self.value


_date = _Date()


def _response(status: int, body: bytes, extra: tuple = ()) -> bytes:
    head = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, "Error").encode()),
            b"Content-Type: application/json; charset=utf-8", b"Content-Length: %d" % len(body),
            b"Date: " + _date.get(), b"Server: protoedge"]
    head += [f"{k}: {v}".encode() for k, v in extra]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class FastConnections:
    """The daemon's fast-path connections: protocol factory, and their shutdown."""

    def __init__(self, daemon, aiohttp_server):
        self.daemon = daemon
        self.aiohttp_server = aiohttp_server  # web.Server: a factory of aiohttp protocols
        self.conns: set = set()
        self.heads: dict = {}  # header block -> (op, body length) or False (see FastHTTP._route)
        self.served = 0   # requests answered on the fast path
        self.handed = 0   # connections handed to aiohttp

    def __call__(self) -> "FastHTTP":
        return FastHTTP(self)

    async def shutdown(self, timeout: float) -> None:
        """Close idle connections now, the others once their request is answered."""
        for c in list(self.conns):
            c.close_when_idle()
        deadline = time.monotonic() + timeout
        while self.conns and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for c in list(self.conns):
            c.transport.close()


class FastHTTP(asyncio.Protocol):
    __slots__ = ("owner", "daemon", "transport", "buf", "busy", "closing", "paused", "head", "body_len", "cost",
                 "op", "name", "t0")

    def __init__(self, owner: FastConnections):
        self.owner, self.daemon = owner, owner.daemon
        self.transport = None
        self.buf = bytearray()
        self.busy = False       # a request is being served: later bytes wait in buf (pipelining)
        self.closing = False
        self.paused = False
        self.head = None        # parsed request waiting for its body: (head_len)
        self.body_len = 0
        self.cost = 0
        self.op = self.name = None
        self.t0 = 0.0

    # ------------------------------------------------------------------ asyncio protocol

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.owner.conns.add(self)

    def connection_lost(self, exc) -> None:
        self.owner.conns.discard(self)
        if self.head is not None and self.cost >= 0:  # admitted, body never completed
            self.daemon.worker.release(self.cost)
            self.head = None
        self.closing = True

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._process()
        elif len(self.buf) > (1 << 20) and not self.paused:  # a client pipelining a lot: slow it down
            self.paused = True
            self.transport.pause_reading()

    # ------------------------------------------------------------------ requests

    def _process(self) -> None:
        """Serve the complete requests in buf, one at a time (answers stay in order)."""
        while not self.busy and not self.closing:
            buf = self.buf
            if self.head is None:
                end = buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
                if end < 0:  # wait for the rest of the header block only if it may be ours
                    n = min(len(buf), len(_PREFIX))
                    if len(buf) > MAX_HEAD or buf[:n] != _PREFIX[:n]:
                        return self._hand_over()
                    return
                if not self._parse_head(bytes(buf[:end]), end + 4):
                    return self._hand_over()
                if self.closing:  # answered 503 and closing
                    return
            head_len = self.head
            if len(buf) < head_len + self.body_len:
                return
            body = bytes(buf[head_len:head_len + self.body_len])
            del buf[:head_len + self.body_len]
            self.head = None
            self._start(body)
        if self.paused and not self.busy and not self.closing:
            self.paused = False
            self.transport.resume_reading()

    def _parse_head(self, head: bytes, head_len: int) -> bool:
        """True: a request this path serves (admitted, waiting for its body). False: aiohttp's."""
        d = self.daemon
        if d.draining:  # whatever it is: the daemon is stopping (the answer closes the connection)
            self.t0, self.name, self.head, self.body_len, self.cost = time.perf_counter(), "unmatched", head_len, 0, -1
            self._answer_error(503, "the daemon is shutting down", (("Retry-After", "2"),))
            return True
        if not d.ready:
            return False
        heads = self.owner.heads
        known = heads.get(head)
        if known is None:
            known = self._route(head)
            if len(heads) >= HEAD_CACHE:
                heads.clear()
            heads[head] = known
        if not known:
            return False
        op, length = known
        self.t0 = time.perf_counter()
        self.op, self.name = op, "/v1/" + op
        try:
            d.worker.admit(length)
        except Overloaded:
            d.metrics.rejected.inc()
            self._answer_error(503, "the request queue is full; retry shortly", (("Retry-After", "1"),))
            # The body still arrives: skip it by reading it as a request nobody serves.
            self.head, self.body_len, self.cost = head_len, length, -1
            return True
        self.head, self.body_len, self.cost = head_len, length, length
        return True

    def _route(self, head: bytes):
        """(op, body length) if this path serves a request with this header block, else False.
        Depends on the header bytes and the daemon's fixed settings only (cached per block)."""
        d = self.daemon
        if _ODD.search(head) is not None:
            return False
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[0] != b"POST" or parts[2] != b"HTTP/1.1":
            return False
        op = FAST_ROUTES.get(parts[1])
        if op is None:
            return False
        length = ctype = auth = None
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name[-1:] in (b" ", b"\t") or line[:1] in (b" ", b"\t"):
                return False
            name = name.lower()
            value = value.strip()
            if name == b"content-length":
                if length is not None or not value.isdigit() or len(value) > 18:
                    return False
                length = int(value)
            elif name == b"content-type":
                if ctype is not None:
                    return False
                ctype = value
            elif name == b"authorization":
                if auth is not None:
                    return False
                auth = value
            elif name in (b"transfer-encoding", b"expect", b"connection", b"upgrade", b"content-encoding"):
                return False  # keep-alive is HTTP/1.1's default; any other choice is aiohttp's to make
        if length is None or length == 0 or length > d.config.max_body_bytes or ctype != b"application/x-npy":
            return False
        token = d.token
        if token is not None and not (auth is not None and auth.startswith(b"Bearer ")
                                      and hmac.compare_digest(auth[7:].strip(), token)):
            return False
        return op, length

    def _start(self, body: bytes) -> None:
        cost = self.cost
        if cost < 0:  # the body of a request refused with 503
            return
        if self.daemon.draining:  # admitted before the stop, body complete after it
            self.daemon.worker.release(cost)
            self._answer_error(503, "the daemon is shutting down", (("Retry-After", "2"),))
            return
        try:
            pixels = decode_pixels(body, "application/x-npy", self.daemon.bundle.input_spec,
                                   self.daemon.config.max_images_per_request)
        except Exception as e:  # noqa: BLE001 (InputError: 400; anything else: 500, logged)
            from .server_routes import error_for

            self.daemon.worker.release(cost)
            status, message, extra = error_for(e, self.daemon)
            if status == 500:
                log.error("unexpected error in POST %s", self.name, exc_info=e)
            self._answer_error(status, message, extra)
            return
        self.busy = True
        self.daemon.worker.submit_nowait(Job(self.op, pixels), cost, self._done)

    def _done(self, result) -> None:
        """The worker's answer (on the event loop): send it, then serve what was pipelined."""
        if isinstance(result, BaseException):
            from .server_routes import error_for

            status, message, extra = error_for(result, self.daemon)
            if status == 500:
                log.error("unexpected error in POST %s", self.name, exc_info=result)
            self._answer_error(status, message, extra)
        else:
            if self.op == "cluster":
                assignments, seq = result
                doc = {"assignments": [a.to_dict() for a in assignments], "seq": seq}
            else:
                doc = {"assignments": [a.to_dict() for a in result]}
            self._send(200, json.dumps(doc).encode())
        self.busy = False
        if self.buf and not self.closing:
            self._process()
        elif self.paused and not self.closing:
            self.paused = False
            self.transport.resume_reading()

    def _answer_error(self, status: int, message: str, extra: tuple = ()) -> None:
        self._send(status, json.dumps({"error": message}).encode(), extra)

    def _send(self, status: int, body: bytes, extra: tuple = ()) -> None:
        d = self.daemon
        if d.draining:  # answer this one, then close: the daemon is stopping
            extra = tuple(extra) + (("Connection", "close"),)
        if not self.closing:
            self.transport.write(_response(status, body, extra))
        self.owner.served += 1
        m = d.metrics
        m.latency.observe(time.perf_counter() - self.t0, self.name)
        m.requests.inc(self.name, str(status))
        if d.draining and not self.closing:
            self.closing = True
            self.transport.close()

    def close_when_idle(self) -> None:
        if not self.busy and self.head is None:
            self.closing = True
            self.transport.close()

    # ------------------------------------------------------------------ everything else: aiohttp

    def _hand_over(self) -> None:
        """Give the connection and what it sent so far to aiohttp's request handler."""
        self.owner.conns.discard(self)
        self.owner.handed += 1
        self.closing = True  # this object is done
        proto = self.owner.aiohttp_server()
        transport = self.transport
        transport.set_protocol(proto)
        proto.connection_made(transport)
        data, self.buf = bytes(self.buf), bytearray()
        if self.paused:
            self.paused = False
            transport.resume_reading()
        if data:
            proto.data_received(data)



def sites(web):
    """aiohttp's TCP and Unix socket sites, listening with FastHTTP (which hands what it does not
    serve to aiohttp's handler) instead of aiohttp's handler: (FastTCPSite, FastSockSite)."""

    class FastTCPSite(web.TCPSite):
        def __init__(self, runner, host, port, *, fast: FastConnections, **kwargs):
            super().__init__(runner, host, port, **kwargs)
            self._fast = fast

        async def start(self) -> None:  # web.TCPSite.start with our protocol factory
            await web.BaseSite.start(self)
            self._server = await asyncio.get_running_loop().create_server(
                self._fast, self._host, self._port, backlog=self._backlog, reuse_address=self._reuse_address,
                reuse_port=self._reuse_port)
            self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port

    class FastSockSite(web.SockSite):
        def __init__(self, runner, sock, *, fast: FastConnections, **kwargs):
            super().__init__(runner, sock, **kwargs)
            self._fast = fast

        async def start(self) -> None:  # web.SockSite.start with our protocol factory
            await web.BaseSite.start(self)
            self._server = await asyncio.get_running_loop().create_server(self._fast, sock=self._sock,
                                                                          backlog=self._backlog)

    return FastTCPSite, FastSockSite
