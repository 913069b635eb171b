"""A lean HTTP/1.1 path for the daemon's hot routes, in front of aiohttp.

Every connection starts on FastHTTP, a plain asyncio protocol whose HTTP parsing is httptools
(MagicStack's binding of llhttp, the C parser of Node.js; uvicorn's parser too). It serves only
the requests that make up the daemon's load: `POST /v1/cluster` or `POST /v1/assign` with an
application/x-npy body and a Content-Length, on a keep-alive HTTP/1.1 connection, with the right
bearer token if one is configured. Anything else (another route or method, a query string, a
chunked body, Expect, Connection, Upgrade, Content-Encoding, HTTP/1.0, a token mismatch, a body
over the limit, a header block over 8 KiB, the daemon not ready, anything llhttp refuses) hands
the connection to aiohttp's own request handler, with the raw bytes of that request and of
everything after it; aiohttp then serves the connection for good, so every other case keeps
aiohttp's rules and answers. The decision is made at llhttp's on_headers_complete at the latest,
before any of that request's body is buffered.

Nothing here splits or interprets HTTP syntax: llhttp finds the method, target, version, header
names and values, Content-Length and message boundaries; this module only compares the values it
is given (header names case-insensitively) and serialises its own responses.

Handing over needs the exact offset where the handed request begins, which httptools does not
report. The protocol keeps the raw bytes received since the last known message boundary: after
each feed_data() the boundary is known when the parser is between messages, or inside the
Content-Length body of a request this path serves (the message then ends exactly `remaining`
bytes later). Only when a handed request follows other requests in the kept bytes (pipelining)
is its offset computed, by replaying those requests through a second httptools parser (their
header blocks a byte at a time, their bodies at once: the count of on_headers_complete and
on_message_complete calls then gives the position); the same replay moves the boundary forward
when reads keep ending inside header blocks and the kept bytes pass 64 KiB. CR/LF bytes between requests, which llhttp
(and aiohttp) skip, may be left out of what aiohttp gets.

Why this path exists: with one image per request, aiohttp's per-request Python work on the event
loop (request and response objects, router, middleware, stream reader, writer) cost about as much
CPU as the encoder, and it holds the GIL the worker thread needs. This path does the same work for
these two routes in a few microseconds of Python: the same admission (admit, 503 when full), the
same .npy decoding and checks (decode_pixels), the same worker (submit), the same metrics, the
same JSON answers, and one transport.write per answer. Pipelined requests are answered in order,
one at a time; each is admitted when it reaches the front.
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import math
import socket
import time
from collections import deque
from email.utils import formatdate

import httptools

from .server_batcher import Overloaded
from .server_codec import decode_pixels
from .server_state import Job

log = logging.getLogger(__name__)

FAST_ROUTES = {b"/v1/cluster": "cluster", b"/v1/assign": "assign"}
MAX_HEAD = 8192          # a larger header block goes to aiohttp (whose limit is 8190 bytes a line)
MAX_BACKLOG = 1 << 20    # bytes received while a request is served; more, and reading pauses
MAX_RAW = 1 << 16        # kept raw bytes (see FastHTTP.raw) above which base moves forward
_NPY = b"application/x-npy"
# Headers that make a request aiohttp's: keep-alive is HTTP/1.1's default and any other choice
# (Connection), chunked bodies, Expect: 100-continue, upgrades and encoded bodies are aiohttp's to handle.
_HANDED_HEADERS = frozenset((b"transfer-encoding", b"expect", b"connection", b"upgrade", b"content-encoding"))
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
    """The whole answer, one bytes object: status line, Content-Type, Content-Length, Date,
    Server, the extra headers, the body."""
    extras = b"".join(f"{k}: {v}\r\n".encode() for k, v in extra) if extra else b""
    return b"%s%d\r\nDate: %s\r\nServer: protoedge\r\n%s\r\n%s" % (
        _status_head(status), len(body), _date.get(), extras, body)


@functools.lru_cache(maxsize=None)
def _status_head(status: int) -> bytes:
    """The answer's first lines up to the Content-Length value (the same for every answer of a status)."""
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: "
            % (status, _REASONS.get(status, "Error").encode()))


_ASSIGNMENT = '{"cluster_id": %d, "distance": %s, "confidence": %s, "new_cluster": %s, "label": %s}'


def _assignments_json(assignments) -> str:
    """json.dumps([a.to_dict() for a in assignments]), the same text in a third of the time (this
    runs once per request on the event loop). Anything but the plain types goes to json.dumps."""
    parts = []
    for a in assignments:
        cid, dist, conf, new, label = a
        if (type(cid) is not int or type(dist) is not float or type(conf) is not float or type(new) is not bool
                or not math.isfinite(conf) or (label is not None and type(label) is not str)):
            return json.dumps([x.to_dict() for x in assignments])
        parts.append(_ASSIGNMENT % (cid, repr(dist) if math.isfinite(dist) else "null", repr(conf),
                                    "true" if new else "false", "null" if label is None else json.dumps(label)))
    return "[" + ", ".join(parts) + "]"


_ONE_CLUSTERED = ('{"assignments": [{"cluster_id": %d, "distance": %r, "confidence": %r, "new_cluster": %s, '
                  '"label": null}], "seq": %d}')


def _cluster_answer(assignments, seq: int) -> str:
    """The /v1/cluster answer; one unlabelled image (the load's usual request) in one formatting
    step, the same text as the general case."""
    if len(assignments) == 1:
        cid, dist, conf, new, label = assignments[0]
        if (label is None and type(cid) is int and type(dist) is float and type(conf) is float
                and type(new) is bool and math.isfinite(dist) and math.isfinite(conf) and type(seq) is int):
            return _ONE_CLUSTERED % (cid, dist, conf, "true" if new else "false", seq)
    return '{"assignments": %s, "seq": %d}' % (_assignments_json(assignments), seq)


def _route(url: bytes):
    """The hot route an origin-form request target names exactly (no query, no fragment), or None
    (remembered per target: clients repeat the same two)."""
    try:
        return _ROUTE_SEEN[url]
    except KeyError:
        pass
    if len(_ROUTE_SEEN) >= 256:
        _ROUTE_SEEN.clear()
    _ROUTE_SEEN[url] = op = _parse_route(url)
    return op


_ROUTE_SEEN: dict = {}


def _parse_route(url: bytes):
    try:
        u = httptools.parse_url(url)
    except httptools.HttpParserInvalidURLError:
        return None
    if u.query is not None or u.fragment is not None or u.schema is not None or u.host is not None \
            or u.port is not None or u.userinfo is not None:
        return None
    return FAST_ROUTES.get(u.path)


_OTHER, _CLEN, _CTYPE, _AUTH, _HANDED = "other", "content-length", "content-type", "authorization", "handed"
# Header name as sent (any case) -> what on_header does with it. Remembered per name, as _route
# does per target: clients send the same few names, and the lookup is cheaper than lowering and
# comparing each one.
_HEADER_KINDS: dict = {}


def _header_kind(name: bytes) -> str:
    lower = name.lower()
    kind = (_CLEN if lower == b"content-length" else _CTYPE if lower == b"content-type"
            else _AUTH if lower == b"authorization" else _HANDED if lower in _HANDED_HEADERS else _OTHER)
    if len(name) <= 64:  # (the names worth remembering are short; a client's odd ones are not kept)
        if len(_HEADER_KINDS) >= 256:
            _HEADER_KINDS.clear()
        _HEADER_KINDS[bytes(name)] = kind
    return kind


class _HandOver(Exception):
    """Raised in a parser callback: the request is aiohttp's (parsing stops there)."""


class _Request:
    """A request this path serves: its body, and its place in the worker's queue."""

    __slots__ = ("op", "length", "parts", "received", "cost", "complete", "before_base")

    def __init__(self, op: str, length: int):
        self.op, self.length = op, length
        self.parts: list = []      # body chunks as llhttp delivered them
        self.received = 0
        self.cost = None           # None: not admitted yet; -1: answered 503 (body skipped); else admitted bytes
        self.complete = False
        self.before_base = False   # began before FastHTTP.raw's first byte (its body ends `skip` bytes later)


class _Boundaries:
    """Counts llhttp's events: used to replay requests and find where they end."""

    __slots__ = ("headers", "messages")

    def __init__(self):
        self.headers = self.messages = 0

    def on_headers_complete(self) -> None:
        self.headers += 1

    def on_message_complete(self) -> None:
        self.messages += 1


def _end_of(raw: bytes, lengths: list) -> int:
    """The offset in raw just after the len(lengths) requests it starts with, whose bodies have
    these Content-Lengths: replayed through a fresh llhttp parser, each header block a byte at a
    time (on_headers_complete fires on its last byte), then its body at once. Rare (a request for
    aiohttp pipelined behind requests of this path) and bounded (raw is at most a few MB)."""
    events = _Boundaries()
    parser = httptools.HttpRequestParser(events)
    pos = 0
    for i, n in enumerate(lengths, 1):
        while events.headers < i:
            if pos >= len(raw):
                raise ValueError("end of data inside a replayed request's header block")
            parser.feed_data(raw[pos:pos + 1])
            pos += 1
        parser.feed_data(raw[pos:pos + n])
        pos += n
        if events.messages != i:
            raise ValueError("a replayed request did not end where its Content-Length says")
    return pos


class FastConnections:
    """The daemon's fast-path connections: protocol factory, and their shutdown."""

    def __init__(self, daemon, aiohttp_server):
        self.daemon = daemon
        self.aiohttp_server = aiohttp_server  # web.Server: a factory of aiohttp protocols
        self.conns: set = set()
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
    """One connection. Bytes go to llhttp (feed_data) unless a request is being served, in which
    case they wait in backlog (pipelining). llhttp's callbacks only record: a request this path
    serves joins `pending` at on_headers_complete; anything else raises _HandOver, which stops
    parsing. Requests are then admitted, decoded and submitted in order, one at a time (_pump),
    outside the parser's callbacks."""

    __slots__ = ("owner", "daemon", "transport", "parser", "raw", "skip", "done", "fed", "chunk_end", "in_msg",
                 "in_head", "head_from", "head_size", "url", "ctype", "auth", "clen", "odd", "cur", "pending",
                 "backlog", "handing", "busy", "closing", "paused", "op", "name", "t0")

    def __init__(self, owner: FastConnections):
        self.owner, self.daemon = owner, owner.daemon
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        # The raw bytes since the last known message boundary ("base"), and what follows it.
        self.raw = bytearray()
        self.skip = 0           # body bytes still to come of a request that began before base
        self.done: list = []    # Content-Lengths of the requests completed since base
        self.fed = 0            # bytes fed to the parser before the current feed
        self.chunk_end = 0      # ... and including it
        # The message being parsed.
        self.in_msg = self.in_head = False
        self.head_from = self.head_size = 0
        self.url = b""
        self.ctype = self.auth = self.clen = None
        self.odd = False        # a header that makes the request aiohttp's
        self.cur = None         # its _Request, once on_headers_complete chose this path
        self.pending: deque = deque()  # requests of this path not answered yet, in order
        self.backlog = bytearray()     # bytes received while busy, not fed yet
        self.handing = None     # bytes for aiohttp (from the start of its first request) once pending is answered
        self.busy = False       # the worker has the front request
        self.closing = False
        self.paused = False
        self.op = self.name = None  # the front request's, for its answer and metrics
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
        for r in self.pending:  # admitted, never submitted
            if r.cost is not None and r.cost >= 0:
                self.daemon.worker.release(r.cost)
        self.pending.clear()
        self.closing = True

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.handing is not None:
            self.handing += data
            self._throttle(len(self.handing))
        elif self.busy or self.backlog:
            self.backlog += data
            self._throttle(len(self.backlog))
        else:
            self._feed(data)
            self._run()

    def _throttle(self, waiting: int) -> None:
        if waiting > MAX_BACKLOG and not self.paused:  # a client pipelining a lot: slow it down
            self.paused = True
            self.transport.pause_reading()

    # ------------------------------------------------------------------ llhttp

    def _feed(self, data: bytes) -> None:
        skip = self.skip
        if not skip:
            self.raw += data
        elif skip >= len(data):
            self.skip = skip - len(data)
        else:
            self.skip = 0
            self.raw += memoryview(data)[skip:]
        self.chunk_end = self.fed + len(data)
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            # _HandOver, or bytes llhttp refuses (aiohttp then answers them: 400 and close).
            cause = e.__context__
            if cause is not None and not isinstance(cause, _HandOver):
                log.error("unexpected error in the fast path's parser callbacks", exc_info=cause)
            return self._decide_hand_over()
        self.fed = self.chunk_end
        if not self.in_msg:  # between messages: a boundary
            self.raw.clear()
            self.done.clear()
        elif self.in_head:
            if self.chunk_end - self.head_from > MAX_HEAD:  # a header block still growing after 8 KiB
                self._decide_hand_over()
            elif self.done and len(self.raw) > MAX_RAW:  # reads that keep ending in a header block
                self._rebase()
        else:  # inside the Content-Length body of self.cur: it ends exactly `remaining` bytes later
            r = self.cur
            r.before_base = True
            self.raw.clear()
            self.done.clear()
            self.skip = r.length - r.received

    def on_message_begin(self) -> None:
        self.in_msg = self.in_head = True
        self.head_from, self.head_size = self.chunk_end, 0
        self.url = b""
        self.ctype = self.auth = self.clen = self.cur = None
        self.odd = False

    def on_url(self, url: bytes) -> None:
        self.url += url  # (in pieces when it spans reads)
        self.head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        kind = _HEADER_KINDS.get(name)
        if kind is None:
            kind = _header_kind(name)
        if kind is _OTHER:
            return
        if kind is _CLEN:  # (llhttp refuses duplicates and non-digits itself)
            if self.clen is not None or not value.isdigit() or len(value) > 18:
                self.odd = True
            else:
                self.clen = int(value)
        elif kind is _CTYPE:
            if self.ctype is not None:
                self.odd = True
            self.ctype = value
        elif kind is _AUTH:
            if self.auth is not None:
                self.odd = True
            self.auth = value
        else:  # _HANDED
            self.odd = True

    def on_headers_complete(self) -> None:
        """Decide: this path's request (waits in pending for its body) or aiohttp's (_HandOver)."""
        self.in_head = False
        d, p, length = self.daemon, self.parser, self.clen
        if (self.odd or not d.ready or self.head_size > MAX_HEAD or self.ctype != _NPY or length is None
                or length == 0 or length > d.config.max_body_bytes or p.get_method() != b"POST"
                or p.get_http_version() != "1.1" or not p.should_keep_alive()):
            raise _HandOver
        op = _route(self.url)
        if op is None:
            raise _HandOver
        token = d.token
        if token is not None:  # as server_routes._token_ok; a mismatch is aiohttp's to answer (401)
            auth = self.auth
            if not (auth is not None and auth.startswith(b"Bearer ") and hmac.compare_digest(auth[7:].strip(), token)):
                raise _HandOver
        self.cur = r = _Request(op, length)
        self.pending.append(r)

    def on_body(self, body: bytes) -> None:
        r = self.cur
        r.received += len(body)
        if r.cost != -1:  # (a request answered 503: its body is read and dropped)
            r.parts.append(body)

    def on_message_complete(self) -> None:
        self.in_msg = False
        r, self.cur = self.cur, None
        if r is None:  # (only an upgrade request completes without being ours; it raises next)
            return
        r.complete = True
        if not r.before_base:
            self.done.append(r.length)

    def _rebase(self) -> None:
        """Drop the kept bytes of the requests completed since base: base moves to the start of
        the request being parsed (keeps raw bounded when no read ends between requests)."""
        try:
            start = _end_of(bytes(self.raw), self.done)
        except Exception:  # noqa: BLE001 (cannot happen: llhttp parsed these bytes already)
            log.exception("fast path: cannot find where a pipelined request begins; closing the connection")
            self.closing = True
            self.transport.close()
            return
        del self.raw[:start]
        self.done.clear()

    def _decide_hand_over(self) -> None:
        """The request being parsed (or the bytes llhttp refused) and all after it go to aiohttp,
        once the requests before it are answered."""
        raw = bytes(self.raw)
        start = 0
        if self.done:  # it follows requests of this path in raw: find where they end
            try:
                start = _end_of(raw, self.done)
            except Exception:  # noqa: BLE001 (cannot happen: llhttp parsed these bytes already)
                log.exception("fast path: cannot find where a pipelined request begins; closing the connection")
                self.closing = True
                self.transport.close()
                return
        self.handing = bytearray(raw[start:])
        self.parser, self.raw, self.done, self.cur = None, bytearray(), [], None

    # ------------------------------------------------------------------ requests

    def _run(self) -> None:
        """Serve what is complete, feed what waited, hand over when it is aiohttp's turn."""
        while not self.closing:
            self._pump()
            if self.busy or self.closing:
                return
            if self.handing is not None:
                return self._hand_over()  # (pending is empty when not busy: see _pump)
            if not self.backlog:
                break
            data, self.backlog = bytes(self.backlog), bytearray()
            self._feed(data)
        if self.paused and not self.closing:
            self.paused = False
            self.transport.resume_reading()

    def _pump(self) -> None:
        """Admit the front request (503 when the queue is full), and start it once its body is in."""
        d, pending = self.daemon, self.pending
        while pending and not self.busy and not self.closing:
            r = pending[0]
            if r.cost is None:
                self.t0, self.op, self.name = time.perf_counter(), r.op, "/v1/" + r.op
                if d.draining:  # (the answer closes the connection)
                    return self._answer_error(503, "the daemon is shutting down", (("Retry-After", "2"),))
                try:
                    d.worker.admit(r.length)
                except Overloaded:
                    d.metrics.rejected.inc()
                    r.cost, r.parts = -1, []
                    pending.popleft()
                    self._answer_error(503, "the request queue is full; retry shortly", (("Retry-After", "1"),))
                    continue
                r.cost = r.length
            if not r.complete:
                return
            pending.popleft()
            self._start(r)

    def _start(self, r: _Request) -> None:
        cost, parts = r.cost, r.parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        r.parts = []
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
        self.daemon.worker.submit_nowait(Job(r.op, pixels), cost, self._done)

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
                doc = _cluster_answer(assignments, seq)
            else:
                doc = '{"assignments": %s}' % _assignments_json(result)
            self._send(200, doc.encode())
        self.busy = False
        if self.closing:
            return
        if self.pending or self.backlog or self.handing is not None:
            self._run()
        elif self.paused:
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
        if not self.busy and not self.pending:
            self.closing = True
            self.transport.close()

    # ------------------------------------------------------------------ everything else: aiohttp

    def _hand_over(self) -> None:
        """Give the connection and its bytes from the start of the handed request to aiohttp's
        request handler (which serves the connection from then on)."""
        if self.daemon.draining:  # no new aiohttp requests while stopping (its runner is closing)
            self.t0, self.name = time.perf_counter(), "unmatched"
            return self._answer_error(503, "the daemon is shutting down", (("Retry-After", "2"),))
        self.owner.conns.discard(self)
        self.owner.handed += 1
        self.closing = True  # this object is done
        proto = self.owner.aiohttp_server()
        transport = self.transport
        transport.set_protocol(proto)
        proto.connection_made(transport)
        data, self.handing, self.backlog = bytes(self.handing), None, bytearray()
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
