"""A tiny OpenAI-shaped engine (standard library only) for ``packaging/systemd-smoke``.

``engine.py PORT MODEL``: ``/health`` 200, ``/v1/models`` lists MODEL, ``/v1/completions`` and
``/v1/chat/completions`` answer one fixed token. Enough for mpsd's readiness (health + canary)
and for a request through its proxy inside the smoke container, where neither vLLM nor the
test suite's fakes are installed.
"""

from __future__ import annotations

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = sys.argv[2] if len(sys.argv) > 2 else "smoke"


class Handler(BaseHTTPRequestHandler):
    """Routes of the fake engine."""

    def do_GET(self) -> None:
        if self.path == "/health":
            self._reply(200, {})
        elif self.path == "/v1/models":
            self._reply(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        else:
            self._reply(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        if self.path in ("/v1/completions", "/v1/chat/completions"):
            choice = {"index": 0, "text": "ok", "finish_reason": "length"}
            self._reply(200, {"id": "smoke", "object": "text_completion",
                              "created": int(time.time()), "model": MODEL, "choices": [choice]})
        else:
            self._reply(404, {"error": {"message": "not found"}})

    def _reply(self, code: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: mpsd logs engines' output, and health probes would flood it."""


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
