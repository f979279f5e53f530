"""The request corpus: raw requests in ``corpus/valid`` and ``corpus/invalid``, each with its
expected outcome, read by mpsd's parser whole and one byte at a time (as gunicorn keeps its own).

A file's first line is a JSON object: for a valid request the method, origin-form target,
forwarded header lines and body (plus ``keep_alive`` where it matters); for an invalid one the
``status`` mpsd answers (and ``limits`` to use instead of the defaults). The rest is the request,
written with escapes (``\\r\\n``, ``\\x00``); the file's own line breaks are not part of it.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any

import pytest

from mpsd.proxy.framing import Request, RequestParser
from mpsd.proxy.http_rules import HttpError, Limits

CORPUS = Path(__file__).parent / "corpus"


def load(path: Path) -> tuple[dict[str, Any], bytes]:
    expect_line, _, text = path.read_text(encoding="ascii").partition("\n")
    raw = codecs.escape_decode(text.replace("\n", "").encode())[0]
    return json.loads(expect_line), raw


def unescape(text: str) -> bytes:
    return codecs.escape_decode(text.encode())[0]


def parse_all(raw: bytes, limits: Limits, *, bytewise: bool) -> Request:
    """One request out of ``raw``, fed whole or one byte at a time."""
    parser = RequestParser(limits)
    buf = bytearray()
    pieces = [raw[i:i + 1] for i in range(len(raw))] if bytewise else [raw]
    request = None
    for piece in pieces:
        buf += piece
        if request is None:
            request = parser.head(buf)
        if request is not None and parser.body(buf):
            return request
    raise AssertionError("the request never completed")


def cases(kind: str) -> list[Any]:
    return [pytest.param(p, id=p.stem) for p in sorted((CORPUS / kind).glob("*.http"))]


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("path", cases("valid"))
def test_valid(path: Path, bytewise: bool) -> None:
    expect, raw = load(path)
    request = parse_all(raw, Limits(), bytewise=bytewise)
    assert request.method == expect["method"].encode()
    assert request.target == expect["target"].encode()
    assert request.forward == [unescape(line) for line in expect["forward"]]
    assert request.body == unescape(expect["body"])
    if "keep_alive" in expect:
        assert request.keep_alive is expect["keep_alive"]


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("path", cases("invalid"))
def test_invalid(path: Path, bytewise: bool) -> None:
    expect, raw = load(path)
    with pytest.raises(HttpError) as info:
        parse_all(raw, Limits(**expect.get("limits", {})), bytewise=bytewise)
    assert info.value.status == expect["status"], info.value.message


def test_the_corpus_is_there() -> None:
    assert len(cases("valid")) >= 10 and len(cases("invalid")) >= 35
