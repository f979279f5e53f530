"""The response relay: one request's bytes to the engine, its response to the client.

Once a request is parsed and routed, what remains per response is relaying bytes, and that is
done from the engine connection's protocol callback straight into the client's transport: no
task wake-up, no copy, no parsing of SSE events. The head is parsed once (and forwarded verbatim
when it carries no hop-by-hop header); chunked bodies pass through as they are, and only the
chunk-size lines are read, to find where the response ends.

The one exception is a 5xx with a small body: it is held back until complete, because it may say
that the engine is dead (vLLM's ``EngineDeadError``, answered at once for seconds after its
EngineCore died). Such an answer, a 502/503, or a connection reset before any byte, leaves the
client untouched: the proxy may then send the request to another engine instead.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from mpsd.backend import Backend
from mpsd.pool import BackendPool, Lease
from mpsd.proxy.chunked import ChunkedDecoder, FramingError
from mpsd.proxy.errors import sse_error_event
from mpsd.proxy.framing import HOP_RESPONSE, Request, ResponseHead, status_of
from mpsd.proxy.front import FrontConnection
from mpsd.proxy.http_rules import Limits
from mpsd.proxy.upstream import UpstreamConnection

MAX_HEAD_BYTES = 64 * 1024
MAX_HELD_BYTES = 64 * 1024  # a 5xx body held back to be read (vLLM's are ~200 bytes)
_PLAIN_ERRORS = {404: b"Not Found", 405: b"Method Not Allowed"}
_DEAD_ENGINE = re.compile(rb"EngineDeadError|EngineCore encountered an issue")
_ENGINE_LIMITS = Limits()  # an engine's trailers are bounded like a client's
_UNLIMITED = 1 << 62

_NONE, _LENGTH, _CHUNKED, _DECHUNK, _EOF, _HELD = range(6)


class Exchange:
    """One request sent to an engine and its response relayed to the client, start to end.

    Until its single end (:meth:`_end`) it owns the backend's lease and the upstream connection.
    Every way a request can end — response complete, engine failure before or after the head,
    first-byte timeout, client gone — goes through ``_end``, which releases the lease (once),
    gives back or drops the upstream connection and calls ``on_end(self)``; the proxy then
    records the request and answers what is left to answer (``error``: nothing reached the
    client yet). After the head, a failure is handled here: an SSE stream gets an error event and
    a clean end, anything else has its client connection closed, and ``broken`` is set.
    ``retryable``: the engine failed and the client has seen nothing, so another engine may take
    the request (``held``: the engine's answer, for the client if none does); ``tried``: the
    engines this request already failed on.

    Stall detection is per exchange (:meth:`check_stall`, from the proxy's housekeeping): a
    streaming response that sends nothing for ``stall_timeout_s`` while its client is reading
    condemns its engine. An exchange paused because its client does not read is not judged (its
    engine is waiting for it, not hung; the send timeout is the client's limit), and neither is
    a request before its response head (vLLM sends a non-streaming answer only at its end:
    ``first_byte_timeout_s`` is that wait's limit).
    """

    __slots__ = ("_buf", "_chunks", "_framing", "_left", "_out", "_paused", "active", "backend",
                 "backend_model", "backends", "broken", "client", "client_gone", "deadline",
                 "ended", "engine", "error", "head_at", "head_only", "held", "http11",
                 "keep_alive", "lease", "model", "on_end", "pool", "quiet_since", "request",
                 "retryable", "reusable", "sse", "started", "status", "streaming", "tried",
                 "upstream")

    def __init__(self, client: FrontConnection, upstream: UpstreamConnection, lease: Lease,
                 request: Request, model: str | None, started: float,
                 on_end: Callable[[Exchange], None]) -> None:
        self.client = client
        self.upstream = upstream
        self.pool = upstream.pool
        self.lease = lease
        assert lease.backend is not None
        self.backend: Backend = lease.backend
        self.backends: BackendPool = lease.pool
        self.engine = self.backend.key
        self.backend_model = self.backend.model
        self.tried: list[Backend] | None = None
        self.retryable = False
        self.held = b""
        self.request = request
        self.model = model
        self.started = started
        self.on_end = on_end
        self.keep_alive = request.keep_alive
        self.http11 = request.http11
        self.head_only = request.method == b"HEAD"
        self.status = 0
        self.head_at = 0.0
        self.deadline = 0.0
        self.broken = False
        self.sse = False
        self.streaming = False  # an SSE response past its head: judged for stalls
        self.active = False  # a byte came from the engine since the last stall check
        self.quiet_since = 0.0
        self.reusable = True
        self.ended = False
        self.client_gone = False
        self.error: tuple[int, str] | None = None
        self._buf = b""
        self._framing = -1
        self._left = 0
        self._chunks: ChunkedDecoder | None = None
        self._paused = False
        # the client transport's own write, not a wrapper: this runs once per relayed read.
        # Safe because a client connection that closes or aborts ends its exchange first.
        assert client.transport is not None
        self._out = client.transport.write

    def start(self, data: bytes, now: float, first_byte_timeout_s: float,
              rest: bytes = b"") -> None:
        upstream = self.upstream
        assert upstream.transport is not None
        upstream.exchange = self
        upstream.uses += 1
        self.client.attach(self)  # paused from the start if the client is not reading
        self.deadline = now + first_byte_timeout_s
        self.pool.awaiting.add(self)
        upstream.transport.write(data)
        if rest:  # a large body, not joined to the head (see upstream_request); as a view, so
            upstream.transport.write(memoryview(rest))  # what the socket does not take is
            # copied into the transport's buffer once, not sliced into a new bytes first

    # -- engine -> client -------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self.active = True  # a byte from the engine: this stream is not stalled
        framing = self._framing
        if framing == _CHUNKED:  # the hot path: an SSE event or a slice of a chunked body
            assert self._chunks is not None
            try:
                end = self._chunks.feed(data)
            except FramingError:
                self._break("the engine sent malformed chunked framing")
                return
            if end < 0:
                self._out(data)
                return
            self._out(data if end == len(data) else data[:end])
            self._end(end == len(data) and self.reusable)
            return
        if framing < 0:
            self._feed_head(data)
            return
        if framing == _HELD:
            self._feed_held(data)
            return
        self._relay(data)

    def _feed_head(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._buf = buf
                if len(buf) > MAX_HEAD_BYTES:
                    self._fail_before_head(502, "the engine sent an oversized response head")
                return
            status = status_of(buf)
            if 100 <= status < 200 and status != 101:  # interim response: wait for the real one
                buf = buf[end + 4:]
                continue
            break
        self._buf = b""
        try:
            head = self._client_head(buf[:end], status)
        except ValueError:
            self._fail_before_head(502, "the engine sent a malformed response head")
            return
        self.pool.awaiting.discard(self)
        self.status = status
        self.head_at = self.pool.loop.time()
        rest = buf[end + 4:]
        if status >= 500:
            if self._hold(head, rest):
                return
        elif status in _PLAIN_ERRORS and self._framing == _LENGTH and self._left <= 64:
            self._framing = _HELD  # maybe the web framework's own plain error: read it whole
            self.held = head
            self._feed_held(rest)
            return
        elif self.backend.consecutive_5xx:
            self.backends.answered_ok(self.backend)
        framing = self._framing
        if framing == _NONE:
            self._out(head)
            self._end(not rest and self.reusable)
        elif framing == _LENGTH:  # a whole JSON answer usually comes in one read: one write
            left = self._left
            if len(rest) < left:
                self._left = left - len(rest)
                self._out(head + rest if rest else head)
            else:
                self._out(head + rest[:left])
                self._end(len(rest) == left and self.reusable)
        else:
            self._out(head)
            if self.sse:  # a stream: from now on, judged for stalls
                self.streaming = True
                self.quiet_since = self.head_at
                self.pool.streams.add(self)
            if rest:
                self.feed(rest)

    def _hold(self, head: bytes, rest: bytes) -> bool:
        """A 5xx: hold it back if it is small enough to read whole (False: relay it as it is)."""
        if self._framing == _NONE:
            self._judge(head, b"")
            return True
        if self._framing != _LENGTH or self._left > MAX_HELD_BYTES:
            self.backends.answered_5xx(self.backend, self.pool.loop.time(), self.status)
            return False
        self._framing = _HELD
        self.held = head
        self._feed_held(rest)
        return True

    def _feed_held(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= self._left:
            body, extra = self._buf[:self._left], self._buf[self._left:]
            self._buf = b""
            self.reusable = self.reusable and not extra
            if self.status in _PLAIN_ERRORS:
                self._reshape(body)
            else:
                self._judge(self.held, body)

    def _reshape(self, body: bytes) -> None:
        """vLLM's web framework answers an unknown path or method with ``{"detail": ...}``;
        an OpenAI client expects ``{"error": {...}}``: mpsd answers in that shape instead.
        Any other small 404/405 (a model not found, ...) goes to the client as it came."""
        what = _PLAIN_ERRORS[self.status]
        if body.strip() == b'{"detail":"%s"}' % what:
            self.held = b""
            path = self.request.path.decode("utf-8", "replace")
            method = self.request.method.decode("ascii", "replace")
            self.error = (self.status, f"{what.decode()}: {method} {path} is not served here "
                          "(see the engine's OpenAI API, e.g. /v1/completions)")
        else:
            self.held += body
        self._end(self.reusable)

    def _judge(self, head: bytes, body: bytes) -> None:
        """A whole 5xx: does it say the engine is dead? Either way the proxy decides what the
        client gets (another engine's answer, or this one)."""
        backend, status = self.backend, self.status
        now = self.pool.loop.time()
        dead = _DEAD_ENGINE.search(body) is not None
        if dead:
            self.backends.eject(backend, now, "engine_dead",
                                f"{backend.key} answered {status}: its EngineCore is dead",
                                dead=True)
            self.reusable = False
        else:
            self.backends.answered_5xx(backend, now, status)
        self.held = head + body
        # an engine ejected for its run of 5xx is broken: its 500s are not the requests' fault
        self.retryable = dead or status in (502, 503) or backend.ejected_until > 0
        self._end(self.reusable)

    def flush_held(self) -> None:
        """No other engine took it: the client gets the engine's own 5xx after all."""
        if self.held:
            self._out(self.held)
            self.held = b""

    def _client_head(self, head: bytes, status: int) -> bytes:
        """The head for the client; verbatim when the engine's has no hop-by-hop headers."""
        parsed = ResponseHead(head, status)
        self.reusable = not parsed.close
        self.sse = parsed.sse
        length = parsed.length
        chunked = parsed.chunked
        bodiless = self.head_only or status in (204, 304) or 100 <= status < 200
        if bodiless:
            self._framing = _NONE
        elif chunked:
            self._framing = _CHUNKED if self.http11 else _DECHUNK
            self._chunks = ChunkedDecoder(_ENGINE_LIMITS, _UNLIMITED)
            self.keep_alive = self.keep_alive and self.http11
        elif length is not None:
            self._framing = _LENGTH if length else _NONE
            self._left = length
        else:
            self._framing = _EOF
            self.reusable = False
            self.keep_alive = False
        if (self.keep_alive and self.http11 and self._framing != _DECHUNK and parsed.http11
                and not parsed.hop_by_hop):
            return head + (b"\r\nx-accel-buffering: no\r\n\r\n" if self.sse else b"\r\n\r\n")
        return self._rebuilt_head(head, length, chunked, bodiless)

    def _rebuilt_head(self, head: bytes, length: int | None, chunked: bool,
                      bodiless: bool) -> bytes:
        lines = head.split(b"\r\n")
        out = [b"HTTP/1.1" + lines[0][8:]]
        for line in lines[1:]:
            if line.partition(b":")[0].strip().lower() not in HOP_RESPONSE:
                out.append(line)
        if self.sse:
            out.append(b"x-accel-buffering: no")
        if bodiless:
            if length is not None and self.head_only:
                out.append(b"content-length: %d" % length)
        elif self._framing == _CHUNKED:
            out.append(b"transfer-encoding: chunked")
        elif self._framing in (_LENGTH, _NONE) and length is not None:
            out.append(b"content-length: %d" % length)
        if not self.keep_alive:
            out.append(b"connection: close")
        elif not self.http11:  # an HTTP/1.0 client closes unless told otherwise
            out.append(b"connection: keep-alive")
        out.append(b"\r\n")
        return b"\r\n".join(out)

    def _relay(self, data: bytes) -> None:
        framing = self._framing
        if framing == _LENGTH:
            left = self._left
            if len(data) < left:
                self._left = left - len(data)
                self._out(data)
                return
            self._out(data if len(data) == left else data[:left])
            self._end(len(data) == left and self.reusable)
        elif framing == _EOF:
            self._out(data)
        elif framing == _DECHUNK:  # an HTTP/1.0 client: the payloads alone
            assert self._chunks is not None
            payload: list[bytes] = []
            try:
                end = self._chunks.feed(data, payload)
            except FramingError:
                end = -2
            if payload:
                self._out(b"".join(payload))
            if end == -2:
                self._break("the engine sent malformed chunked framing")
            elif end >= 0:
                self._end(end == len(data) and self.reusable)
        elif framing == _CHUNKED:
            self.feed(data)

    # -- endings ----------------------------------------------------------------------------

    def _end(self, reuse: bool) -> None:
        """The one way out: lease released, upstream kept or dropped, the proxy told."""
        if self.ended:
            return
        self.ended = True
        self.pool.awaiting.discard(self)
        if self.streaming:
            self.pool.streams.discard(self)
        self.lease.release()
        upstream = self.upstream
        if self._paused and upstream.transport is not None:
            upstream.transport.resume_reading()
            self._paused = False
        if reuse and not self.broken:
            self.pool.release(upstream, True)
        else:
            upstream.exchange = None
            if upstream.transport is not None:
                upstream.transport.abort()  # the engine sees the disconnect and aborts
        if self.client.exchange is self:
            self.client.exchange = None
        self.on_end(self)

    def _fail_before_head(self, status: int, message: str) -> None:
        if not self.ended:
            self.error = (status, message)
            self._end(False)

    def _break(self, message: str) -> None:
        """The engine failed after the head went out: end the client's response as well as we
        can — an SSE stream at a chunk boundary gets an error event and a proper end."""
        if self.ended:
            return
        self.broken = True
        event = sse_error_event(502, f"the engine failed mid-stream: {message}")
        at_boundary = self._chunks is not None and self._chunks.at_boundary
        if self.sse and self._framing == _CHUNKED and at_boundary:
            self._out(b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event))
        else:  # no clean way to end this response: the client connection goes (on_end sees
            # keep_alive False and closes it, so the client notices the body is cut short)
            if self.sse and self._framing in (_DECHUNK, _EOF):
                self._out(event)
            self.keep_alive = False
        self._end(False)

    def upstream_lost(self) -> None:
        if self.ended:
            return
        if self._framing < 0:
            # nothing reached the client: another engine may take it. A fresh connection that
            # the engine drops unanswered means the engine is going; a reused one may just
            # have been closed as idle by the engine at the wrong moment.
            self.retryable = True
            if self.upstream.uses == 1:
                backend = self.backend
                self.backends.eject(backend, self.pool.loop.time(), "reset",
                                    f"{backend.key} reset a new connection unanswered", dead=True)
            self._fail_before_head(502, "the engine closed the connection before answering")
        elif self._framing == _HELD:
            self._fail_before_head(502, "the engine closed the connection while answering")
        elif self._framing == _EOF:
            self._end(False)
        else:
            self._break("the engine closed the connection")

    def check_stall(self, now: float, stall_s: float) -> None:
        """The housekeeping's look at a stream (every second or so): a stream its client reads
        that sent nothing for ``stall_s`` is a hung engine; a paused one starts its clock again
        (its engine waits for the client, and gets the full time once the client reads)."""
        if self.active or self._paused:
            self.active = False
            self.quiet_since = now
        elif stall_s and now - self.quiet_since >= stall_s and not self.ended:
            backend = self.backend
            quiet = now - self.quiet_since
            if backend.ejected_until != math.inf:  # not condemned already (a sibling stream)
                self.backends.eject(backend, now, "stall", f"{backend.key} sent nothing for "
                                    f"{quiet:.1f}s on a stream its client was reading",
                                    dead=True)
            self._break(f"the engine sent nothing for {quiet:.0f} s")

    def engine_gone(self) -> None:
        """The engine was condemned or removed: end now, whatever the client is doing (a
        paused exchange would otherwise never notice and keep its lease). Before the head the
        client saw nothing, so another engine may take the request."""
        if self.ended:
            return
        if self._framing < 0 or self._framing == _HELD:
            self.retryable = True
            self.held = b""
            self._fail_before_head(502, "the engine failed before answering")
        else:
            self._break("the engine was taken out of service")

    def first_byte_timeout(self) -> None:
        if self._framing < 0:
            self._fail_before_head(504, "no response from the engine within "
                                        "first_byte_timeout_s")

    # -- client -> engine signals (FrontConnection calls these) -----------------------------

    def client_lost(self) -> None:
        """The client went away: drop the engine connection so the engine aborts the request."""
        self.client_gone = True
        self._end(False)

    def pause(self) -> None:
        if not self._paused and self.upstream.transport is not None:
            self._paused = True
            self.upstream.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.upstream.transport is not None:
            self._paused = False
            self.upstream.transport.resume_reading()
