"""Pure parts of the proxy: request-head parsing, model extraction, error shapes."""

from __future__ import annotations

import json

import pytest

from mpsd.proxy.errors import error_body, sse_error_event
from mpsd.proxy.framing import parse_head
from mpsd.proxy.http_rules import HttpError
from mpsd.proxy.request import authorized, model_of, upstream_request


class TestParseHead:
    def test_typical_openai_request(self) -> None:
        req = parse_head(b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: a:8000\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 12\r\n"
                         b"Authorization: Bearer sk-1\r\nConnection: keep-alive\r\n"
                         b"X-Stainless-Lang: python")
        assert (req.method, req.target, req.path) == (
            b"POST", b"/v1/chat/completions?x=1", b"/v1/chat/completions")
        assert req.content_length == 12
        assert req.keep_alive and req.http11
        assert req.authorization == b"Bearer sk-1"
        # hop-by-hop and rewritten headers are not forwarded; end-to-end ones are, verbatim
        assert req.forward == [b"Content-Type: application/json", b"Authorization: Bearer sk-1",
                               b"X-Stainless-Lang: python"]

    def test_connection_close_and_listed_hop_by_hop_headers(self) -> None:
        req = parse_head(b"GET /v1/models HTTP/1.1\r\nHost: a\r\nConnection: close, X-Secret\r\n"
                         b"X-Secret: 1\r\nAccept: */*")
        assert not req.keep_alive
        assert req.forward == [b"Accept: */*"]

    def test_http10_keep_alive_only_when_asked(self) -> None:
        assert not parse_head(b"GET /health HTTP/1.0").keep_alive
        assert parse_head(b"GET /health HTTP/1.0\r\nConnection: keep-alive").keep_alive

    def test_absolute_form_target_is_reduced_to_its_path(self) -> None:
        req = parse_head(b"POST http://mpsd:8000/v1/completions?a=1 HTTP/1.1\r\nHost: mpsd")
        assert (req.target, req.path) == (b"/v1/completions?a=1", b"/v1/completions")
        assert parse_head(b"GET HTTPS://h HTTP/1.1\r\nHost: h").target == b"/"

    def test_chunked_and_expect(self) -> None:
        req = parse_head(b"POST /v1/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                         b"Expect: 100-continue")
        assert req.chunked and req.expect_continue and req.content_length is None

    @pytest.mark.parametrize(
        ("head", "status"),
        [
            (b"POST /v1/x HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked", 400),
            (b"POST /v1/x HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6", 400),
            (b"POST /v1/x HTTP/1.1\r\nContent-Length: -5", 400),
            (b"POST /v1/x HTTP/1.1\r\nTransfer-Encoding: gzip, chunked", 501),
            (b"POST /v1/x HTTP/1.1\r\nX-A: 1\nContent-Length: 5", 400),   # bare LF: smuggling
            (b"POST /v1/x HTTP/1.1\r\nX-A: 1\rContent-Length: 5", 400),   # bare CR
            (b"POST /v1/x HTTP/1.1\r\nX-A: a\x00b", 400),
            (b"POST /v1/x HTTP/1.1\r\nX-A: 1\r\n folded", 400),           # obs-fold
            (b"POST /v1/x HTTP/1.1\r\nX-A : 1", 400),                     # space before colon
            (b"POST /v1/x HTTP/1.1\r\nno colon", 400),
            (b"POST /v1/x HTTP/2.0", 505),
            (b"POST /v1/x", 400),
            (b"POST ftp://evil/v1/x HTTP/1.1\r\nHost: a", 400),
            (b"POST /v1/x HTTP/1.1", 400),                                  # no Host
            (b"POST /v1/x HTTP/1.1\r\nHost: a\r\nHost: b", 400),
            (b"POST /v1/x HTTP/1.1\r\nHost: a\r\nX Bad Name: 1", 400),   # not a token
            (b"POST /v1/x HTTP/1.1\r\nHost: a\r\nX-A: \x01", 400),        # control byte
            (b"PO ST /v1/x HTTP/1.1\r\nHost: a", 400),
            (b"GET /v1/../metrics HTTP/1.1", 400),
            (b"POST /v1/x HTTP/1.1\r\nExpect: something", 417),
        ],
    )
    def test_malformed_or_ambiguous_requests_are_refused(self, head: bytes, status: int) -> None:
        with pytest.raises(HttpError) as info:
            parse_head(head)
        assert info.value.status == status


class TestModelOf:
    @pytest.mark.parametrize(
        ("body", "model"),
        [
            (b'{"model":"tiny","prompt":"hi"}', "tiny"),
            (b'{"prompt": "hi",  "model" :  "Qwen/Qwen2.5-0.5B"}', "Qwen/Qwen2.5-0.5B"),
            (b'{"messages":[{"role":"user","content":"say \\"model\\": \\"x\\""}],'
             b'"model":"m"}', "m"),                                     # escaped quotes in text
            (b'{"model":"Qwen\\/Qwen"}', "Qwen/Qwen"),                   # escaped slash
            (b'{"tools":[{"parameters":{"properties":{"model":{"type":"string"}}}}],'
             b'"model":"m"}', "m"),                                     # nested key, not a str
            (b'{"metadata":{"model":"inner"},"model":"outer"}', "outer"),
            (b'{"model":null}', None),
            (b'{"model":42}', None),
            (b'{"prompt":"hi"}', None),
            (b'not json at all "model"', None),
            (b'["model", "x"]', None),
        ],
    )
    def test_model_of(self, body: bytes, model: str | None) -> None:
        assert model_of(body) == model
        if body.startswith(b"{"):  # the same past the json module's size: the bounded scan
            padded = b'{"pad": ["' + b"x]{" * 30000 + b'", {"model": "no"}], ' + body[1:]
            assert model_of(padded) == model

    def test_top_level_only_and_no_recursion_limit(self) -> None:
        assert model_of(b'{"metadata":{"model":"inner"}}') is None
        deep = b"[" * 200_000 + b"]" * 200_000
        assert model_of(b'{"a":' + deep + b',"model":"m"}') == "m"
        assert model_of(b'{"a":' + deep + b'}') is None
        assert model_of(b'{"a":"' + b"\\\"" * 50_000 + b'","model":"m"}') == "m"
        assert model_of(b'{"a":"' + b"x" * 200_000) is None  # cut inside a string
        assert model_of(b'{"a":' + b"[" * 100_000) is None


class TestErrorShapes:
    @pytest.mark.parametrize(
        ("status", "kind"),
        [(400, "BadRequestError"), (401, "AuthenticationError"), (404, "NotFoundError"),
         (413, "RequestTooLargeError"), (502, "BadGatewayError"),
         (503, "ServiceUnavailableError"), (504, "GatewayTimeoutError")],
    )
    def test_openai_shape(self, status: int, kind: str) -> None:
        doc = json.loads(error_body(status, "why", "model"))
        assert doc == {"error": {"message": "why", "type": kind, "param": "model",
                                 "code": status}}

    def test_sse_error_event_ends_the_stream(self) -> None:
        event = sse_error_event(502, "gone")
        first, done, rest = event.split(b"\n\n")
        assert json.loads(first.removeprefix(b"data: "))["error"]["code"] == 502
        assert done == b"data: [DONE]"
        assert rest == b""


def test_upstream_request_reframes_the_body() -> None:
    req = parse_head(b"POST /v1/completions HTTP/1.1\r\nHost: client\r\nTransfer-Encoding: "
                     b"chunked\r\nContent-Type: application/json")
    req.body = b'{"model":"m"}'
    raw, rest = upstream_request(req, b"127.0.0.1:9")
    assert not rest
    assert raw == (b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1:9\r\n"
                   b"Content-Type: application/json\r\ncontent-length: 13\r\n\r\n"
                   b'{"model":"m"}')
    get = parse_head(b"GET /v1/models HTTP/1.1\r\nHost: a")
    assert upstream_request(get, b"h:1") == (b"GET /v1/models HTTP/1.1\r\nhost: h:1\r\n\r\n",
                                             b"")
    req.body = b"x" * 100_000  # a large body is written on its own
    raw, rest = upstream_request(req, b"h:1")
    assert raw.endswith(b"content-length: 100000\r\n\r\n") and rest is req.body


@pytest.mark.parametrize(
    ("header", "ok"),
    [(b"Bearer sk-a", True), (b"bearer sk-b", True), (b"Bearer  sk-a ", True),
     (b"Bearer sk-c", False), (b"Basic sk-a", False), (b"sk-a", False), (b"", False)],
)
def test_authorized(header: bytes, ok: bool) -> None:
    assert authorized((b"sk-a", b"sk-b"), header) is ok
    assert authorized((), header) is False
