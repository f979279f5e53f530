"""The /mpsd/ page, rendered by a real headless Chromium against a real aiohttp server.

The page is JavaScript over ``/mpsd/status``; only a browser shows whether it actually fetches,
renders every group and engine, tolerates fields a daemon does not send, and never turns a
fault reason into markup. Needs the Debian packages ``chromium`` and ``chromium-driver``
(``apt-get install -y chromium chromium-driver``); skipped where no Chromium is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import struct
import time
import zlib
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from mpsd.config import MpsConfig, RestartConfig, parse_config
from mpsd.host.nvml import GpuInfo, GpuInventory
from mpsd.observe.status_page import status_page_handler
from mpsd.plan.build import HostFacts, build_plan
from mpsd.pool import BackendPool
from mpsd.supervise.contract import GroupOptions
from mpsd.supervise.supervisor import Supervisor
from tests.http_server import serve

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))
                 if p), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium: apt-get install -y chromium chromium-driver")

UUID0 = "GPU-00000000-1111-2222-3333-444444444444"
UUID1 = "GPU-99999999-1111-2222-3333-444444444444"
HOSTILE = "crash loop (6 restarts in 600 s): <b id=\"injected\">engine</b> exited"


def canned_status(now: float) -> dict[str, Any]:
    """``Supervisor.status()``'s shape: gpu0 complete (plus a recovery field the supervisor may
    gain), gpu1 as a daemon that sends fewer fields (no history, no mps, no restart count)."""
    return {
        "status": "1/2 GPUs running, 2/3 engines ready; gpu1 FAILED: crash loop",
        "mps": {"enabled": True, "reason": "MPS on (nvidia-cuda-mps-control)"},
        "groups": [
            {"gpu": "gpu0", "device": "0", "uuid": UUID0, "state": "running",
             "since": now - 75, "reason": "2 engines ready", "restarts_in_window": 1,
             "history": [{"at": now - 200, "signal": "mps_status",
                          "reason": "MPS server 4242 status FAULT"},
                         {"at": now - 100, "signal": "health", "engine": "gpu0/qwen-1",
                          "reason": "gpu0/qwen-1 failed 3 health probes"}],
             "mps": {"pid": 4242, "pipe_dir": "/run/mpsd/gpu0/pipe",
                     "applied": {"default_active_thread_percentage": "100"}},
             "recovery": {"mps": 0.61, "engine": 48.2},
             "engines": [
                 {"key": "gpu0/qwen-0", "model": "tiny-qwen2", "port": 18100, "pid": 5001,
                  "cpus": [0, 1], "ready": True, "inflight": 6},
                 {"key": "gpu0/qwen-1", "model": "tiny-qwen2", "port": 18101, "pid": 5002,
                  "cpus": [2, 3], "ready": True, "inflight": 3}]},
            {"gpu": "gpu1", "device": "1", "uuid": UUID1, "state": "failed",
             "since": now - 30, "reason": HOSTILE,
             "engines": [{"key": "gpu1/qwen-0", "model": "tiny-qwen2", "port": 18102,
                          "pid": None, "ready": False, "inflight": 0}]},
        ],
    }


@asynccontextmanager
async def serve_page(status: Callable[[], dict[str, Any] | None],
                     ) -> AsyncIterator[tuple[str, list[int]]]:
    """``/mpsd/`` and ``/mpsd/status`` on a free port; yields the page URL and a hit counter.

    ``status`` returning None makes ``/mpsd/status`` answer 503 (the daemon is in trouble).
    """
    hits: list[int] = []

    async def status_json(request: web.Request) -> web.StreamResponse:
        hits.append(1)
        body = status()
        if body is None:
            return web.json_response({"error": "unavailable"}, status=503)
        return web.json_response(body)

    async with serve({"/mpsd/": status_page_handler, "/mpsd/status": status_json}) as url:
        yield f"{url}/mpsd/", hits


async def chromium(url: str, profile: Path, *args: str) -> str:
    """Run headless Chromium on ``url`` once the page's fetches ran (5 s of virtual time)."""
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
        "--virtual-time-budget=5000", *args, url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
    try:
        async with asyncio.timeout(90):
            out, err = await proc.communicate()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its zygote and renderers too
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode(errors="replace")


def run(fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return asyncio.run(fn())


def test_page_renders_groups_engines_history_and_escapes_reasons(tmp_path: Path) -> None:
    now = time.time()

    async def main() -> tuple[str, int]:
        async with serve_page(lambda: canned_status(now)) as (url, hits):
            return await chromium(url, tmp_path / "profile", "--dump-dom"), len(hits)

    dom, hits = run(main)
    assert hits >= 2, "the page polls /mpsd/status"
    assert "1/2 GPUs running, 2/3 engines ready" in dom
    assert 'data-gpu="gpu0"' in dom and 'data-gpu="gpu1"' in dom
    assert re.search(r'class="badge state s-running">running<', dom)
    assert re.search(r'class="badge state s-failed">failed<', dom)
    assert dom.count('<tr class="engine">') == 3
    for text in ("gpu0/qwen-0", "gpu0/qwen-1", "gpu1/qwen-0", "5001", "18102", "not ready",
                 "tiny-qwen2", "MPS server 4242 status FAULT", "failed 3 health probes",
                 "0.61 s", "48.2 s", UUID1):
        assert text in dom, text
    assert re.search(r"since: <b>1m [12]\ds ago</b>", dom)  # 75 s (+ the virtual time that ran)
    assert dom.count('<tr class="restart">') == 2
    # 6 and 3 in flight, scaled to the busiest engine (no cap in the JSON)
    assert "width: 100%;" in dom and "width: 50%;" in dom
    assert '<b id="injected">' not in dom  # a reason is text, never markup
    assert "&lt;b id=\"injected\"&gt;engine&lt;/b&gt;" in dom
    assert 'id="error" style="display: none;"' in dom
    assert "MPS: <b>off</b>" not in dom  # gpu1 sent no "mps" at all: not the same as off


def test_page_renders_a_real_supervisor_status(tmp_path: Path) -> None:
    inventory = GpuInventory(gpus=(GpuInfo(0, UUID0, "NVIDIA H200", 140 << 30, None, "580"),))
    config = parse_config({"gpu": [{"device": "0", "engine": [
        {"model": "Qwen/Qwen2.5-0.5B-Instruct", "name": "qwen", "replicas": 2}]}]})
    plan = build_plan(config, HostFacts(inventory=inventory, mps_binary="/usr/bin/mps",
                                        cpus=tuple(range(4))), "test.toml")

    async def main() -> str:
        async with aiohttp.ClientSession() as session:
            options = GroupOptions(mps=MpsConfig(), restart=RestartConfig(), drain_timeout_s=1,
                                   registry=None, environ={})
            sup = Supervisor(plan, options, BackendPool(), session)
            async with serve_page(sup.status) as (url, _):
                return await chromium(url, tmp_path / "profile", "--dump-dom")

    dom = run(main)
    assert 'data-gpu="gpu0"' in dom
    assert re.search(r'class="badge state s-stopped">stopped<', dom)
    assert dom.count('<tr class="engine">') == 2
    assert "gpu0/qwen-1" in dom and "no restarts" in dom


def test_page_says_when_status_cannot_be_read(tmp_path: Path) -> None:
    now = time.time()
    answers = iter([canned_status(now)])

    async def main() -> str:
        async with serve_page(lambda: next(answers, None)) as (url, hits):
            dom = await chromium(url, tmp_path / "profile", "--dump-dom")
            assert len(hits) >= 2
            return dom

    dom = run(main)
    assert "Cannot read status: HTTP 503 (showing the last data)" in dom
    assert 'id="error" style="display: block;"' in dom
    assert 'data-gpu="gpu0"' in dom  # the last good answer stays on screen


def png_rows(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and the (still filtered) scanlines of an 8-bit RGB/RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height, channels = 8, b"", 0, 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour in (2, 6)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = 1 + width * channels
    assert len(raw) == stride * height
    return width, height, [raw[i:i + stride] for i in range(0, len(raw), stride)]


def test_screenshot_is_not_blank(tmp_path: Path) -> None:
    now = time.time()
    shot = tmp_path / "status.png"

    async def main() -> None:
        async with serve_page(lambda: canned_status(now)) as (url, _):
            await chromium(url, tmp_path / "profile", f"--screenshot={shot}",
                           "--window-size=1200,800", "--hide-scrollbars")

    run(main)
    data = shot.read_bytes()
    width, height, rows = png_rows(data)
    assert (width, height) == (1200, 800)
    assert len(data) > 20_000, "a rendered page compresses far worse than a blank one"
    # A single-colour image has a handful of distinct filtered rows; text and tables, hundreds.
    assert len(set(rows)) > 100
    assert len(set(b"".join(rows))) > 64
